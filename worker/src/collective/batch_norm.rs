//! Synchronised batch norm (PyTorch's `SyncBatchNorm`): in train mode, every rank
//! normalises its shard with the statistics of the whole step, and the backward pass
//! reduces the matching sums across ranks, so the result equals batch norm over the
//! concatenation of all shards (empty shards included: they join every collective
//! with count 0 and get zero gradients).
//!
//! The math runs in the C++ shim as a `torch::autograd::Function` (forward: one
//! all-gather of each rank's count, mean and sum of squared deviations per channel;
//! backward: one all-reduce of `sum dy` and `sum dy (x - mean)`), on the group's own
//! c10d backend (Gloo or NCCL). Weight and bias gradients stay local: the gradient
//! sync sums them like every other parameter's.

use tch::Tensor;

use super::error::{CollectiveError, GroupContext};
use super::ffi::RawBnGroup;
use super::group::ProcessGroup;

/// A handle on a group's backend for synchronised batch norm, installed in a model
/// (`Encoder::set_batch_norm_sync`) for the steps of one generation. It keeps the
/// backend alive but never shuts it down: drop it with (or before) the generation.
#[derive(Debug)]
pub struct BatchNormSync {
    raw: RawBnGroup,
    context: GroupContext,
}

impl BatchNormSync {
    /// Synchronised batch norm over `pg`'s ranks.
    pub fn new(pg: &ProcessGroup) -> Result<Self, CollectiveError> {
        let context = pg.context("sync_batch_norm");
        let raw =
            RawBnGroup::new(pg.raw()).map_err(|e| CollectiveError::from_raw(e, context.clone()))?;
        Ok(BatchNormSync { raw, context })
    }

    /// Ranks whose statistics are combined.
    pub fn world_size(&self) -> usize {
        self.context.world_size
    }

    /// Batch norm of `input` `[N, C, ...]` (`N` may be 0) in train mode with the
    /// statistics of all ranks' inputs; updates `running_mean`/`running_var` with
    /// `momentum` as PyTorch does (unbiased variance over the global count). The result
    /// is differentiable in `input`, `weight` and `bias`; its backward pass runs a
    /// collective, so every rank must call this in the same order and back-propagate.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor, CollectiveError> {
        self.raw
            .batch_norm(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
            )
            .map_err(|e| CollectiveError::from_raw(e, self.context.clone()))
    }

    /// The collective failure of a backward pass since the last call, if any: the
    /// autograd engine reports it as a plain libtorch error, and this says which kind
    /// (a peer lost or hung needs a regroup).
    pub fn take_backward_failure(&self) -> Option<CollectiveError> {
        let mut context = self.context.clone();
        context.op = "sync_batch_norm backward";
        self.raw
            .take_failure()
            .map(|e| CollectiveError::from_raw(e, context))
    }
}
