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

    /// The config asks for something this build or engine cannot do.
    #[error("{0}")]
    Config(String),

    /// A step had no patients to train on.
    #[error("step {step} has no patients to train on")]
    EmptyStep {
        /// The step.
        step: u64,
    },

    /// A checkpoint failed verification (a missing, truncated or altered file) or its
    /// manifest could not be written; the source names the file and what is wrong.
    #[error("checkpoint {} rejected", dir.display())]
    Checkpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What is wrong, naming the file.
        #[source]
        source: hsat_core::checkpoint::CheckpointError,
    },

    /// The background thread writing a checkpoint panicked.
    #[error("the thread writing a checkpoint under {} panicked (see the message above)", root.display())]
    CheckpointThread {
        /// Where it was writing.
        root: PathBuf,
    },

    /// Checkpoint metadata could not be serialised.
    #[error("serialising checkpoint metadata")]
    Metadata(#[source] serde_json::Error),

    /// The worker's dataset could not be indexed.
    #[error(
        "cannot index the dataset (distributed runs need a dataset on disk: make one with `hsat synth`)"
    )]
    Dataset(#[source] hsat_core::dataset::DatasetError),

    /// The worker's metrics endpoint could not start.
    #[error(transparent)]
    Metrics(hsat_metrics::MetricsError),

    /// The worker's async runtime (for RPCs) could not start.
    #[error("cannot start the RPC runtime")]
    Runtime(#[source] std::io::Error),

    /// A call to the coordinator failed with an error that retrying cannot fix
    /// (refused, invalid, unknown worker, a coordinator fault).
    #[error("cannot {action}")]
    Rpc {
        /// What the worker tried (`register with the coordinator`, ...).
        action: &'static str,
        /// The coordinator's error.
        #[source]
        source: hsat_proto::ApiError,
    },

    /// A call to the coordinator kept failing with retryable errors (unreachable,
    /// too slow) until the retry deadline.
    #[error(
        "cannot {action}: gave up after retrying for {:.0} s ({attempts} attempts; check that the coordinator runs and is reachable, or raise --rpc-retry-deadline)",
        elapsed.as_secs_f64()
    )]
    RetriesExhausted {
        /// What the worker tried.
        action: &'static str,
        /// Attempts made.
        attempts: u32,
        /// From the first failure to giving up.
        elapsed: std::time::Duration,
        /// The last attempt's error.
        #[source]
        source: hsat_proto::ApiError,
    },

    /// The coordinator stopped the job (it failed or was cancelled).
    #[error("the coordinator stopped the job: {reason}")]
    JobFailed {
        /// The coordinator's reason.
        reason: String,
    },

    /// The coordinator broke the worker protocol.
    #[error(transparent)]
    Protocol(#[from] hsat_proto::worker_protocol::ProtocolError),

    /// The loader's threads stopped while steps were still being fed to them.
    #[error("the loader threads stopped")]
    LoaderStopped,

    /// A collective (rendezvous, all-reduce, broadcast) failed; distributed workers
    /// answer it by asking the coordinator to regroup.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// `err: cause: cause ...`: the whole story of an error in one line (for logs and
/// the reason a worker gives the coordinator when it leaves).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Result alias of the worker crate.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    /// The error of a coordinator call that failed after `action`'s retries.
    pub fn rpc(action: &'static str) -> impl FnOnce(hsat_proto::retry::RetryError) -> Self {
        use hsat_proto::retry::RetryError;
        move |err| match err {
            RetryError::Fatal(source) => WorkerError::Rpc { action, source },
            RetryError::GaveUp {
                attempts,
                elapsed,
                last,
            } => WorkerError::RetriesExhausted {
                action,
                attempts,
                elapsed,
                source: last,
            },
        }
    }

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
