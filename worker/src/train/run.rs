//! `hsat run` without `--workers` as one call ([`run_training`]): a training job in
//! this process. Picks the batch source the config names (the in-memory generator,
//! or files on disk, indexed and checked before any step), trains with the
//! [`Trainer`] loop and measures how long training waited for data. What happens
//! along the way is reported through [`RunEvent`]s; the caller prints.
//!
//! A run is resumable: when `<out_dir>/checkpoints` holds checkpoints of the same
//! job (same config and dataset fingerprints), training continues from the newest
//! one that verifies, exactly where it stopped; a job whose newest checkpoint is its
//! last step is finished and not trained again; checkpoints of another job are
//! refused unless [`RunOptions::new_job`] moves them to `<out_dir>/archive/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsat_core::checkpoint::Manifest;
use hsat_core::config::{AttackKind, Backbone, Config, DataSource, config_differences};
use hsat_core::dataset::{DatasetIndex, Split};
use hsat_core::sampler::{balanced_patients, steps_per_epoch};
use hsat_data::check::{DatasetCheckError, open_dataset};
use hsat_data::loader::LoaderSpec;
use tch::Device;

use super::trainer::{StepProgress, Trainer};
use crate::checkpoint::newest_usable;
use crate::data::synthetic::{SyntheticSource, SyntheticSpec};
use crate::data::{BatchSource, FileSource};
use crate::error::WorkerError;

/// How a run treats the checkpoints already in `<infra.out_dir>/checkpoints`
/// (`hsat run --resume` / `--new-job`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Resuming is required: fail when there is nothing to resume.
    pub resume: bool,
    /// Start a new job: move the old checkpoints to `<out_dir>/archive/<name>/`
    /// (never deleted, never mixed with the new job's).
    pub new_job: bool,
}

/// Why a training run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainRunError {
    /// The dataset cannot be indexed or has errors.
    #[error(transparent)]
    Dataset(#[from] DatasetCheckError),
    /// The model, a step, the loader or a checkpoint failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The out_dir holds checkpoints of another job.
    #[error(
        "{} holds checkpoints of another job ({differences}): pass --new-job to move them to {}/archive/ and start a new job, or use another infra.out_dir",
        root.display(), out_dir.display()
    )]
    OtherJob {
        /// The checkpoints folder.
        root: PathBuf,
        /// The run's out_dir.
        out_dir: PathBuf,
        /// What differs (fingerprints: the checkpoint's, this run's).
        differences: String,
    },
    /// `--resume` with no checkpoint to resume from.
    #[error(
        "--resume: there is nothing to resume in {} (no checkpoints); run without --resume to start the job",
        root.display()
    )]
    NothingToResume {
        /// The checkpoints folder.
        root: PathBuf,
    },
    /// Checkpoints are present but none verifies.
    #[error(
        "no checkpoint in {} is complete (each was rejected, see the warnings above): pass --new-job to move them to the archive and start again",
        root.display()
    )]
    NoCompleteCheckpoint {
        /// The checkpoints folder.
        root: PathBuf,
    },
    /// The old checkpoints could not be moved to the archive.
    #[error("cannot move {} to {}", from.display(), to.display())]
    Archive {
        /// The checkpoints folder.
        from: PathBuf,
        /// The archive folder.
        to: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// What [`run_training`] reports as it goes, in this order:
/// [`Dataset`](Self::Dataset) (file datasets only), [`Start`](Self::Start),
/// [`Model`](Self::Model), then [`Step`](Self::Step) for the steps to log.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// A file dataset was indexed and passed the quick check.
    Dataset {
        /// Patients of both splits.
        patients: usize,
        /// Train patients.
        train_patients: usize,
        /// Patches of both splits.
        patches: usize,
        /// The index fingerprint (hex SHA-256).
        fingerprint: &'a str,
    },
    /// Training is about to start.
    Start {
        /// The backbone trained.
        backbone: Backbone,
        /// The attack of the inner maximisation.
        attack: AttackKind,
        /// Where the model runs.
        device: Device,
        /// Patients per step.
        batch_size: usize,
        /// Steps per epoch.
        steps_per_epoch: u64,
        /// Where checkpoints go.
        out_dir: &'a Path,
    },
    /// The model is built.
    Model {
        /// Its trainable parameters.
        parameters: i64,
    },
    /// `--new-job`: the previous job's checkpoints were moved aside.
    Archived {
        /// The checkpoints folder they were in.
        from: &'a Path,
        /// Where they are now.
        to: &'a Path,
    },
    /// The job resumes from a checkpoint (after [`Model`](Self::Model)).
    Resumed {
        /// Steps already done: training continues with this (0-based) step.
        step: u64,
        /// Total steps of the job.
        total_steps: u64,
        /// The checkpoint restored.
        checkpoint: &'a Path,
    },
    /// The job's newest checkpoint is its last step: nothing is trained.
    Finished {
        /// Total steps of the job.
        total_steps: u64,
        /// The final checkpoint.
        checkpoint: &'a Path,
    },
    /// A step finished that `infra.log_every` selects (every `log_every`-th step), or
    /// the last one, or one that wrote a checkpoint.
    Step(&'a StepProgress),
}

/// How a finished run went.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The last checkpoint written (or, for a finished job, its final one); `None`
    /// when there was nothing to train.
    pub final_checkpoint: Option<PathBuf>,
    /// The job was already finished: nothing was trained.
    pub already_finished: bool,
    /// Seconds the steps after the first spent computing, and waiting for data. The
    /// first step is left out: it includes start-up (thread pool, first batch).
    pub busy_seconds: f64,
    /// See [`busy_seconds`](Self::busy_seconds).
    pub waiting_seconds: f64,
}

impl RunSummary {
    /// The share of the time after the first step spent waiting for data, in
    /// [0, 1]; `None` when no such step ran.
    pub fn waiting_share(&self) -> Option<f64> {
        let total = self.busy_seconds + self.waiting_seconds;
        (total > 0.0).then(|| self.waiting_seconds / total)
    }
}

/// Trains the job `cfg` describes on `device`, in this process, resuming it from
/// its checkpoints as `options` and the [module docs](self) say.
///
/// # Errors
///
/// [`TrainRunError::Dataset`] before any step when a file dataset cannot be indexed
/// or has errors; [`TrainRunError::OtherJob`], [`TrainRunError::NothingToResume`]
/// or [`TrainRunError::NoCompleteCheckpoint`] when the checkpoints present do not
/// fit `options`; [`TrainRunError::Worker`] when the model, a step, the loader or a
/// checkpoint fails.
pub fn run_training(
    cfg: Config,
    device: Device,
    options: RunOptions,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<RunSummary, TrainRunError> {
    let data = DataPlan::new(&cfg, device, on_event)?;
    let log_every = cfg.infra.log_every.max(1) as u64;
    let steps_per_epoch = data.steps_per_epoch();
    let total_steps = steps_per_epoch * cfg.training.num_epochs as u64;
    on_event(RunEvent::Start {
        backbone: cfg.model.backbone,
        attack: cfg.training.attack.kind,
        device,
        batch_size: cfg.training.batch_size,
        steps_per_epoch,
        out_dir: &cfg.infra.out_dir,
    });
    let config = cfg.to_json_value();
    let config_fingerprint = hsat_core::checkpoint::config_fingerprint(&config);
    let resume_from = find_resume_point(
        &cfg.infra.out_dir,
        &config,
        &config_fingerprint,
        data.fingerprint(),
        options,
        on_event,
    )?;
    if let Some((dir, manifest)) = &resume_from
        && manifest.step >= total_steps
    {
        on_event(RunEvent::Finished {
            total_steps,
            checkpoint: dir,
        });
        return Ok(RunSummary {
            final_checkpoint: Some(dir.clone()),
            already_finished: true,
            busy_seconds: 0.0,
            waiting_seconds: 0.0,
        });
    }
    let fingerprint = data.fingerprint().map(str::to_owned);
    let mut trainer = Trainer::new(cfg, device)?;
    if let Some(fingerprint) = fingerprint {
        trainer.set_dataset_fingerprint(fingerprint);
    }
    on_event(RunEvent::Model {
        parameters: trainer.model().num_parameters(),
    });
    if let Some((dir, _)) = &resume_from {
        let meta = trainer.restore(dir)?;
        tracing::info!(step = meta.step, checkpoint = %dir.display(), "resuming the job");
        on_event(RunEvent::Resumed {
            step: meta.step,
            total_steps,
            checkpoint: dir,
        });
    }
    let mut source = data.start(trainer.position())?;
    let (mut busy, mut waiting) = (0.0f64, 0.0f64);
    let first = trainer.position();
    let mut metrics_log = open_metrics_log(&trainer.checkpoint_root(), first);
    let last = trainer.fit(source.as_mut(), |report| {
        if let Some(log) = &mut metrics_log
            && let Err(err) = log.append(&metrics_record(report))
        {
            // Telemetry never stops training: warn once and stop writing.
            tracing::warn!(error = %err, "cannot append to metrics.jsonl; no more lines are written");
            metrics_log = None;
        }
        if report.step > first {
            busy += report.step_seconds;
            waiting += report.data_seconds;
        }
        if report.step % log_every == 0
            || report.step + 1 == report.total_steps
            || report.checkpoint.is_some()
        {
            on_event(RunEvent::Step(report));
        }
    })?;
    Ok(RunSummary {
        final_checkpoint: last,
        already_finished: false,
        busy_seconds: busy,
        waiting_seconds: waiting,
    })
}

/// `<out_dir>/metrics.jsonl` for this run (`checkpoints` is `<out_dir>/checkpoints`):
/// appended to when resuming, started over (the old file kept beside it) when the
/// run starts at step 0. `None`, with a warning, when it cannot be written.
fn open_metrics_log(checkpoints: &Path, first_step: u64) -> Option<hsat_metrics::MetricsLog> {
    let out_dir = checkpoints.parent().unwrap_or(checkpoints);
    let opened = if first_step == 0 {
        hsat_metrics::MetricsLog::start_over(out_dir)
    } else {
        hsat_metrics::MetricsLog::open(out_dir)
    };
    opened
        .map_err(|err| tracing::warn!(error = %err, "metrics.jsonl will not be written"))
        .ok()
}

/// The `metrics.jsonl` line of a single-process step.
fn metrics_record(report: &StepProgress) -> hsat_metrics::StepRecord {
    let telemetry = &report.telemetry;
    let seconds = report.step_seconds + report.data_seconds;
    hsat_metrics::StepRecord {
        step: report.step,
        epoch: report.epoch,
        generation: 0,
        time_unix_s: hsat_metrics::jsonl::now_unix_s(),
        world_size: 1,
        loss: hsat_metrics::jsonl::ViewLosses {
            clean: report.losses.clean,
            adversarial: report.losses.adversarial,
        },
        attack_gain: telemetry.attack_gain,
        lr: Some(telemetry.lr),
        eps: Some(telemetry.eps),
        step_seconds: Some(seconds),
        data_wait_seconds: Some(report.data_seconds),
        attack_seconds: Some(telemetry.attack_seconds),
        allreduce_seconds: Some(telemetry.allreduce_seconds),
        patches_per_second: (seconds > 0.0).then(|| telemetry.patches as f64 / seconds),
    }
}

/// The checkpoint to resume from (`None`: start at step 0), after applying
/// `options`: `--new-job` archives whatever is there, `--resume` requires a
/// checkpoint, and a checkpoint of another job is refused.
fn find_resume_point(
    out_dir: &Path,
    config: &serde_json::Value,
    config_fingerprint: &str,
    dataset_fingerprint: Option<&str>,
    options: RunOptions,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<Option<(PathBuf, Manifest)>, TrainRunError> {
    let root = out_dir.join("checkpoints");
    let present = hsat_core::checkpoint::list(&root)
        .map_err(|source| WorkerError::Checkpoint {
            dir: root.clone(),
            source,
        })?
        .len();
    if options.new_job {
        if root.exists() {
            let to = archive(out_dir, &root)?;
            on_event(RunEvent::Archived {
                from: &root,
                to: &to,
            });
        }
        return Ok(None);
    }
    if present == 0 {
        if options.resume {
            return Err(TrainRunError::NothingToResume { root });
        }
        return Ok(None);
    }
    let Some((dir, manifest)) = newest_usable(&root, None)? else {
        return Err(TrainRunError::NoCompleteCheckpoint { root });
    };
    let mut differences = Vec::new();
    if manifest.config_fingerprint != config_fingerprint {
        // The checkpoint's own config says which keys differ.
        let theirs = crate::checkpoint::read_meta(&dir)?.config;
        let listed: Vec<String> = config_differences(config, &theirs)
            .into_iter()
            .map(|d| format!("{}: {} now, {} in the job", d.key, d.found, d.expected))
            .collect();
        differences.push(if listed.is_empty() {
            format!(
                "config fingerprint {} in {}, {} now",
                short(&manifest.config_fingerprint),
                dir.display(),
                short(config_fingerprint)
            )
        } else {
            format!("config differs at {}", listed.join("; "))
        });
    }
    if manifest.dataset_fingerprint.as_deref() != dataset_fingerprint {
        differences.push(format!(
            "dataset fingerprint {} now, {} in the job",
            dataset_fingerprint.map_or("none", short),
            manifest
                .dataset_fingerprint
                .as_deref()
                .map_or("none", short),
        ));
    }
    if !differences.is_empty() {
        return Err(TrainRunError::OtherJob {
            root,
            out_dir: out_dir.to_path_buf(),
            differences: differences.join("; "),
        });
    }
    Ok(Some((dir, manifest)))
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..12.min(fingerprint.len())]
}

/// Moves `root` to `<out_dir>/archive/<unix time>/checkpoints` (a new folder each
/// time) and returns where it went.
fn archive(out_dir: &Path, root: &Path) -> Result<PathBuf, TrainRunError> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = out_dir.join("archive");
    let mut folder = base.join(seconds.to_string());
    let mut n = 1;
    while folder.exists() {
        folder = base.join(format!("{seconds}-{n}"));
        n += 1;
    }
    let to = folder.join("checkpoints");
    let moved = std::fs::create_dir_all(&folder).and_then(|()| std::fs::rename(root, &to));
    moved.map_err(|source| TrainRunError::Archive {
        from: root.to_path_buf(),
        to: to.clone(),
        source,
    })?;
    Ok(to)
}

/// The configured source of training batches, before it starts: file datasets are
/// indexed and checked for missing files before any training starts.
enum DataPlan {
    Synthetic(SyntheticSource),
    Files {
        index: Arc<DatasetIndex>,
        balanced: Arc<Vec<usize>>,
        spec: LoaderSpec,
    },
}

impl DataPlan {
    fn new(
        cfg: &Config,
        device: Device,
        on_event: &mut dyn FnMut(RunEvent<'_>),
    ) -> Result<Self, TrainRunError> {
        let sampling = cfg.data.hidisc;
        if let DataSource::Synthetic = cfg.data.source {
            let spec = SyntheticSpec {
                num_patients: cfg.data.synthetic.num_patients,
                num_classes: cfg.data.synthetic.num_classes,
                batch_size: cfg.training.batch_size,
                slides: sampling.num_slide_samples,
                patches: sampling.num_patch_samples,
                views: sampling.num_transforms,
                image_size: cfg.data.image_size,
                seed: cfg.infra.seed,
            };
            return Ok(DataPlan::Synthetic(SyntheticSource::new(spec, device)?));
        }
        let index = open_dataset(&cfg.data)?;
        on_event(RunEvent::Dataset {
            patients: index.patients.len(),
            train_patients: index.patients_in(Split::Train).len(),
            patches: index.num_patches(),
            fingerprint: &index.fingerprint,
        });
        let balanced = balanced_patients(
            &index,
            Split::Train,
            cfg.infra.seed,
            cfg.data.balance_study_per_class,
        );
        Ok(DataPlan::Files {
            index: Arc::new(index),
            balanced: Arc::new(balanced),
            spec: LoaderSpec::from_config(cfg),
        })
    }

    fn steps_per_epoch(&self) -> u64 {
        match self {
            DataPlan::Synthetic(source) => source.steps_per_epoch(),
            DataPlan::Files { balanced, spec, .. } => {
                steps_per_epoch(balanced.len(), spec.batch_size)
            }
        }
    }

    /// The dataset index fingerprint (none for in-memory data).
    fn fingerprint(&self) -> Option<&str> {
        match self {
            DataPlan::Synthetic(_) => None,
            DataPlan::Files { index, .. } => Some(&index.fingerprint),
        }
    }

    /// Starts producing batches from step `start_step` on.
    fn start(self, start_step: u64) -> Result<Box<dyn BatchSource>, TrainRunError> {
        Ok(match self {
            DataPlan::Synthetic(source) => Box::new(source),
            DataPlan::Files {
                index,
                balanced,
                spec,
            } => Box::new(FileSource::start(index, balanced, spec, start_step)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RunSummary;

    #[test]
    fn the_waiting_share_is_undefined_without_a_timed_step() {
        let summary = |busy, waiting| RunSummary {
            final_checkpoint: None,
            already_finished: false,
            busy_seconds: busy,
            waiting_seconds: waiting,
        };
        assert_eq!(summary(0.0, 0.0).waiting_share(), None);
        assert_eq!(summary(3.0, 1.0).waiting_share(), Some(0.25));
    }
}
