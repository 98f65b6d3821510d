//! `hsat run` without `--workers` as one call ([`run_training`]): a training job in
//! this process. Picks the batch source the config names (the in-memory generator,
//! or files on disk, indexed and checked before any step), trains with the
//! [`Trainer`] loop and measures how long training waited for data. What happens
//! along the way is reported through [`RunEvent`]s; the caller prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsat_core::config::{AttackKind, Backbone, Config, DataSource};
use hsat_core::dataset::Split;
use hsat_core::sampler::balanced_patients;
use hsat_data::check::{DatasetCheckError, open_dataset};
use hsat_data::loader::LoaderSpec;
use tch::Device;

use super::trainer::{StepProgress, Trainer};
use crate::data::synthetic::{SyntheticSource, SyntheticSpec};
use crate::data::{BatchSource, FileSource};
use crate::error::WorkerError;

/// Why a training run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainRunError {
    /// The dataset cannot be indexed or has errors.
    #[error(transparent)]
    Dataset(#[from] DatasetCheckError),
    /// The model, a step, the loader or a checkpoint failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
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
    /// A step finished that `infra.log_every` selects (every `log_every`-th step), or
    /// the last one, or one that wrote a checkpoint.
    Step(&'a StepProgress),
}

/// How a finished run went.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The last checkpoint written; `None` when there was nothing to train.
    pub final_checkpoint: Option<PathBuf>,
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

/// Trains the job `cfg` describes on `device`, in this process.
///
/// # Errors
///
/// [`TrainRunError::Dataset`] before any step when a file dataset cannot be indexed
/// or has errors; [`TrainRunError::Worker`] when the model, a step, the loader or a
/// checkpoint fails.
pub fn run_training(
    cfg: Config,
    device: Device,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<RunSummary, TrainRunError> {
    let (mut source, fingerprint) = batch_source(&cfg, device, on_event)?;
    let log_every = cfg.infra.log_every.max(1) as u64;
    on_event(RunEvent::Start {
        backbone: cfg.model.backbone,
        attack: cfg.training.attack.kind,
        device,
        batch_size: cfg.training.batch_size,
        steps_per_epoch: source.steps_per_epoch(),
        out_dir: &cfg.infra.out_dir,
    });
    let mut trainer = Trainer::new(cfg, device)?;
    if let Some(fingerprint) = fingerprint {
        trainer.set_dataset_fingerprint(fingerprint);
    }
    on_event(RunEvent::Model {
        parameters: trainer.model().num_parameters(),
    });
    let (mut busy, mut waiting) = (0.0f64, 0.0f64);
    let last = trainer.fit(source.as_mut(), |report| {
        if report.step > 0 {
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
        busy_seconds: busy,
        waiting_seconds: waiting,
    })
}

/// The configured source of training batches; file datasets are indexed and checked
/// for missing files before any training starts. Returns the index fingerprint too.
fn batch_source(
    cfg: &Config,
    device: Device,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<(Box<dyn BatchSource>, Option<String>), TrainRunError> {
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
        return Ok((Box::new(SyntheticSource::new(spec, device)?), None));
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
    let spec = LoaderSpec::from_config(cfg);
    let fingerprint = index.fingerprint.clone();
    let source = FileSource::start(Arc::new(index), Arc::new(balanced), spec, 0)?;
    Ok((Box::new(source), Some(fingerprint)))
}

#[cfg(test)]
mod tests {
    use super::RunSummary;

    #[test]
    fn the_waiting_share_is_undefined_without_a_timed_step() {
        let summary = |busy, waiting| RunSummary {
            final_checkpoint: None,
            busy_seconds: busy,
            waiting_seconds: waiting,
        };
        assert_eq!(summary(0.0, 0.0).waiting_share(), None);
        assert_eq!(summary(3.0, 1.0).waiting_share(), Some(0.25));
    }
}
