//! The coordinator's Prometheus metrics: the job (state, steps, epoch, generation,
//! workers), its control plane (registrations refused, RPCs, authentication
//! failures), its checkpoints, and the robustness telemetry of the last committed
//! step averaged over ranks (losses by level and view, attack gain, eps, lr, step
//! time). The README (section "Metrics") lists them.
//!
//! The service updates them: the job's position on its ticker (at most 100 ms
//! old), commits and checkpoints as they happen, RPCs through the layer of
//! [`RpcMetrics`]. The checkpoint's age is computed when scraped. Serving them is
//! the caller's choice ([`hsat_metrics::MetricsServer`] over this as an
//! [`Exposition`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use hsat_metrics::exposition::encode_openmetrics;
use hsat_metrics::families::{FloatGauge, LossLabels, loss_family, set_losses};
use hsat_metrics::rpc::RpcMetrics;
use hsat_metrics::{AuthFailureHook, AuthFailures, Exposition, StepRecord};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::scheduler::{JobPhase, LedgerEntry, MetricsView};

/// The gRPC methods counted by name in `hsat_rpc_requests_total` (coordinator,
/// admin and health services).
pub const RPC_METHODS: &[&str] = &[
    "Register",
    "Heartbeat",
    "NextAssignment",
    "PublishStore",
    "ReportStep",
    "Leave",
    "GetStatus",
    "Check",
    "Watch",
];

/// Why a registration was refused (`reason` of `hsat_registrations_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The config differs from the job's.
    Config,
    /// The dataset fingerprint differs.
    Dataset,
    /// The hsat version differs.
    Version,
    /// The job is over or shutting down.
    JobFinished,
    /// Anything else.
    Other,
}

impl RefusalReason {
    /// Every reason.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::Config,
        RefusalReason::Dataset,
        RefusalReason::Version,
        RefusalReason::JobFinished,
        RefusalReason::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Config => "config",
            RefusalReason::Dataset => "dataset",
            RefusalReason::Version => "version",
            RefusalReason::JobFinished => "job_finished",
            RefusalReason::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The coordinator's metrics.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Registry,
    job_state: Family<StateLabel, Gauge>,
    committed_steps: Gauge,
    total_steps: Gauge,
    epoch: Gauge,
    generation: Gauge,
    workers_alive: Gauge,
    registrations_refused: Family<ReasonLabel, Counter>,
    rpc: RpcMetrics,
    auth_failures: AuthFailures,
    checkpoint_step: Gauge,
    checkpoint_age_seconds: FloatGauge,
    checkpoint_time: Mutex<Option<SystemTime>>,
    loss: Family<LossLabels, FloatGauge>,
    attack_gain: FloatGauge,
    attack_eps: FloatGauge,
    learning_rate: FloatGauge,
    step_duration: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    /// Registers every metric; label sets with a fixed domain (job state, refusal
    /// and authentication reasons, losses) start with all their series.
    pub fn new() -> CoordinatorMetrics {
        let mut registry = Registry::default();
        let job_state = Family::<StateLabel, Gauge>::default();
        for phase in JobPhase::ALL {
            // Creates the series at 0.
            drop(job_state.get_or_create(&StateLabel {
                state: phase.label(),
            }));
        }
        registry.register(
            "hsat_job_state",
            "1 for the job's current state (forming, training, paused, finishing, finished, failed), 0 for the others",
            job_state.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let float = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = FloatGauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let committed_steps = gauge(
            &mut registry,
            "hsat_committed_steps",
            "Steps committed to the ledger",
        );
        let total_steps = gauge(&mut registry, "hsat_total_steps", "Steps of the whole job");
        let epoch = gauge(&mut registry, "hsat_epoch", "Epoch of the next step");
        let generation = gauge(
            &mut registry,
            "hsat_generation",
            "The current generation (membership epoch of the ranks); 0 before the first",
        );
        let workers_alive = gauge(
            &mut registry,
            "hsat_workers_alive",
            "Registered workers heard from within 3 heartbeats and not stopped",
        );
        let registrations_refused = Family::<ReasonLabel, Counter>::default();
        for reason in RefusalReason::ALL {
            // Creates the series at 0.
            drop(registrations_refused.get_or_create(&ReasonLabel {
                reason: reason.label(),
            }));
        }
        registry.register(
            "hsat_registrations_refused",
            "Worker registrations refused, by reason (config, dataset, version, auth, job_finished, other)",
            registrations_refused.clone(),
        );
        let rpc = RpcMetrics::register(&mut registry, RPC_METHODS);
        let auth_failures = AuthFailures::register(&mut registry);
        let checkpoint_step = gauge(
            &mut registry,
            "hsat_checkpoint_step",
            "Steps held by the newest checkpoint rank 0 reported (or found at start)",
        );
        let checkpoint_age_seconds = float(
            &mut registry,
            "hsat_checkpoint_age_seconds",
            "Seconds since the newest checkpoint was written; NaN before any",
        );
        checkpoint_age_seconds.set(f64::NAN);
        let loss = loss_family();
        registry.register(
            "hsat_loss",
            "Loss of the last committed step by level and view, patient-weighted mean over ranks; NaN when not measured",
            loss.clone(),
        );
        let attack_gain = float(
            &mut registry,
            "hsat_attack_gain",
            "Attack loss at the last PGD iterate minus at its random start, last committed step, mean over ranks",
        );
        attack_gain.set(f64::NAN);
        let attack_eps = float(
            &mut registry,
            "hsat_attack_eps",
            "Attack radius in effect at the last committed step (pixel units, images in [0, 1])",
        );
        let learning_rate = float(
            &mut registry,
            "hsat_learning_rate",
            "Learning rate in effect at the last committed step",
        );
        let step_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "hsat_step_duration_seconds",
            "Seconds of each committed step (slowest rank, data wait included)",
            step_duration.clone(),
        );
        CoordinatorMetrics {
            registry,
            job_state,
            committed_steps,
            total_steps,
            epoch,
            generation,
            workers_alive,
            registrations_refused,
            rpc,
            auth_failures,
            checkpoint_step,
            checkpoint_age_seconds,
            checkpoint_time: Mutex::new(None),
            loss,
            attack_gain,
            attack_eps,
            learning_rate,
            step_duration,
        }
    }

    /// The RPC metrics (their layer goes around the gRPC routes).
    pub fn rpc(&self) -> &RpcMetrics {
        &self.rpc
    }

    /// `hsat_auth_failures_total`.
    pub fn auth_failures(&self) -> &AuthFailures {
        &self.auth_failures
    }

    /// The hook to hand to the gRPC authentication layer: it counts the refused
    /// call by reason. (A `Register` refused by authentication never reaches the
    /// registration checks: it shows here and in
    /// `hsat_rpc_requests_total{method="Register",code="Unauthenticated"}`.)
    pub fn auth_failure_hook(self: &Arc<Self>) -> AuthFailureHook {
        let metrics = Arc::clone(self);
        Arc::new(move |reason: &str| metrics.auth_failures.record(reason))
    }

    /// Counts a refused registration.
    pub fn refused(&self, reason: RefusalReason) {
        self.registrations_refused
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// The job's position (called on the service's ticker).
    pub fn set_view(&self, view: &MetricsView) {
        for phase in JobPhase::ALL {
            self.job_state
                .get_or_create(&StateLabel {
                    state: phase.label(),
                })
                .set(i64::from(phase == view.phase));
        }
        self.committed_steps.set(saturating(view.committed));
        self.total_steps.set(saturating(view.total_steps));
        self.epoch.set(saturating(view.epoch));
        self.generation.set(saturating(view.generation));
        self.workers_alive
            .set(saturating(view.workers_alive as u64));
    }

    /// A committed step: its losses and telemetry become the current values and
    /// its duration is observed.
    pub fn on_commit(&self, entry: &LedgerEntry) {
        self.committed_steps.set(saturating(entry.step + 1));
        // A step recovered at a regroup has no reports: its values are unknown,
        // and the previous step's stay (they are that step's).
        if entry.recovered && entry.losses.is_none() {
            return;
        }
        set_losses(&self.loss, "clean", entry.losses.and_then(|l| l.clean));
        set_losses(
            &self.loss,
            "adversarial",
            entry.losses.and_then(|l| l.adversarial),
        );
        if let Some(telemetry) = &entry.telemetry {
            self.attack_gain
                .set(telemetry.ranks.attack_gain.unwrap_or(f64::NAN));
            self.attack_eps.set(telemetry.ranks.eps);
            self.learning_rate.set(telemetry.ranks.lr);
        }
        self.step_duration.observe(entry.step_seconds);
    }

    /// A checkpoint holding `step` steps, written at `written`.
    pub fn on_checkpoint(&self, step: u64, written: SystemTime) {
        self.checkpoint_step.set(saturating(step));
        *self
            .checkpoint_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(written);
    }

    fn update_checkpoint_age(&self) {
        let written = *self
            .checkpoint_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let age = written.map_or(f64::NAN, |at| {
            SystemTime::now()
                .duration_since(at)
                .map_or(0.0, |d| d.as_secs_f64())
        });
        self.checkpoint_age_seconds.set(age);
    }
}

impl Exposition for CoordinatorMetrics {
    fn render(&self) -> String {
        self.update_checkpoint_age();
        encode_openmetrics(&self.registry)
    }
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The `metrics.jsonl` line of a committed step.
pub fn step_record(entry: &LedgerEntry) -> StepRecord {
    let telemetry = entry.telemetry;
    let ranks = telemetry.map(|t| t.ranks);
    let seconds = entry.step_seconds;
    StepRecord {
        step: entry.step,
        epoch: entry.epoch,
        generation: entry.generation,
        time_unix_s: hsat_metrics::jsonl::now_unix_s(),
        world_size: entry.ranks.len() as u64,
        loss: hsat_metrics::jsonl::ViewLosses {
            clean: entry.losses.and_then(|l| l.clean),
            adversarial: entry.losses.and_then(|l| l.adversarial),
        },
        attack_gain: ranks.and_then(|t| t.attack_gain),
        lr: ranks.map(|t| t.lr),
        eps: ranks.map(|t| t.eps),
        step_seconds: telemetry.map(|_| seconds),
        data_wait_seconds: telemetry.map(|t| t.data_wait_seconds),
        attack_seconds: ranks.map(|t| t.attack_seconds),
        allreduce_seconds: ranks.map(|t| t.allreduce_seconds),
        patches_per_second: ranks
            .filter(|_| seconds > 0.0)
            .map(|t| t.patches as f64 / seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_metrics::exposition::{Scrape, openmetrics_to_text};

    fn scrape(metrics: &CoordinatorMetrics) -> Scrape {
        Scrape::parse(&openmetrics_to_text(&metrics.render())).unwrap()
    }

    #[test]
    fn the_auth_hook_counts_failures_by_reason() {
        let metrics = Arc::new(CoordinatorMetrics::new());
        let hook = metrics.auth_failure_hook();
        hook("wrong_token");
        hook("wrong_session");
        let scrape = scrape(&metrics);
        let failures = |reason| scrape.value("hsat_auth_failures_total", &[("reason", reason)]);
        assert_eq!(failures("wrong_token"), Some(1.0));
        assert_eq!(failures("wrong_session"), Some(1.0));
        assert_eq!(failures("missing_token"), Some(0.0));
    }

    #[test]
    fn exactly_one_job_state_is_set() {
        let metrics = CoordinatorMetrics::new();
        metrics.set_view(&MetricsView {
            phase: JobPhase::Paused,
            committed: 3,
            total_steps: 10,
            epoch: 1,
            generation: 2,
            workers_alive: 1,
        });
        let scrape = scrape(&metrics);
        for phase in JobPhase::ALL {
            let expected = if phase == JobPhase::Paused { 1.0 } else { 0.0 };
            assert_eq!(
                scrape.value("hsat_job_state", &[("state", phase.label())]),
                Some(expected),
                "{phase:?}"
            );
        }
        assert_eq!(scrape.value("hsat_committed_steps", &[]), Some(3.0));
        assert_eq!(scrape.value("hsat_workers_alive", &[]), Some(1.0));
        let age = scrape.value("hsat_checkpoint_age_seconds", &[]).unwrap();
        assert!(age.is_nan(), "no checkpoint yet: {age}");
    }

    #[test]
    fn a_checkpoints_age_is_measured_when_scraped() {
        let metrics = CoordinatorMetrics::new();
        let written = SystemTime::now() - std::time::Duration::from_secs(30);
        metrics.on_checkpoint(8, written);
        let scrape = scrape(&metrics);
        assert_eq!(scrape.value("hsat_checkpoint_step", &[]), Some(8.0));
        let age = scrape.value("hsat_checkpoint_age_seconds", &[]).unwrap();
        assert!((30.0..60.0).contains(&age), "{age}");
    }
}
