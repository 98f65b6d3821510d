//! hsat-worker: the HSAT engine and the worker process around it.
//!
//! In the pipeline (see `architecture.md`) the worker takes hierarchical batches,
//! crafts PGD adversarial examples against the multi-level contrastive loss, trains
//! on them and writes checkpoints. It is the only crate that links libtorch.
//!
//! - [`model`]: backbones (ResNet-18/34/50/101, Wide-ResNet-50-2, a small CNN),
//!   projection head, L2 normalisation; torchvision state-dict names.
//! - [`train`]: hierarchical loss, PGD, AdamW, the training step and loop.
//! - [`data`]: the batch source trait, hsat-data batches as tensors, an in-memory
//!   synthetic source.
//! - [`checkpoint`]: checkpoint directories of the complete training state (model,
//!   AdamW state, position) with a manifest, verified on load; the asynchronous writer.
//! - [`cluster`]: the worker process of a distributed job (coordinator client loop).
//! - [`collective`]: c10d process groups, bucketed gradient averaging, state broadcast.
//! - [`metrics`]: the worker's Prometheus metrics (`hsat_worker_*`).
//! - [`eval`]: features, white-box and transfer attacks for `hsat eval`.
//! - [`repro`]: `hsat repro`, HSAT against HiDisc over several seeds, with intervals.
//! - [`bench`](mod@bench): benchmarks against PyTorch (`hsat bench step|data|sync`).
//! - [`error`]: the crate's error type.
//!
//! Library code uses tch's fallible `f_*` calls and returns [`error::WorkerError`].

pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod collective;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod repro;
pub mod train;

pub use error::{Result, WorkerError};
