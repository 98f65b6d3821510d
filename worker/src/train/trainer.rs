//! The single-worker training loop: schedules (learning rate, attack epsilon,
//! dynamic augmentation strength) from the config, one [`train_step`](super::step::train_step) per batch,
//! progress reports, and checkpoints every N steps and at the end.
//!
//! The trainer owns the complete training state (model, AdamW moments and update
//! counter, position): [`Trainer::snapshot`] copies it to host memory at a step
//! boundary for a checkpoint, and [`Trainer::restore`] puts a verified checkpoint
//! back, after which training continues exactly as if it had never stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hsat_core::config::{AttackKind, Config};
use hsat_core::rng::derive_seed;
use hsat_core::schedule::{attack_eps, dynamic_strength, dynamic_weight};
use hsat_core::telemetry::StepTelemetry;
use tch::Device;

use super::attack::{Pgd, PgdVariant};
use super::loss::HierarchicalLoss;
use super::optim::AdamW;
use super::step::{
    GradientHook, OuterObjective, StepInputs, StepLosses, StepScope, train_step_measured,
};
use crate::checkpoint::writer::WriterOptions;
use crate::checkpoint::{
    CheckpointMeta, CheckpointWriter, FORMAT_VERSION, OPTIMIZER_FILE, Snapshot, open_for_resume,
};
use crate::data::BatchSource;
use crate::error::{Result, WorkerError};
use crate::model::Encoder;

/// What one step reports to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProgress {
    /// Global step, 0-based.
    pub step: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Attack radius used (pixel units), 0 without attack.
    pub eps: f64,
    /// Losses measured.
    pub losses: StepLosses,
    /// Wall time of the step, batch creation excluded.
    pub step_seconds: f64,
    /// Wall time spent getting the batch.
    pub data_seconds: f64,
    /// Attack gain, phase durations and patches of the step.
    pub telemetry: StepTelemetry,
    /// Checkpoint of the state after this step, if one is taken: complete on disk
    /// when synchronous, being written in the background when asynchronous (it
    /// completes before the next checkpoint starts and before the run returns).
    pub checkpoint: Option<PathBuf>,
}

/// A rank's share of one global step.
#[derive(Debug)]
pub struct ShardStep<'a> {
    /// Global step, 0-based.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Total steps of the job (the learning-rate schedule needs it).
    pub total_steps: u64,
    /// This rank's images `[b, S, P, V, C, H, W]`; `b` may be 0.
    pub images: &'a tch::Tensor,
    /// Patients in the whole step over all ranks.
    pub global_patients: i64,
    /// Row of this shard's first patient in the whole step.
    pub first_row: i64,
}

/// Model, optimiser and schedules of one training run.
pub struct Trainer {
    config: Config,
    model: Encoder,
    optimizer: AdamW,
    loss: HierarchicalLoss,
    step: u64,
    dataset_fingerprint: Option<String>,
    /// [`hsat_core::checkpoint::config_fingerprint`] of the config, for checkpoints.
    config_fingerprint: String,
}

impl Trainer {
    /// Builds the model (loading `model.init_checkpoint` if set) and the optimiser.
    pub fn new(config: Config, device: Device) -> Result<Self> {
        if config.infra.threads > 0 {
            tch::set_num_threads(config.infra.threads as i32);
        }
        tch::manual_seed(config.infra.seed as i64);
        if let Some(note) = config
            .training
            .attack
            .warmup_note(config.training.num_epochs)
        {
            tracing::warn!("{note}");
        }
        let model = Encoder::from_config(&config.model, device)?;
        // The batch-norm branches the training forward passes use (dual-BN backbones):
        // clean passes `normal`, adversarial ones `pgd`.
        let attack = config.training.attack.is_pgd();
        let normal = !attack || !config.training.only_adv;
        let optimizer = AdamW::new(
            model.trained_parameters(normal, attack),
            &config.training.optimizer,
        )?;
        let loss = HierarchicalLoss::from(&config.training.objective);
        let config_fingerprint = hsat_core::checkpoint::config_fingerprint(&config.to_json_value());
        Ok(Trainer {
            config,
            model,
            optimizer,
            loss,
            step: 0,
            dataset_fingerprint: None,
            config_fingerprint,
        })
    }

    /// Records the fingerprint of the dataset index in every checkpoint.
    pub fn set_dataset_fingerprint(&mut self, fingerprint: String) {
        self.dataset_fingerprint = Some(fingerprint);
    }

    /// The config of the run.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The model being trained.
    pub fn model(&self) -> &Encoder {
        &self.model
    }

    /// Every tensor that must be equal on all ranks: parameters, buffers (batch-norm
    /// statistics) and optimiser moments, in a fixed order (shallow clones).
    pub fn replicated_state(&self) -> Vec<tch::Tensor> {
        let mut tensors: Vec<tch::Tensor> = self
            .model
            .state()
            .into_iter()
            .map(|(_, tensor)| tensor)
            .collect();
        tensors.extend(self.optimizer.moment_tensors());
        tensors
    }

    /// The model's buffers (batch-norm running statistics), which each rank updates
    /// from its own shard: distributed runs take rank 0's after every step, as
    /// PyTorch DDP does (`broadcast_buffers=True`).
    pub fn buffers(&self) -> Vec<tch::Tensor> {
        let params: Vec<tch::Tensor> = self
            .optimizer
            .params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        self.model
            .state()
            .into_iter()
            .map(|(_, tensor)| tensor)
            .filter(|tensor| !params.iter().any(|p| p.data_ptr() == tensor.data_ptr()))
            .collect()
    }

    /// Moves the trainer to `step` (steps already applied) after its state was
    /// replaced by another rank's.
    pub fn set_position(&mut self, step: u64) {
        self.step = step;
        self.optimizer.set_steps_taken(step);
    }

    /// Steps applied so far.
    pub fn position(&self) -> u64 {
        self.step
    }

    /// The config fingerprint recorded in checkpoints.
    pub fn config_fingerprint(&self) -> &str {
        &self.config_fingerprint
    }

    /// Puts the complete training state of checkpoint `dir` back: verifies its
    /// manifest first (a missing, truncated or altered file is an error naming it),
    /// then loads the model, the AdamW moments and update counter, and moves to its
    /// step. Returns its metadata.
    pub fn restore(&mut self, dir: &Path) -> Result<CheckpointMeta> {
        let (_, meta) = open_for_resume(dir)?;
        self.model.load(dir)?;
        let optimizer_file = dir.join(OPTIMIZER_FILE);
        let entries =
            tch::Tensor::read_safetensors(&optimizer_file).map_err(|err| WorkerError::Weights {
                path: optimizer_file.clone(),
                reason: format!("cannot read it as safetensors ({err})"),
            })?;
        self.optimizer.restore_state(entries, &optimizer_file)?;
        self.step = meta.step;
        tracing::info!(checkpoint = %dir.display(), step = meta.step, "restored the training state");
        Ok(meta)
    }

    /// The complete training state after the last step, copied to host memory (see
    /// [`crate::checkpoint`]): `epoch` of that step, its losses, and the mean loss
    /// since the previous checkpoint.
    pub fn snapshot(
        &self,
        epoch: u64,
        last_step: Option<StepLosses>,
        mean_total_loss: Option<f64>,
    ) -> Result<Snapshot> {
        let model = self.model.state_snapshot()?;
        let optimizer = self.optimizer.state_snapshot()?;
        Ok(Snapshot {
            backbone: model.backbone,
            backbone_pgd: model.backbone_pgd,
            head: model.head,
            optimizer,
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                step: self.step,
                epoch,
                hsat_version: hsat_proto::HSAT_VERSION.to_owned(),
                backbone: self.model.kind().to_string(),
                feature_dim: self.model.feature_dim(),
                config: self.config.to_json_value(),
                config_fingerprint: self.config_fingerprint.clone(),
                last_step,
                mean_total_loss,
                dataset_fingerprint: self.dataset_fingerprint.clone(),
            },
        })
    }

    /// Where checkpoints go: `<infra.out_dir>/checkpoints`.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.config.infra.out_dir.join("checkpoints")
    }

    /// Trains from the current position to the end of `training.num_epochs` epochs
    /// of `source`, calling `on_step` after each step. Checkpoints are written with
    /// retention applied after each (in the background when
    /// `training.async_checkpoints`); the last one is complete when this returns,
    /// and its directory is returned.
    pub fn fit(
        &mut self,
        source: &mut dyn BatchSource,
        mut on_step: impl FnMut(&StepProgress),
    ) -> Result<Option<PathBuf>> {
        let steps_per_epoch = source.steps_per_epoch();
        let total_steps = steps_per_epoch * self.config.training.num_epochs as u64;
        let interval = self.config.training.save_checkpoint_interval as u64;
        let mut writer = CheckpointWriter::new(WriterOptions {
            root: self.checkpoint_root(),
            asynchronous: self.config.training.async_checkpoints,
            retention: Some(self.config.training.retention()),
        });
        let mut last_checkpoint = None;
        let mut since_checkpoint = (0.0f64, 0u64);
        while self.step < total_steps {
            let started = Instant::now();
            let batch = source.batch(self.step)?;
            let images = batch.images.f_to_device(self.model.device())?;
            let data_seconds = started.elapsed().as_secs_f64();
            let (losses, telemetry) = self.step_on(&images, batch.epoch, total_steps)?;
            let (lr, eps) = (telemetry.lr, telemetry.eps);
            let step_seconds = started.elapsed().as_secs_f64() - data_seconds;
            since_checkpoint = (since_checkpoint.0 + losses.total, since_checkpoint.1 + 1);
            let due =
                (interval > 0 && self.step.is_multiple_of(interval)) || self.step == total_steps;
            let checkpoint = if due {
                let mean = since_checkpoint.0 / since_checkpoint.1 as f64;
                since_checkpoint = (0.0, 0);
                let snapshot = self.snapshot(batch.epoch, Some(losses), Some(mean))?;
                let dir = self
                    .checkpoint_root()
                    .join(crate::checkpoint::checkpoint_dir_name(self.step));
                writer.submit(snapshot)?;
                Some(dir)
            } else {
                None
            };
            if checkpoint.is_some() {
                last_checkpoint.clone_from(&checkpoint);
            }
            on_step(&StepProgress {
                step: self.step - 1,
                total_steps,
                epoch: batch.epoch,
                lr,
                eps,
                losses,
                step_seconds,
                data_seconds,
                telemetry,
                checkpoint,
            });
        }
        writer.finish()?;
        Ok(last_checkpoint)
    }

    /// One step on `images` at `epoch`: returns the losses and the telemetry.
    fn step_on(
        &mut self,
        images: &tch::Tensor,
        epoch: u64,
        total_steps: u64,
    ) -> Result<(StepLosses, StepTelemetry)> {
        let rows = images.size().first().copied().unwrap_or(0);
        let shard = ShardStep {
            step: self.step,
            epoch,
            total_steps,
            images,
            global_patients: rows,
            first_row: 0,
        };
        let (losses, telemetry) =
            self.train_shard(shard, StepScope::whole_batch(), &mut |_| Ok(()))?;
        let losses = losses.ok_or(crate::error::WorkerError::EmptyStep { step: self.step })?;
        Ok((losses, telemetry))
    }

    /// One step on this rank's share of a global step; `scope` says what its loss
    /// covers and weighs, `sync` sums the gradients across ranks between backward and
    /// update (see [`train_step_synced`](super::step::train_step_synced)). Returns the
    /// losses (`None` for an empty shard with a local loss) and the telemetry: learning rate and eps
    /// used, the attack's gain, the attack's and `sync`'s time, the shard's patches.
    /// Afterwards the trainer's position is `shard.step + 1`.
    ///
    /// When the objective has no clean forward pass (`training.only_adv`) the clean
    /// losses are measured every `metrics.clean_loss_every` steps by a forward pass
    /// without gradients before the attack; the batch-norm statistics it updates are
    /// put back, so what is trained does not change.
    pub fn train_shard(
        &mut self,
        shard: ShardStep<'_>,
        mut scope: StepScope<'_>,
        sync: &mut GradientHook<'_>,
    ) -> Result<(Option<StepLosses>, StepTelemetry)> {
        let ShardStep {
            step,
            epoch,
            total_steps,
            images,
            global_patients,
            first_row,
        } = shard;
        self.step = step;
        let training = &self.config.training;
        let epoch_index = epoch as usize;
        let lr = training.lr_at(self.step as usize, total_steps as usize);
        let attack = match training.attack.kind {
            AttackKind::None => None,
            AttackKind::Pgd | AttackKind::Pgd2 => {
                let pgd = Pgd {
                    variant: match training.attack.kind {
                        AttackKind::Pgd2 => PgdVariant::Pgd2,
                        _ => PgdVariant::Pgd,
                    },
                    eps: attack_eps(
                        epoch_index,
                        training.attack.eps_255,
                        training.attack.warmup_epochs,
                    ),
                    alpha: training.attack.alpha,
                    iters: training.attack.iters,
                    loss_type: training.attack.loss_type,
                };
                // The random start depends on (seed, step) only: it is drawn for the
                // whole step and each rank takes its rows, so it does not depend on
                // the number of ranks either.
                tch::manual_seed(
                    derive_seed(self.config.infra.seed, &[0x00a7_7ac4, self.step]) as i64,
                );
                let mut whole = images.size();
                if let Some(rows) = whole.first_mut() {
                    *rows = global_patients.max(first_row + images.size()[0]);
                }
                let template = tch::Tensor::f_zeros(&whole, (tch::Kind::Float, images.device()))?;
                let delta0 =
                    pgd.random_start(&template)?
                        .f_narrow(0, first_row, images.size()[0])?;
                Some((pgd, delta0))
            }
        };
        let eps = attack.as_ref().map_or(0.0, |(pgd, _)| pgd.eps);
        let objective = match (&attack, training.only_adv) {
            (None, _) => OuterObjective::Clean,
            (Some(_), true) => OuterObjective::OnlyAdv,
            (Some(_), false) => {
                let strength = dynamic_strength(epoch_index, training.num_epochs);
                OuterObjective::Mixed {
                    weight: dynamic_weight(
                        training.dynamic_weights_lamda,
                        strength,
                        self.config.data.dynamic_aug,
                    ),
                }
            }
        };
        // The training forward pass updates the batch-norm running statistics before
        // the gradients are averaged. A step abandoned because a collective failed (a
        // peer died) must leave this rank exactly at `step` applied steps: the
        // coordinator may make it the state every rank continues from.
        let buffers = self.buffers();
        let saved: Vec<tch::Tensor> = buffers.iter().map(tch::Tensor::copy).collect();
        let put_back = || {
            tch::no_grad(|| {
                for (buffer, before) in buffers.iter().zip(&saved) {
                    buffer.shallow_clone().copy_(before);
                }
            });
        };
        let rows = images.size().first().copied().unwrap_or(0);
        // With synchronised batch norm or a global loss an empty shard measures too:
        // its peers wait for the collectives of this forward pass.
        let joins_collectives = self.model.batch_norm_sync().is_some() || scope.global.is_some();
        let measure_clean = objective == OuterObjective::OnlyAdv
            && (rows > 0 || joins_collectives)
            && self.config.metrics.clean_loss_at(step);
        let clean = if measure_clean {
            // Train mode, as the adversarial loss it is compared with; batch
            // statistics normalise, so the running statistics put back below do
            // not change this value.
            let measured = tch::no_grad(|| -> Result<_> {
                let emb = self.model.embed_batch(images, crate::model::Pass::TRAIN)?;
                scope
                    .loss(&self.loss, &emb, hsat_core::config::LossType::P_S_PT)?
                    .map(|parts| parts.values())
                    .transpose()
            });
            put_back();
            measured?
        } else {
            None
        };
        let result = train_step_measured(
            &self.model,
            &self.loss,
            &mut self.optimizer,
            StepInputs {
                images,
                attack,
                objective,
                lr,
            },
            scope,
            sync,
            true,
        );
        if result.is_err() {
            put_back();
        }
        let (losses, measures) = result?;
        let losses = losses.map(|mut losses| {
            losses.clean = losses.clean.or(clean);
            losses
        });
        self.step = step + 1;
        let shape = images.size();
        let patches = shape.iter().take(3).product::<i64>().max(0) as u64;
        let telemetry = StepTelemetry {
            attack_gain: measures.attack_gain,
            eps,
            lr,
            attack_seconds: measures.attack_seconds,
            allreduce_seconds: measures.sync_seconds,
            patches: if rows > 0 { patches } else { 0 },
        };
        Ok((losses, telemetry))
    }
}
