//! hsat-data: the data pipeline, from files on disk to plain-memory training batches.
//!
//! In the pipeline (see `ARCHITECTURE.md`) it sits between the sampler (hsat-core,
//! which decides *what* each step holds) and the engine (hsat-worker, which turns a
//! [`loader::HostBatch`] into a tensor). Nothing here links libtorch, so the pipeline
//! builds and tests on a machine without the PyTorch wheel.
//!
//! - [`image`]: decoding (TIFF incl. 2-channel 16-bit, PNG, JPEG), base processing and
//!   the HiDisc augmentation set, in plain Rust on CPU, matched against torchvision.
//! - [`loader`]: a step plan -> decode jobs (pure), a pool of decode threads, the jobs'
//!   results -> one batch with the fallback rules applied (pure), a prefetch queue.
//! - [`synth`]: `hsat synth`, a generator of realistic datasets on disk.
//! - [`check`]: `hsat data check`, the index and every patch decoded, with a report.
//! - [`plot`]: the PNG plots of an `hsat eval` report and of a run's
//!   `metrics.jsonl` (`hsat plot`).
//! - [`metrics_log`]: reading a run's `metrics.jsonl`.
//! - [`error`]: the loader's error type.

pub mod check;
pub mod error;
pub mod image;
pub mod loader;
pub mod metrics_log;
pub mod plot;
pub mod synth;

pub use error::DataError;
