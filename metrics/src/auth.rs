//! The hook the gRPC authentication layer calls on every refused call, feeding
//! `hsat_auth_failures_total{reason}`.
//!
//! The authentication code (in `hsat-proto`) does not depend on this crate: it
//! takes a plain closure of the refusal, which the coordinator builds from its
//! metrics' [`AuthFailureHook`] (`CoordinatorMetrics::auth_failure_hook`), called
//! with one of [`AUTH_FAILURE_REASONS`].

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// What the authentication layer calls for a refused call, with its reason.
pub type AuthFailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The `reason` values: no `authorization` metadata, a token that is not the
/// job's, a worker's call without its own session token. Anything else is counted
/// as `other` (the label set stays bounded).
pub const AUTH_FAILURE_REASONS: [&str; 3] = ["missing_token", "wrong_token", "wrong_session"];

/// `reason` of `hsat_auth_failures_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// One of [`AUTH_FAILURE_REASONS`] or `other`.
    pub reason: String,
}

/// `hsat_auth_failures_total{reason}`; clones share the counter.
#[derive(Debug, Clone, Default)]
pub struct AuthFailures(Family<ReasonLabel, Counter>);

impl AuthFailures {
    /// Registers the counter (every reason starts at 0, so dashboards see the
    /// series before the first failure).
    pub fn register(registry: &mut Registry) -> AuthFailures {
        let family = Family::<ReasonLabel, Counter>::default();
        for reason in AUTH_FAILURE_REASONS {
            // Creates the series at 0.
            drop(family.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            }));
        }
        registry.register(
            "hsat_auth_failures",
            "gRPC calls refused by authentication, by reason",
            family.clone(),
        );
        AuthFailures(family)
    }

    /// Counts one refused call.
    pub fn record(&self, reason: &str) {
        let reason = if AUTH_FAILURE_REASONS.contains(&reason) {
            reason
        } else {
            "other"
        };
        self.0
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A hook that counts by reason (the path is not used).
    pub fn hook(&self) -> AuthFailureHook {
        let counter = self.clone();
        Arc::new(move |reason: &str| counter.record(reason))
    }

    /// Refused calls counted for `reason` so far.
    pub fn count(&self, reason: &str) -> u64 {
        self.0
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_counts_by_reason_and_bounds_the_labels() {
        let mut registry = Registry::default();
        let failures = AuthFailures::register(&mut registry);
        let hook = failures.hook();
        hook("wrong_token");
        hook("wrong_token");
        hook("missing_token");
        hook("a reason nobody planned");
        assert_eq!(failures.count("wrong_token"), 2);
        assert_eq!(failures.count("missing_token"), 1);
        assert_eq!(failures.count("wrong_session"), 0);
        assert_eq!(failures.count("other"), 1);
        let text = crate::exposition::encode_openmetrics(&registry);
        assert!(!text.contains("nobody planned"), "{text}");
    }
}
