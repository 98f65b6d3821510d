//! Reading `<out_dir>/metrics.jsonl`, the per-step telemetry a training run appends
//! (one JSON object per committed step; written by the coordinator and by a
//! single-process `hsat run`), for `hsat plot`.
//!
//! The reader is lenient where a live or crashed run makes the file imperfect:
//! unknown fields are ignored, any field may be `null` or missing (not measured at
//! that step), a torn line (a crash mid-write, possibly followed by appends after a
//! resume) is skipped and reported, and a step recorded twice (redone after a
//! resume) keeps its last record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file name under a run's `out_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Losses of one view (clean or adversarial), level by level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ViewLosses {
    /// Patient-level loss.
    pub patient: Option<f64>,
    /// Slide-level loss.
    pub slide: Option<f64>,
    /// Patch-level loss.
    pub patch: Option<f64>,
    /// Weighted total.
    pub total: Option<f64>,
}

/// Both views' losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StepLossViews {
    /// On the clean views (null when not computed that step).
    pub clean: Option<ViewLosses>,
    /// On the adversarial views (null without an attack).
    pub adversarial: Option<ViewLosses>,
}

/// One committed step's record. Only `step` is required (a missing `Option` field
/// reads as `None`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StepRecord {
    /// The global step.
    pub step: u64,
    /// Its epoch.
    pub epoch: Option<u64>,
    /// The generation that trained it.
    pub generation: Option<u64>,
    /// Unix time of the commit, in seconds.
    pub time_unix_s: Option<f64>,
    /// Ranks that trained it.
    pub world_size: Option<u64>,
    /// Mean losses over the ranks.
    pub loss: Option<StepLossViews>,
    /// Adversarial loss at the last PGD iterate minus the loss at its random start.
    pub attack_gain: Option<f64>,
    /// Learning rate in effect.
    pub lr: Option<f64>,
    /// Attack radius in effect (in [0, 1] pixel units).
    pub eps: Option<f64>,
    /// Seconds the step took.
    pub step_seconds: Option<f64>,
    /// Of that, seconds waiting for data.
    pub data_wait_seconds: Option<f64>,
    /// Of that, seconds crafting the attack.
    pub attack_seconds: Option<f64>,
    /// Of that, seconds in the gradient all-reduce.
    pub allreduce_seconds: Option<f64>,
    /// Patches per second over the step.
    pub patches_per_second: Option<f64>,
}

/// The records of a run, one per step, in step order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLog {
    /// The file read.
    pub path: PathBuf,
    /// One record per step (the last one when a step appears twice), by step.
    pub steps: Vec<StepRecord>,
    /// 1-based numbers of the lines that were not complete records (torn writes).
    pub skipped_lines: Vec<usize>,
}

/// Why a run's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    /// There is no `metrics.jsonl` in the run folder.
    #[error(
        "{} does not exist: {} is not a run folder (give the run's infra.out_dir), \
         or the run was made by an hsat older than metrics.jsonl; train or resume it with this hsat to record metrics",
        path.display(),
        run.display()
    )]
    Missing {
        /// The file looked for.
        path: PathBuf,
        /// The folder given.
        run: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("cannot read {}: {source}; check its permissions", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// No line of the file is a complete record.
    #[error(
        "{} holds no committed step yet{}: plot again once the run has committed a step",
        path.display(),
        if *skipped == 0 { String::new() } else { format!(" ({skipped} unreadable line(s))") }
    )]
    Empty {
        /// The file.
        path: PathBuf,
        /// Lines that were not records.
        skipped: usize,
    },
}

impl MetricsLog {
    /// Reads `<run>/metrics.jsonl`.
    pub fn read_run(run: &Path) -> Result<Self, MetricsLogError> {
        let path = run.join(METRICS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetricsLogError::Missing {
                    path,
                    run: run.to_path_buf(),
                });
            }
            Err(source) => return Err(MetricsLogError::Read { path, source }),
        };
        Self::parse(path, &text)
    }

    /// Parses the text of a metrics file read from `path`.
    pub fn parse(path: PathBuf, text: &str) -> Result<Self, MetricsLogError> {
        let mut by_step = BTreeMap::new();
        let mut skipped_lines = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<StepRecord>(line) {
                Ok(record) => {
                    by_step.insert(record.step, record);
                }
                Err(_) => skipped_lines.push(index + 1),
            }
        }
        if by_step.is_empty() {
            return Err(MetricsLogError::Empty {
                path,
                skipped: skipped_lines.len(),
            });
        }
        Ok(Self {
            path,
            steps: by_step.into_values().collect(),
            skipped_lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_nulls_unknown_fields_repeats_and_a_torn_tail_are_read() {
        let text = concat!(
            r#"{"step":1,"epoch":0,"loss":{"clean":null,"adversarial":{"patient":1.5,"slide":1.0,"patch":0.5,"total":3.0}},"lr":0.001,"new_field":[1]}"#,
            "\n",
            r#"{"step":2,"attack_gain":0.25,"step_seconds":1.5}"#,
            "\n",
            r#"{"step":2,"attack_gain":0.5,"step_seconds":1.25}"#,
            "\n",
            r#"{"step":3,"epoch":1,"loss":{"clean":{"pat"#,
        );
        let log = MetricsLog::parse(PathBuf::from("m.jsonl"), text).unwrap();
        assert_eq!(log.steps.len(), 2, "{log:?}");
        let loss = log.steps[0].loss.unwrap();
        assert_eq!(loss.clean, None);
        assert_eq!(loss.adversarial.and_then(|v| v.patient), Some(1.5));
        assert_eq!(
            log.steps[1].attack_gain,
            Some(0.5),
            "the last record of step 2"
        );
        assert_eq!(log.skipped_lines, vec![4]);
    }

    #[test]
    fn a_missing_file_says_which_and_that_the_run_may_be_older() {
        let dir = tempfile::tempdir().unwrap();
        let err = MetricsLog::read_run(dir.path()).unwrap_err();
        assert!(matches!(err, MetricsLogError::Missing { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("metrics.jsonl does not exist"), "{text}");
        assert!(text.contains("older than metrics.jsonl"), "{text}");
    }

    #[test]
    fn a_file_without_records_is_empty() {
        // `{}` is JSON but not a record: it has no step.
        let err = MetricsLog::parse(PathBuf::from("m.jsonl"), "{}\n\n{\"ste").unwrap_err();
        assert!(
            matches!(err, MetricsLogError::Empty { skipped: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("no committed step yet"), "{err}");
    }
}
