//! Errors of the collectives layer: each names the operation, the group (prefix, rank,
//! size) or store address, and what the operator or the caller should do.

use std::time::Duration;

use super::ffi::{RawError, RawKind};

/// Where a failure happened: the group and the operation.
#[derive(Debug, Clone)]
pub struct GroupContext {
    /// `all_reduce`, `broadcast`, `barrier`, `rendezvous`...
    pub op: &'static str,
    /// The generation prefix of the group.
    pub prefix: String,
    /// This process's rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// The store the group rendezvoused through (`host:port`).
    pub store: String,
    /// The group's timeout.
    pub timeout: Duration,
}

impl std::fmt::Display for GroupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in group {:?} (rank {} of {}, store {})",
            self.op, self.prefix, self.rank, self.world_size, self.store
        )
    }
}

/// Everything that can go wrong in rendezvous and collectives.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Rank 0 could not host the store.
    #[error(
        "cannot host the rendezvous store on {addr}: {message}; free the port or pass port 0 to let the system choose"
    )]
    StoreHost {
        /// `host:port` asked for.
        addr: String,
        /// libtorch's message.
        message: String,
    },

    /// A rank could not reach rank 0's store.
    #[error(
        "cannot reach the rendezvous store at {addr} within {timeout:?}: {message}; check that rank 0 is running and that the address and port are reachable from this host"
    )]
    StoreConnect {
        /// `host:port` of the store.
        addr: String,
        /// How long connecting was retried.
        timeout: Duration,
        /// libtorch's message.
        message: String,
    },

    /// The ranks did not all join the group in time.
    #[error(
        "{context}: the ranks did not all join within {:?}: {message}; every rank must create the group with the same prefix and world size, and a prefix can be used once",
        context.timeout
    )]
    Rendezvous {
        /// Where (boxed: keeps the error, and every `Result` carrying it, small).
        context: Box<GroupContext>,
        /// libtorch's message.
        message: String,
    },

    /// A peer closed its connections (it crashed, was killed or left).
    #[error(
        "{context}: a peer is gone: {message}; drop this group and build a new one with a new prefix from the ranks that remain"
    )]
    PeerLost {
        /// Where (boxed: keeps the error, and every `Result` carrying it, small).
        context: Box<GroupContext>,
        /// libtorch's message (names the peer's address).
        message: String,
    },

    /// A peer did not answer within the group's timeout (hung, or far too slow).
    #[error(
        "{context}: timed out after {:?}: {message}; a peer is hung or too slow: drop this group and build a new one with a new prefix (or raise the timeout)",
        context.timeout
    )]
    Timeout {
        /// Where (boxed: keeps the error, and every `Result` carrying it, small).
        context: Box<GroupContext>,
        /// libtorch's message.
        message: String,
    },

    /// Any other failure inside c10d.
    #[error("{context}: {message}")]
    Backend {
        /// Where (boxed: keeps the error, and every `Result` carrying it, small).
        context: Box<GroupContext>,
        /// libtorch's message.
        message: String,
    },

    /// The caller asked for something that cannot work (weights, ranks, tensors).
    #[error("{0}")]
    InvalidArgument(String),

    /// `Backend::Nccl` in a build without the `nccl` feature.
    #[error(
        "the nccl backend is not compiled into this binary; rebuild hsat-worker with `--features nccl`, or use the gloo backend"
    )]
    NcclNotCompiled,

    /// A tensor operation (packing or unpacking buckets) failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl CollectiveError {
    /// Classifies a shim failure during `context.op`. Gloo reports a dead peer and its
    /// own timeouts as plain exceptions, so the message decides as well as the type.
    pub(crate) fn from_raw(raw: RawError, context: GroupContext) -> Self {
        let lower = raw.message.to_lowercase();
        let timed_out = raw.kind == RawKind::Timeout
            || lower.contains("timed out")
            || lower.contains("timeout");
        let peer_lost = raw.kind == RawKind::Network
            || [
                "closed by peer",
                "connection reset",
                "connection refused",
                "broken pipe",
                "read error",
                "write error",
                "eof",
            ]
            .iter()
            .any(|needle| lower.contains(needle));
        let message = raw.message;
        let context = Box::new(context);
        if context.op == "rendezvous" && (timed_out || raw.kind == RawKind::Store) {
            CollectiveError::Rendezvous { context, message }
        } else if timed_out {
            CollectiveError::Timeout { context, message }
        } else if peer_lost {
            CollectiveError::PeerLost { context, message }
        } else {
            CollectiveError::Backend { context, message }
        }
    }

    /// Whether the group is unusable after this error (a peer died or hung): the
    /// caller should drop it and re-rendezvous with a new prefix.
    pub fn needs_regroup(&self) -> bool {
        matches!(
            self,
            CollectiveError::PeerLost { .. }
                | CollectiveError::Timeout { .. }
                | CollectiveError::Rendezvous { .. }
                | CollectiveError::Backend { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(op: &'static str) -> GroupContext {
        GroupContext {
            op,
            prefix: "gen-3".into(),
            rank: 1,
            world_size: 2,
            store: "10.0.0.1:29500".into(),
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn gloo_peer_close_is_peer_lost_and_names_the_group() {
        let raw = RawError {
            kind: RawKind::Other,
            message: "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40213".into(),
        };
        let err = CollectiveError::from_raw(raw, context("all_reduce"));
        assert!(matches!(err, CollectiveError::PeerLost { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("gen-3") && text.contains("rank 1 of 2"),
            "{text}"
        );
        assert!(
            text.contains("127.0.0.1]:40213") && text.contains("new prefix"),
            "{text}"
        );
    }

    #[test]
    fn gloo_timeout_is_timeout() {
        let raw = RawError {
            kind: RawKind::Other,
            message: "Timed out waiting 1000ms for recv operation to complete".into(),
        };
        let err = CollectiveError::from_raw(raw, context("all_reduce"));
        assert!(matches!(err, CollectiveError::Timeout { .. }), "{err:?}");
        assert!(err.needs_regroup());
    }

    #[test]
    fn store_timeout_during_rendezvous_is_rendezvous() {
        let raw = RawError {
            kind: RawKind::Store,
            message: "wait timeout after 1000ms, keys: /gen-3/rank_0".into(),
        };
        let err = CollectiveError::from_raw(raw, context("rendezvous"));
        assert!(matches!(err, CollectiveError::Rendezvous { .. }), "{err:?}");
        assert!(err.to_string().contains("same prefix"));
    }
}
