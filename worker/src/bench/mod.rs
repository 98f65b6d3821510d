//! Benchmarks against PyTorch (`hsat bench step|data|sync`): each times this
//! engine and the Python reference in `bench/*.py` in the same run, alternating, so
//! the ratio holds on whatever machine runs it; and `hsat bench checkpoint`, which
//! compares synchronous and asynchronous checkpoints in one run. The CLI parses
//! flags into the options here, calls one function and prints what comes back.
//!
//! - [`step`]: one full HSAT step against `bench/reference_step.py`.
//! - [`data`]: loader throughput against torchvision (`bench/augment_reference.py`),
//!   then the share of step time a training run waits for data.
//! - [`checkpoint`]: the stall a synchronous and an asynchronous checkpoint add
//!   to a ResNet-50 step.
//! - [`sync`]: gradient averaging of two local processes against PyTorch DDP
//!   (`bench/ddp_sync_reference.py`).
//! - [`distributed`]: a whole distributed step of two local processes with
//!   `training.loss_scope` local/global and `training.sync_bn` off/on, timed against
//!   the local scope without sync BN in the same run (`hsat bench sync --step`).
//! - [`eval`]: `hsat eval`'s kNN, the exact f64 CPU path against the device path,
//!   on the same seeded features in one run (times, ratio, agreement).

pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod step;
pub mod sync;

use std::path::{Path, PathBuf};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options contradict each other; the message says which.
    #[error("{0}")]
    Options(String),
    /// The Python reference could not be started.
    #[error("starting {} with {}; run `bash scripts/setup.sh` or pass --python", script.display(), python.display())]
    StartReference {
        /// The reference script.
        script: PathBuf,
        /// The interpreter.
        python: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A reference or rank process broke the line protocol or failed; the message
    /// says which and what it said.
    #[error("{0}")]
    Reference(String),
    /// Talking to a child process or the file system failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The engine failed.
    #[error(transparent)]
    Worker(#[from] crate::WorkerError),
    /// The collective failed.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// A libtorch call failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The evaluation engine (kNN, feature files) failed.
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalRunError),
    /// The generated dataset could not be written.
    #[error(transparent)]
    Synth(#[from] hsat_data::synth::SynthError),
    /// A generated patch could not be decoded.
    #[error(transparent)]
    Image(#[from] hsat_data::image::ImageError),
    /// The generated dataset could not be indexed.
    #[error("cannot index the benchmark's dataset")]
    Dataset(#[from] hsat_core::dataset::DatasetError),
}

impl BenchError {
    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let action = action.into();
        move |source| BenchError::Io { action, source }
    }
}

/// The Python interpreter with torch 2.13: `$HSAT_PYTHON`, else the venv
/// `scripts/setup.sh` makes under `$HSAT_CACHE_DIR` (default `~/.cache/hsat`).
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HSAT_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("HSAT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("hsat")
        });
    cache.join("venv-torch-2.13.0/bin/python")
}

/// A reference script of the repository's `bench/` folder.
fn script(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench")).join(name)
}

/// Median of `xs` (sorts it); NaN when empty.
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn reference_scripts_are_found_from_the_crate() {
        for name in [
            "reference_step.py",
            "augment_reference.py",
            "ddp_sync_reference.py",
        ] {
            assert!(script(name).is_file(), "{}", script(name).display());
        }
    }
}
