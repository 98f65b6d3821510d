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
    /// No valid job token (or no session token for a worker's call): see
    /// [`crate::auth`].
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller holds the job token but may not do this: another worker's
    /// session.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A replayed report (this worker already reported that step of that
    /// generation) or one of a generation that is over: nothing was changed.
    #[error("stale: {0}")]
    Stale(String),
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
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Self::Stale(_) => tonic::Code::Aborted,
        }
    }

    /// The message without the variant's prefix.
    pub fn message(&self) -> &str {
        match self {
            Self::InvalidArgument(m)
            | Self::Refused(m)
            | Self::UnknownWorker(m)
            | Self::Unavailable(m)
            | Self::Internal(m)
            | Self::Unauthenticated(m)
            | Self::PermissionDenied(m)
            | Self::Stale(m) => m,
        }
    }

    /// The variant of a status received over the wire (inverse of [`Self::code`];
    /// codes without a variant of their own count as unavailable or internal).
    ///
    /// A status the client made itself from a transport failure (it carries the
    /// failure as its source; a status sent by the coordinator never does) is
    /// `Unavailable` whatever its code: tonic reports a connection reset mid-call as
    /// `Unknown` or `Internal`, yet the call may well succeed on a new connection.
    pub fn from_status(status: &tonic::Status) -> Self {
        let source = std::error::Error::source(status);
        // The status message of a transport failure is often just "tcp connect
        // error"; its source says why ("Connection refused").
        let message = match source.map(error_chain) {
            Some(chain) if chain.contains(status.message()) => chain,
            Some(chain) if !status.message().contains(&chain) => {
                format!("{}: {chain}", status.message())
            }
            _ => status.message().to_owned(),
        };
        if source.is_some() && matches!(status.code(), tonic::Code::Unknown | tonic::Code::Internal)
        {
            return Self::Unavailable(format!(
                "the connection to the coordinator failed: {message}"
            ));
        }
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                Self::InvalidArgument(message)
            }
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => Self::Refused(message),
            tonic::Code::Unauthenticated => Self::Unauthenticated(message),
            tonic::Code::PermissionDenied => Self::PermissionDenied(message),
            tonic::Code::Aborted => Self::Stale(message),
            tonic::Code::NotFound => Self::UnknownWorker(message),
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted => Self::Unavailable(message),
            _ => Self::Internal(message),
        }
    }

    /// True when trying again later may succeed: the coordinator was unreachable,
    /// restarting, busy or too slow (`Unavailable`, which [`Self::from_status`]
    /// gives for `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `CANCELLED`,
    /// `RESOURCE_EXHAUSTED`, refused connections and connections reset mid-call).
    /// Refusals, invalid requests, unknown workers, authentication failures, stale
    /// reports and coordinator faults are not: asking again gets the same answer.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// `err: cause: cause ...`, skipping causes whose text the previous one already has.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
    text
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        tonic::Status::new(err.code(), err.message())
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
            ApiError::Unauthenticated("f".into()),
            ApiError::PermissionDenied("g".into()),
            ApiError::Stale("h".into()),
        ] {
            let status = tonic::Status::from(err.clone());
            assert_eq!(status.code(), err.code());
            assert_eq!(ApiError::from(status), err);
        }
    }

    #[test]
    fn unreachable_slow_or_busy_coordinators_are_retryable() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Cancelled,
            tonic::Code::ResourceExhausted,
        ] {
            let err = ApiError::from(tonic::Status::new(code, "m"));
            assert!(err.is_retryable(), "{code:?} -> {err:?}");
        }
    }

    #[test]
    fn refusals_bugs_and_coordinator_faults_are_not_retryable() {
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
            tonic::Code::NotFound,
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::Unimplemented,
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::Aborted,
        ] {
            let err = ApiError::from(tonic::Status::new(code, "m"));
            assert!(!err.is_retryable(), "{code:?} -> {err:?}");
        }
    }

    #[test]
    fn a_connection_reset_mid_call_is_retryable_and_names_its_cause() {
        // What tonic makes of a transport failure: the code it could not tell
        // (Unknown), the failure as the source.
        let reset = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        );
        let status = tonic::Status::from_error(Box::new(reset));
        assert_eq!(status.code(), tonic::Code::Unknown);
        let err = ApiError::from(status);
        assert!(err.is_retryable(), "{err:?}");
        assert!(err.message().contains("connection reset by peer"), "{err}");
        // The same code sent by the coordinator (no source) stays a fault.
        assert!(!ApiError::from(tonic::Status::unknown("connection reset by peer")).is_retryable());
    }
}
