//! The worker's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine, the training loop and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// libtorch rejected an operation (shapes, kinds, device).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A batch tensor does not have the layout the engine needs.
    #[error("bad batch shape {shape:?}: {reason}")]
    BatchShape {
        /// The shape that arrived.
        shape: Vec<i64>,
        /// What is wrong with it and what was expected.
        reason: String,
    },

    /// A loss level whose groups have one member each: no positives, the loss is undefined.
    #[error(
        "the {level} level has {members} member per group in a batch of shape {shape:?}: it has no positive pairs; raise {fix} or turn the level off in loss_type"
    )]
    DegenerateLevel {
        /// `patient`, `slide` or `patch`.
        level: &'static str,
        /// Members per group at that level.
        members: i64,
        /// The embedding batch shape `[B, S, P, V, D]`.
        shape: Vec<i64>,
        /// Which config keys would give the level positives.
        fix: &'static str,
    },

    /// A weights file could not be used for this model.
    #[error("weights file {path}: {reason}")]
    Weights {
        /// The `.safetensors` file.
        path: PathBuf,
        /// What does not match, and what to do.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`writing`, `renaming`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The data loader could not produce a step.
    #[error(transparent)]
    Data(#[from] hsat_data::DataError),

    /// The config asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),

    /// A collective (rendezvous, all-reduce, broadcast) failed; distributed workers
    /// answer it by asking the coordinator to regroup.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// Result alias of the worker crate.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| WorkerError::Io {
            action,
            path,
            source,
        }
    }
}
