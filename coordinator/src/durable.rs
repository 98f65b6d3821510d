//! What a (re)started coordinator does with the job already in its `out_dir`:
//! resume it, report it finished, refuse a different job, or archive it for a new
//! one ([`prepare`]).
//!
//! | ledger in `out_dir`                 | `Auto` / `Resume`            | `NewJob`                      |
//! |-------------------------------------|------------------------------|-------------------------------|
//! | none                                | new job (`Resume`: error)    | new job                       |
//! | same config and dataset, finished   | finished: nothing trains     | archive, new job              |
//! | same job, not finished (or failed,  | resume at the committed step | archive, new job              |
//! | cancelled)                          |                              |                               |
//! | other config or dataset, no header  | refused, naming the keys     | archive, new job              |
//!
//! Archiving moves the ledger and the checkpoints to `<out_dir>/archive/<job_id>/`;
//! two jobs' records are never mixed in one ledger.

use std::path::{Path, PathBuf};

use hsat_proto::HSAT_VERSION;

use crate::checkpoints;
use crate::identity::{config_differences, config_fingerprint};
use crate::ledger::{self, Header, LedgerState};
use crate::scheduler::RestoredJob;
use crate::{CoordinatorError, Job};

/// How to treat a job already in `out_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMode {
    /// Resume the same job, report a finished one, start a new one where there is
    /// none; refuse a different job.
    #[default]
    Auto,
    /// As `Auto`, but it is an error when there is no job to resume (`--resume`).
    Resume,
    /// Archive whatever job is there and start a new one (`--new-job`).
    NewJob,
}

/// What the coordinator does.
#[derive(Debug, Clone, PartialEq)]
pub enum JobStart {
    /// A new job: write `header` first.
    New {
        /// The new job's header.
        header: Header,
    },
    /// Continue the job.
    Resume {
        /// Its header.
        header: Header,
        /// What the ledger says.
        state: LedgerState,
        /// The scheduler's starting point.
        restored: RestoredJob,
    },
    /// The job already finished: train nothing, leave the ledger untouched.
    Finished {
        /// Its header.
        header: Header,
        /// What the ledger says.
        state: LedgerState,
    },
}

/// The header of `job` as a new job.
pub fn new_header(job: &Job) -> Header {
    let config = job.config.to_json_value();
    Header {
        job_id: new_job_id(),
        config_fingerprint: config_fingerprint(&config),
        config,
        dataset_fingerprint: job.dataset_fingerprint().to_owned(),
        total_steps: job.plan.total_steps,
        hsat_version: HSAT_VERSION.to_owned(),
        created_unix: ledger::unix_now(),
    }
}

/// A job id unique enough to name an archive: time and process id, hashed.
fn new_job_id() -> String {
    use sha2::Digest;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{nanos}-{}", std::process::id());
    let digest = sha2::Sha256::digest(seed.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Decides what to do with the job in `job`'s `out_dir` (see the module docs);
/// archives the old job for [`StartMode::NewJob`].
pub fn prepare(job: &Job, mode: StartMode) -> Result<JobStart, CoordinatorError> {
    let out_dir = &job.config.infra.out_dir;
    let path = job.coordinator_dir().join(ledger::LEDGER_FILE);
    let state = match ledger::read(&path) {
        Ok(state) => state,
        // A damaged ledger may be archived by an explicit new job.
        Err(err) if mode == StartMode::NewJob => {
            tracing::warn!("{err}");
            archive(out_dir, &path, &format!("damaged-{}", ledger::unix_now()))?;
            return Ok(JobStart::New {
                header: new_header(job),
            });
        }
        Err(err) => return Err(err),
    };
    let Some(state) = state else {
        if mode == StartMode::Resume {
            return Err(CoordinatorError::NothingToResume {
                ledger: path.clone(),
            });
        }
        return Ok(JobStart::New {
            header: new_header(job),
        });
    };
    if mode == StartMode::NewJob {
        let id = state.header.as_ref().map_or_else(
            || format!("legacy-{}", ledger::unix_now()),
            |h| h.job_id.clone(),
        );
        archive(out_dir, &path, &id)?;
        return Ok(JobStart::New {
            header: new_header(job),
        });
    }
    let Some(header) = state.header.clone() else {
        return Err(CoordinatorError::OtherJob {
            ledger: path,
            differences:
                "the ledger has no header (it was written by an hsat without resumable jobs)"
                    .to_owned(),
        });
    };
    let mut differences: Vec<String> =
        config_differences(&header.config, &job.config.to_json_value())
            .into_iter()
            .map(|d| format!("{}: ledger {}, now {}", d.key, d.found, d.expected))
            .collect();
    if header.dataset_fingerprint != job.dataset_fingerprint() {
        differences.push(format!(
            "dataset fingerprint: ledger {}, now {}",
            header.dataset_fingerprint,
            job.dataset_fingerprint()
        ));
    }
    if !differences.is_empty() {
        return Err(CoordinatorError::OtherJob {
            ledger: path,
            differences: differences.join("; "),
        });
    }
    if header.hsat_version != HSAT_VERSION {
        tracing::warn!(
            ledger_version = %header.hsat_version,
            version = HSAT_VERSION,
            "the job was started by another hsat version; resuming it anyway"
        );
    }
    if let Some(end) = &state.end
        && end.outcome == ledger::EndOutcome::Finished
    {
        return Ok(JobStart::Finished { header, state });
    }
    if let Some(end) = &state.last_end {
        tracing::info!(
            outcome = end.outcome.as_str(),
            reason = %end.reason,
            committed = end.committed,
            "the job ended before; resuming it"
        );
    }
    let restored = restored_job(&state, &checkpoints::root(out_dir));
    Ok(JobStart::Resume {
        header,
        state,
        restored,
    })
}

/// The scheduler's starting point from the ledger, with the checkpoints found
/// under `root` that the ledger does not name (their record may have been lost).
pub fn restored_job(state: &LedgerState, root: &Path) -> RestoredJob {
    let mut found = state.checkpoints.clone();
    for (step, dir) in checkpoints::list(root) {
        found.entry(step).or_insert(dir);
    }
    RestoredJob {
        committed: state.committed,
        last_checksum: state.last_commit.as_ref().and_then(|c| c.checksum),
        last_world_size: state.last_commit.as_ref().map_or(0, |c| c.world_size),
        highest_generation: state.highest_generation,
        incarnation: state.starts,
        checkpoints: found,
    }
}

/// Moves the ledger and the checkpoints to `<out_dir>/archive/<id>/`; refuses to
/// overwrite an archive that exists.
fn archive(out_dir: &Path, ledger: &Path, id: &str) -> Result<PathBuf, CoordinatorError> {
    let target = out_dir.join("archive").join(id);
    if target.exists() {
        return Err(CoordinatorError::Archive {
            target,
            message: "it already exists; move it away first".to_owned(),
        });
    }
    let fail = |e: std::io::Error| CoordinatorError::Archive {
        target: target.clone(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(&target).map_err(fail)?;
    if ledger.exists() {
        std::fs::rename(ledger, target.join(ledger::LEDGER_FILE)).map_err(fail)?;
    }
    let root = checkpoints::root(out_dir);
    if root.exists() {
        std::fs::rename(&root, target.join("checkpoints")).map_err(fail)?;
    }
    tracing::warn!(archive = %target.display(), "archived the previous job (--new-job)");
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{EndOutcome, EndRecord, LedgerWriter};
    use hsat_core::config::Config;
    use hsat_core::dataset::DatasetIndex;

    /// A job over 8 manifest patients writing to `<dir>/out`, learn rate `lr`.
    fn job(dir: &Path, lr: f64) -> Job {
        let mut csv = String::from("patient,slide,path,label,split\n");
        std::fs::create_dir_all(dir.join("tiles")).unwrap();
        for p in 0..8 {
            let path = format!("tiles/p{p}.png");
            std::fs::write(dir.join(&path), b"").unwrap();
            csv.push_str(&format!("P{p},S0,{path},{},train\n", ["a", "b"][p % 2]));
        }
        std::fs::write(dir.join("manifest.csv"), csv).unwrap();
        let config = Config::from_toml_str(&format!(
            "[infra]\nout_dir = {:?}\n[data]\nsource = \"manifest\"\nmanifest = {:?}\n\
             [training]\nbatch_size = 2\nnum_epochs = 1\nlearn_rate = {lr}\n",
            dir.join("out").display().to_string(),
            dir.join("manifest.csv").display().to_string()
        ))
        .unwrap();
        let index = DatasetIndex::load_manifest(&dir.join("manifest.csv"), None).unwrap();
        Job::from_index(config, index)
    }

    /// Writes a ledger for `job`: header, `commits` commits, and `end`.
    fn write_ledger(job: &Job, commits: u64, end: Option<EndOutcome>) -> Header {
        let header = new_header(job);
        let ledger = LedgerWriter::open(&job.coordinator_dir(), None).unwrap();
        ledger.append(&ledger::header_record(&header));
        for step in 0..commits {
            ledger.append(&serde_json::json!({
                "kind": "commit", "step": step, "epoch": 0, "generation": 1,
                "ranks": [{"rank": 0, "patients": [], "checksum": 5}]
            }));
        }
        if let Some(outcome) = end {
            ledger.append(&ledger::end_record(&EndRecord {
                outcome,
                reason: String::new(),
                committed: commits,
            }));
        }
        ledger.close().unwrap();
        header
    }

    #[test]
    fn no_ledger_is_a_new_job_unless_resume_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path(), 0.001);
        assert!(matches!(
            prepare(&job, StartMode::Auto).unwrap(),
            JobStart::New { .. }
        ));
        let err = prepare(&job, StartMode::Resume).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::NothingToResume { .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("nothing to resume"), "{err}");
    }

    #[test]
    fn the_same_job_resumes_and_a_finished_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path(), 0.001);
        let header = write_ledger(&job, 2, Some(EndOutcome::Cancelled));
        match prepare(&job, StartMode::Auto).unwrap() {
            JobStart::Resume {
                header: found,
                restored,
                ..
            } => {
                assert_eq!(found.job_id, header.job_id);
                assert_eq!((restored.committed, restored.last_checksum), (2, Some(5)));
            }
            other => panic!("{other:?}"),
        }
        let done = tempfile::tempdir().unwrap();
        let finished = self::job(done.path(), 0.001);
        write_ledger(&finished, 4, Some(EndOutcome::Finished));
        let before = std::fs::read(finished.coordinator_dir().join(ledger::LEDGER_FILE)).unwrap();
        assert!(matches!(
            prepare(&finished, StartMode::Resume).unwrap(),
            JobStart::Finished { .. }
        ));
        let after = std::fs::read(finished.coordinator_dir().join(ledger::LEDGER_FILE)).unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn another_config_is_refused_naming_the_key_and_new_job_archives_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = job(dir.path(), 0.001);
        let header = write_ledger(&old, 1, None);
        let checkpoint = checkpoints::root(&old.config.infra.out_dir).join("step-00000001");
        std::fs::create_dir_all(&checkpoint).unwrap();
        let new = job(dir.path(), 0.0002);
        let err = prepare(&new, StartMode::Auto).unwrap_err();
        match &err {
            CoordinatorError::OtherJob { differences, .. } => {
                assert_eq!(differences, "training.learn_rate: ledger 0.001, now 0.0002")
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("--new-job"), "{err}");

        assert!(matches!(
            prepare(&new, StartMode::NewJob).unwrap(),
            JobStart::New { .. }
        ));
        let archive = old
            .config
            .infra
            .out_dir
            .join("archive")
            .join(&header.job_id);
        assert!(archive.join(ledger::LEDGER_FILE).is_file());
        assert!(archive.join("checkpoints/step-00000001").is_dir());
        assert!(!old.coordinator_dir().join(ledger::LEDGER_FILE).exists());
    }
}
