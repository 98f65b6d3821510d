//! The one error type of the control plane and its `tonic::Code` table.
//!
//! The coordinator returns [`ApiError`] from its handlers; the server adapter turns
//! it into a `tonic::Status` with [`ApiError::code`]; the client turns any status
//! back into the same variant, so both sides reason about one enum.

/// Why a control-plane call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A message field is malformed or out of range (a bug in the caller).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The caller may not do this now or at all: config, dataset or version
    /// mismatch, a report for a step it was not given, ...
    #[error("refused: {0}")]
    Refused(String),
    /// The worker id is unknown or its lease expired: register again.
    #[error("unknown worker: {0}")]
    UnknownWorker(String),
    /// The coordinator is shutting down or cannot be reached; try again later.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// A fault of the coordinator itself (e.g. the ledger cannot be written).
    #[error("coordinator error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC code of each variant (the one table of this mapping).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::Refused(_) => tonic::Code::FailedPrecondition,
            Self::UnknownWorker(_) => tonic::Code::NotFound,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message without the variant's prefix.
    pub fn message(&self) -> &str {
        match self {
            Self::InvalidArgument(m)
            | Self::Refused(m)
            | Self::UnknownWorker(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => m,
        }
    }

    /// The variant of a status received over the wire (inverse of [`Self::code`];
    /// codes without a variant of their own count as unavailable or internal).
    pub fn from_status(status: &tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                Self::InvalidArgument(message)
            }
            tonic::Code::FailedPrecondition
            | tonic::Code::AlreadyExists
            | tonic::Code::PermissionDenied
            | tonic::Code::Aborted => Self::Refused(message),
            tonic::Code::NotFound => Self::UnknownWorker(message),
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted => Self::Unavailable(message),
            _ => Self::Internal(message),
        }
    }

    /// True when trying again later may succeed (the coordinator was unreachable or
    /// busy).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        let code = err.code();
        match err {
            ApiError::InvalidArgument(m)
            | ApiError::Refused(m)
            | ApiError::UnknownWorker(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => tonic::Status::new(code, m),
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_survives_the_wire() {
        for err in [
            ApiError::InvalidArgument("a".into()),
            ApiError::Refused("b".into()),
            ApiError::UnknownWorker("c".into()),
            ApiError::Unavailable("d".into()),
            ApiError::Internal("e".into()),
        ] {
            let status = tonic::Status::from(err.clone());
            assert_eq!(status.code(), err.code());
            assert_eq!(ApiError::from(status), err);
        }
    }
}
