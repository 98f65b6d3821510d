//! The exit status a worker process ends with ([`hsat_core::exit`]): what each
//! [`WorkerError`] means for a controller deciding whether to start the worker
//! again.
//!
//! A worker exits 1 only when the coordinator says the job failed, and 78 only
//! when something no restart changes refuses it: its config or dataset is invalid
//! or differs from the job's, or the coordinator refuses its credentials. Anything
//! else that stops one worker (a lost coordinator, a failed collective, I/O, a
//! libtorch error) is 75: the job goes on with the other workers, and a restarted
//! worker rejoins it; a controller's retry limit bounds a worker that keeps failing.

use hsat_core::exit::{Exit, ExitClass};
use hsat_proto::ApiError;

use crate::error::WorkerError;

impl ExitClass for WorkerError {
    fn exit(&self) -> Exit {
        match self {
            WorkerError::JobFailed { .. } => Exit::Failed,
            WorkerError::Config(_)
            | WorkerError::Dataset(_)
            | WorkerError::BatchShape { .. }
            | WorkerError::DegenerateLevel { .. }
            | WorkerError::Weights { .. } => Exit::Refused,
            WorkerError::Rpc { source, .. } => api_exit(source),
            WorkerError::RetriesExhausted { .. }
            | WorkerError::Torch(_)
            | WorkerError::Io { .. }
            | WorkerError::Data(_)
            | WorkerError::EmptyStep { .. }
            | WorkerError::Checkpoint { .. }
            | WorkerError::CheckpointThread { .. }
            | WorkerError::Metadata(_)
            | WorkerError::Metrics(_)
            | WorkerError::Runtime(_)
            | WorkerError::Protocol(_)
            | WorkerError::LoaderStopped
            | WorkerError::Collective(_) => Exit::Retryable,
        }
    }
}

/// A device the machine does not have, or a misspelt one, is a refusal: the same
/// flags fail the same way on the same node.
impl ExitClass for super::device::DeviceError {
    fn exit(&self) -> Exit {
        Exit::Refused
    }
}

/// The exit status of a coordinator call that failed for good (after its retries):
/// a refusal (registration refused for a config, dataset or version mismatch) and
/// an authentication failure are permanent; everything else may pass with a
/// restart (a new coordinator, a new registration).
pub fn api_exit(error: &ApiError) -> Exit {
    match error {
        ApiError::Refused(_)
        | ApiError::Unauthenticated(_)
        | ApiError::PermissionDenied(_)
        | ApiError::InvalidArgument(_) => Exit::Refused,
        ApiError::UnknownWorker(_)
        | ApiError::Unavailable(_)
        | ApiError::Internal(_)
        | ApiError::Stale(_) => Exit::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_coordinators_word_fails_the_job_and_only_refusals_are_permanent() {
        let failed = WorkerError::JobFailed {
            reason: "checksums disagree".into(),
        };
        assert_eq!(failed.exit(), Exit::Failed);
        let refused = WorkerError::Rpc {
            action: "register with the coordinator",
            source: ApiError::Refused("config differs at model.backbone".into()),
        };
        assert_eq!(refused.exit(), Exit::Refused);
        let unauthenticated = WorkerError::Rpc {
            action: "register with the coordinator",
            source: ApiError::Unauthenticated("no job token".into()),
        };
        assert_eq!(unauthenticated.exit(), Exit::Refused);
        let gone = WorkerError::RetriesExhausted {
            action: "ask the coordinator for work",
            attempts: 9,
            elapsed: std::time::Duration::from_secs(60),
            source: ApiError::Unavailable("connection refused".into()),
        };
        assert_eq!(gone.exit(), Exit::Retryable);
        assert_eq!(WorkerError::LoaderStopped.exit(), Exit::Retryable);
        assert_eq!(
            WorkerError::Config("needs the nccl feature".into()).exit(),
            Exit::Refused
        );
    }
}
