//! Where the engine's training batches come from: plain-memory batches from
//! [`hsat_data`] become tensors here, and nowhere else.
//!
//! - [`BatchSource`]: what the training loop pulls from.
//! - [`FileSource`]: the file-backed loader of hsat-data, as tensors.
//! - [`synthetic`]: an in-memory source with patient/slide/patch structure, so the
//!   engine is usable without files.

pub mod synthetic;

use std::sync::Arc;

use crossbeam_channel::Receiver;
use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::StepPlan;
use hsat_data::loader::{HostBatch, LoadStats, Loader, LoaderSpec};
use tch::Tensor;

use crate::error::Result;

/// One hierarchical batch.
#[derive(Debug)]
pub struct Batch {
    /// Global step this batch belongs to.
    pub step: u64,
    /// Epoch of that step.
    pub epoch: u64,
    /// Images `[B, S, P, V, C, H, W]`, float, in [0, 1].
    pub images: Tensor,
    /// Class label of each of the B patients.
    pub labels: Vec<u32>,
}

impl Batch {
    /// The tensor form of a loaded batch (on the CPU).
    pub fn from_host(host: HostBatch) -> Result<Batch> {
        let shape = host.shape.map(|d| d as i64);
        let images = Tensor::f_from_slice(&host.pixels)?.f_reshape(shape)?;
        Ok(Batch {
            step: host.step,
            epoch: host.epoch,
            images,
            labels: host.labels,
        })
    }
}

/// A deterministic supply of batches: `batch(step)` depends only on the source's
/// configuration and `step`, never on timing or on which worker asks.
pub trait BatchSource {
    /// Steps that make one pass over the (balanced) patient list.
    fn steps_per_epoch(&self) -> u64;

    /// The batch of global step `step`.
    fn batch(&mut self, step: u64) -> Result<Batch>;
}

/// The file-backed [`BatchSource`]: hsat-data's threaded [`Loader`].
pub struct FileSource {
    loader: Loader,
    last_stats: LoadStats,
}

impl FileSource {
    /// Starts loading sampler-planned steps from `start_step` on ([`Loader::start`]).
    pub fn start(
        index: Arc<DatasetIndex>,
        balanced: Arc<Vec<usize>>,
        spec: LoaderSpec,
        start_step: u64,
    ) -> Result<Self> {
        Ok(Self::new(Loader::start(index, balanced, spec, start_step)?))
    }

    /// Starts loading the plans received on `plans`, in order
    /// ([`Loader::start_with_plans`]).
    pub fn start_with_plans(
        index: Arc<DatasetIndex>,
        spec: LoaderSpec,
        steps_per_epoch: u64,
        plans: Receiver<StepPlan>,
    ) -> Result<Self> {
        Ok(Self::new(Loader::start_with_plans(
            index,
            spec,
            steps_per_epoch,
            plans,
        )?))
    }

    fn new(loader: Loader) -> Self {
        FileSource {
            loader,
            last_stats: LoadStats::default(),
        }
    }

    /// What went wrong while loading the last batch handed out.
    pub fn last_stats(&self) -> &LoadStats {
        &self.last_stats
    }
}

impl BatchSource for FileSource {
    fn steps_per_epoch(&self) -> u64 {
        self.loader.steps_per_epoch()
    }

    fn batch(&mut self, step: u64) -> Result<Batch> {
        let mut host = self.loader.next_batch(step)?;
        self.last_stats = std::mem::take(&mut host.stats);
        Batch::from_host(host)
    }
}
