//! `<out_dir>/metrics.jsonl`: one JSON object per committed step, written by the
//! coordinator of a distributed job and by single-process `hsat run`, read by
//! `hsat plot` (and anything else: it is plain JSON lines).
//!
//! Each line is appended and flushed on its own, so a reader sees whole lines but
//! for perhaps a torn last one after a crash; readers skip a line that does not
//! parse and fields they do not know. A process that opens the file again (a
//! restarted coordinator, a resumed run) appends after what is there and never
//! writes a step at or below the last one written: steps redone after a rollback
//! or a resume from an older checkpoint keep their first line.
//!
//! Any value may be `null` when it was not measured at that step (clean losses
//! without a clean forward pass, attack values without an attack).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hsat_core::losses::LevelLosses;
use serde::{Deserialize, Serialize};

use crate::MetricsError;

/// The file name, under `infra.out_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Level losses of the clean and the adversarial views.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewLosses {
    /// On the clean views.
    pub clean: Option<LevelLosses>,
    /// On the adversarial views.
    pub adversarial: Option<LevelLosses>,
}

/// One line of `metrics.jsonl`: one committed step, averaged over ranks (weighted
/// by their patients) where ranks measure separately.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// The global step, 0-based.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// The generation that trained it (0 in a single process).
    pub generation: u64,
    /// Seconds since the Unix epoch when it was committed.
    pub time_unix_s: f64,
    /// Ranks that trained it.
    pub world_size: u64,
    /// Losses by view and level.
    pub loss: ViewLosses,
    /// Adversarial loss at PGD's last iterate minus at its random start.
    pub attack_gain: Option<f64>,
    /// Learning rate in effect.
    pub lr: Option<f64>,
    /// Attack radius in effect (pixel units, images in [0, 1]).
    pub eps: Option<f64>,
    /// Seconds of the step (the slowest rank's, data wait included).
    pub step_seconds: Option<f64>,
    /// Seconds waiting for the batch.
    pub data_wait_seconds: Option<f64>,
    /// Seconds crafting adversarial examples.
    pub attack_seconds: Option<f64>,
    /// Seconds averaging gradients across ranks.
    pub allreduce_seconds: Option<f64>,
    /// Patches of the whole step per second of the step.
    pub patches_per_second: Option<f64>,
}

/// Seconds since the Unix epoch, now.
pub fn now_unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The appending writer of `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    last_step: Option<u64>,
}

#[derive(Deserialize)]
struct StepOnly {
    step: u64,
}

impl MetricsLog {
    /// Opens (or creates) `<out_dir>/metrics.jsonl` for appending; remembers the
    /// last step already in it. A torn last line is ended first so the next record
    /// starts on a line of its own.
    pub fn open(out_dir: &Path) -> Result<MetricsLog, MetricsError> {
        let path = out_dir.join(METRICS_FILE);
        let error = |source| MetricsError::Log {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(out_dir).map_err(error)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(error)?;
        let last_step = BufReader::new(&file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<StepOnly>(&line).ok())
            .map(|record| record.step)
            .max();
        let length = file.metadata().map_err(error)?.len();
        if length > 0 {
            file.seek(SeekFrom::Start(length - 1)).map_err(error)?;
            let mut last = [0u8; 1];
            file.read_exact(&mut last).map_err(error)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(error)?;
            }
        }
        Ok(MetricsLog {
            path,
            file,
            last_step,
        })
    }

    /// Opens `<out_dir>/metrics.jsonl` for a job that starts at step 0: a file
    /// already there (an earlier job's) is renamed to
    /// `metrics.jsonl.replaced-<unix seconds>` first, so the new job's steps are
    /// not skipped as already written.
    pub fn start_over(out_dir: &Path) -> Result<MetricsLog, MetricsError> {
        let path = out_dir.join(METRICS_FILE);
        if path.exists() {
            let aside = out_dir.join(format!("{METRICS_FILE}.replaced-{}", now_unix_s() as u64));
            std::fs::rename(&path, &aside).map_err(|source| MetricsError::Log {
                path: path.clone(),
                source,
            })?;
        }
        MetricsLog::open(out_dir)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last step written (by this or an earlier process).
    pub fn last_step(&self) -> Option<u64> {
        self.last_step
    }

    /// Appends `record` and flushes it, unless its step is at or below the last
    /// one written; returns whether it was written.
    pub fn append(&mut self, record: &StepRecord) -> Result<bool, MetricsError> {
        if self.last_step.is_some_and(|last| record.step <= last) {
            return Ok(false);
        }
        let mut line = serde_json::to_string(record).map_err(|err| MetricsError::Log {
            path: self.path.clone(),
            source: std::io::Error::other(err),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Log {
                path: self.path.clone(),
                source,
            })?;
        self.last_step = Some(record.step);
        Ok(true)
    }
}

/// Reads every whole, parsable line of a `metrics.jsonl` (a torn or foreign line
/// is skipped).
pub fn read(path: &Path) -> std::io::Result<Vec<StepRecord>> {
    let file = File::open(path)?;
    Ok(BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            epoch: step / 4,
            generation: 1,
            time_unix_s: now_unix_s(),
            world_size: 2,
            loss: ViewLosses {
                clean: None,
                adversarial: Some(LevelLosses {
                    patient: 1.0,
                    slide: 2.0,
                    patch: 3.0,
                    total: 6.0,
                }),
            },
            attack_gain: Some(0.25),
            lr: Some(1e-4),
            ..StepRecord::default()
        }
    }

    #[test]
    fn lines_have_the_documented_fields_and_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        assert!(log.append(&record(0)).unwrap());
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(value["step"], 0);
        assert_eq!(value["world_size"], 2);
        assert_eq!(value["loss"]["adversarial"]["slide"], 2.0);
        assert!(value["loss"]["clean"].is_null());
        assert_eq!(value["attack_gain"], 0.25);
        assert!(value["eps"].is_null());
        for key in [
            "epoch",
            "generation",
            "time_unix_s",
            "lr",
            "step_seconds",
            "data_wait_seconds",
            "attack_seconds",
            "allreduce_seconds",
            "patches_per_second",
        ] {
            assert!(value.get(key).is_some(), "{key} missing from {text}");
        }
    }

    #[test]
    fn a_reopened_log_appends_and_never_repeats_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        for step in 0..3 {
            assert!(log.append(&record(step)).unwrap());
        }
        drop(log);
        let mut log = MetricsLog::open(dir.path()).unwrap();
        assert_eq!(log.last_step(), Some(2));
        // A restarted coordinator recommits steps 1 and 2 after a rollback: skipped.
        assert!(!log.append(&record(1)).unwrap());
        assert!(!log.append(&record(2)).unwrap());
        assert!(log.append(&record(3)).unwrap());
        let steps: Vec<u64> = read(log.path()).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [0, 1, 2, 3]);
    }

    #[test]
    fn a_new_job_starts_over_and_keeps_the_old_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        log.append(&record(5)).unwrap();
        drop(log);
        let mut log = MetricsLog::start_over(dir.path()).unwrap();
        assert_eq!(log.last_step(), None);
        assert!(log.append(&record(0)).unwrap());
        let steps: Vec<u64> = read(log.path()).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [0]);
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("metrics.jsonl.replaced-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        log.append(&record(0)).unwrap();
        drop(log);
        let path = dir.path().join(METRICS_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"step":1,"epoch":0,"gen"#).unwrap();
        drop(file);
        let mut log = MetricsLog::open(dir.path()).unwrap();
        assert_eq!(log.last_step(), Some(0));
        assert!(log.append(&record(1)).unwrap());
        let steps: Vec<u64> = read(&path).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [0, 1]);
    }
}
