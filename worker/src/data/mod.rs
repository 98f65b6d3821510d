//! Where training batches come from.
//!
//! - [`BatchSource`]: what the training loop pulls from.
//! - [`synthetic`]: an in-memory source with patient/slide/patch structure, so the
//!   engine is usable without files.
//! - [`image`]: decoding (TIFF incl. 2-channel 16-bit, PNG, JPEG), base processing
//!   and the HiDisc augmentations, in plain Rust on CPU.
//! - [`loader`]: the file-backed source: sampler plan, thread pool, prefetch queue.
//! - [`synth`]: `hsat synth`, a generator of realistic datasets on disk.

pub mod image;
pub mod loader;
pub mod synth;
pub mod synthetic;

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

/// A deterministic supply of batches: `batch(step)` depends only on the source's
/// configuration and `step`, never on timing or on which worker asks.
pub trait BatchSource {
    /// Steps that make one pass over the (balanced) patient list.
    fn steps_per_epoch(&self) -> u64;

    /// The batch of global step `step`.
    fn batch(&mut self, step: u64) -> Result<Batch>;
}
