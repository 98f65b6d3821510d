//! One rank's share of a distributed step: the glue between the trainer and the
//! collectives that the worker process (`crate::cluster`) and the tests share.
//!
//! ```text
//!   install sync BN (training.sync_bn, world > 1)
//!   -> train_shard: PGD (global loss: one row all-gather per iteration),
//!      forward passes (sync BN: one all-gather per batch-norm layer),
//!      backward (sync BN: one all-reduce per layer), gradient SUM all-reduce
//!   -> without sync BN: rank 0's batch-norm buffers to every rank
//!   -> remove sync BN
//! ```
//!
//! Gradients are always summed across ranks: with `training.loss_scope = "local"`
//! each rank's loss is first scaled by its share of the step's patients (so the sum
//! is the patient-weighted mean, and with sync BN the cross-rank terms of the
//! batch-norm backward carry the same weights); with `"global"` every rank
//! differentiates the loss of the whole step through its own rows, and the sum is
//! exactly the whole-batch gradient.

use std::sync::Arc;
use std::time::Instant;

use hsat_core::config::LossScope;
use hsat_core::telemetry::StepTelemetry;

use super::step::{GlobalRows, StepLosses, StepScope};
use super::trainer::{ShardStep, Trainer};
use crate::collective::{
    BatchNormSync, GradientSync, ProcessGroup, all_gather_rows, broadcast_state,
};
use crate::error::Result;

/// The collectives of one rank in its current generation.
pub struct RankCollectives<'a> {
    /// The generation's process group.
    pub group: &'a ProcessGroup,
    /// Gradient buckets (kept across steps).
    pub gradients: &'a mut GradientSync,
    /// Synchronised batch norm on `group` (`None`: each rank normalises its shard).
    pub batch_norm: Option<Arc<BatchNormSync>>,
    /// Bucket size of the buffer broadcast.
    pub bucket_bytes: usize,
}

impl RankCollectives<'_> {
    /// The synchronised batch norm the config asks for on `group`: `None` when
    /// `training.sync_bn` is off or the group has a single rank.
    pub fn batch_norm_for(
        group: &ProcessGroup,
        sync_bn: bool,
    ) -> Result<Option<Arc<BatchNormSync>>> {
        if !sync_bn || group.world_size() < 2 {
            return Ok(None);
        }
        Ok(Some(Arc::new(BatchNormSync::new(group)?)))
    }
}

/// Trains this rank's `shard` of a step with the other ranks of `collectives.group`;
/// every rank of the group must call it for the same step. The model holds the
/// synchronised batch norm only while the step runs (also on an error path).
pub fn train_rank_shard(
    trainer: &mut Trainer,
    collectives: RankCollectives<'_>,
    shard: ShardStep<'_>,
) -> Result<(Option<StepLosses>, StepTelemetry)> {
    let RankCollectives {
        group,
        gradients,
        batch_norm,
        bucket_bytes,
    } = collectives;
    let synced_bn = batch_norm.is_some();
    let local = shard.images.size().first().copied().unwrap_or(0);
    let global = shard.global_patients;
    let first_row = shard.first_row;
    let scope = match trainer.config().training.loss_scope {
        LossScope::Global if group.world_size() > 1 => StepScope {
            loss_weight: 1.0,
            global: Some(GlobalRows {
                gather: Box::new(move |rows: &tch::Tensor| {
                    Ok(all_gather_rows(group, rows, first_row, global)?)
                }),
                first_row,
            }),
        },
        _ => StepScope {
            loss_weight: local as f64 / global.max(1) as f64,
            global: None,
        },
    };
    let mut sync = |params: &[(String, tch::Tensor)]| -> Result<()> {
        let tensors: Vec<tch::Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        // Scale 1: the losses already carry their weights; summing is the whole-step
        // gradient.
        gradients.average(group, &tensors, 1.0, 1.0)?;
        Ok(())
    };
    trainer.model().set_batch_norm_sync(batch_norm);
    let trained = trainer.train_shard(shard, scope, &mut sync);
    trainer.model().set_batch_norm_sync(None);
    let (losses, mut telemetry) = trained?;
    if !synced_bn {
        // Each rank's batch-norm statistics come from its own shard; take rank 0's,
        // as DDP does, so that all ranks stay identical. (Synchronised batch norm
        // updates every rank's statistics from the same global ones.)
        let broadcast = Instant::now();
        broadcast_state(group, &trainer.buffers(), 0, bucket_bytes)?;
        telemetry.allreduce_seconds += broadcast.elapsed().as_secs_f64();
    }
    Ok((losses, telemetry))
}
