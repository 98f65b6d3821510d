//! A worker's Prometheus metrics (`hsat_worker_*`): its steps, where their time
//! went (data wait, attack, all-reduce), throughput, checkpoints (rank 0), and the
//! robustness telemetry of its last step on its own shard (losses by level and
//! view, attack gain, eps, lr). The README (section "Metrics") lists them; the coordinator's
//! `hsat_*` metrics hold the same telemetry averaged over ranks.
//!
//! The worker process updates them after every step it trains
//! ([`WorkerMetrics::on_step`]) and checkpoint it writes; they are served on
//! `metrics.worker_listen` (`hsat worker --metrics-listen`).

use hsat_core::losses::StepLosses;
use hsat_core::telemetry::StepTelemetry;
use hsat_metrics::exposition::encode_openmetrics;
use hsat_metrics::families::{FloatGauge, LossLabels, loss_family, set_losses};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::checkpoint::writer::WriteStats;

/// A worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    steps: Counter,
    step_duration: Histogram,
    data_wait: Histogram,
    attack_duration: Histogram,
    allreduce_duration: Histogram,
    patches: Counter,
    patches_per_second: FloatGauge,
    checkpoint_duration: Histogram,
    checkpoint_size: FloatGauge,
    loss: Family<LossLabels, FloatGauge>,
    attack_gain: FloatGauge,
    attack_eps: FloatGauge,
    learning_rate: FloatGauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// 1 ms to about 33 s, doubling.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl WorkerMetrics {
    /// Registers every metric (gauges of values not measured yet are NaN).
    pub fn new() -> WorkerMetrics {
        let mut registry = Registry::default();
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let histogram = |registry: &mut Registry, name: &str, help: &str| {
            let histogram = seconds_buckets();
            registry.register(name, help, histogram.clone());
            histogram
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = FloatGauge::default();
            gauge.set(f64::NAN);
            registry.register(name, help, gauge.clone());
            gauge
        };
        let steps = counter(
            &mut registry,
            "hsat_worker_steps",
            "Step shards this worker trained and applied",
        );
        let step_duration = histogram(
            &mut registry,
            "hsat_worker_step_duration_seconds",
            "Seconds of each step shard, data wait included",
        );
        let data_wait = histogram(
            &mut registry,
            "hsat_worker_data_wait_seconds",
            "Seconds each step waited for its batch",
        );
        let attack_duration = histogram(
            &mut registry,
            "hsat_worker_attack_duration_seconds",
            "Seconds crafting each step's adversarial examples",
        );
        let allreduce_duration = histogram(
            &mut registry,
            "hsat_worker_allreduce_duration_seconds",
            "Seconds averaging each step's gradients and batch-norm buffers across ranks",
        );
        let patches = counter(
            &mut registry,
            "hsat_worker_patches",
            "Patches (patient x slide x patch samples) this worker trained on",
        );
        let patches_per_second = gauge(
            &mut registry,
            "hsat_worker_patches_per_second",
            "Patches of the last step shard per second of that step",
        );
        let checkpoint_duration = histogram(
            &mut registry,
            "hsat_worker_checkpoint_duration_seconds",
            "Seconds writing each checkpoint (rank 0)",
        );
        let checkpoint_size = gauge(
            &mut registry,
            "hsat_worker_checkpoint_size_bytes",
            "Bytes of the last checkpoint written (rank 0)",
        );
        let loss = loss_family();
        registry.register(
            "hsat_worker_loss",
            "Loss of this worker's last step shard by level and view; NaN when not measured",
            loss.clone(),
        );
        let attack_gain = gauge(
            &mut registry,
            "hsat_worker_attack_gain",
            "Attack loss at the last PGD iterate minus at its random start, last step shard",
        );
        let attack_eps = gauge(
            &mut registry,
            "hsat_worker_attack_eps",
            "Attack radius in effect at the last step (pixel units, images in [0, 1])",
        );
        let learning_rate = gauge(
            &mut registry,
            "hsat_worker_learning_rate",
            "Learning rate in effect at the last step",
        );
        WorkerMetrics {
            registry,
            steps,
            step_duration,
            data_wait,
            attack_duration,
            allreduce_duration,
            patches,
            patches_per_second,
            checkpoint_duration,
            checkpoint_size,
            loss,
            attack_gain,
            attack_eps,
            learning_rate,
        }
    }

    /// A step shard trained and applied: `losses` (`None` for an empty shard),
    /// its telemetry, its duration (data wait included) and data wait.
    pub fn on_step(
        &self,
        losses: Option<StepLosses>,
        telemetry: &StepTelemetry,
        step_seconds: f64,
        data_wait_seconds: f64,
    ) {
        self.steps.inc();
        self.step_duration.observe(step_seconds);
        self.data_wait.observe(data_wait_seconds);
        self.attack_duration.observe(telemetry.attack_seconds);
        self.allreduce_duration.observe(telemetry.allreduce_seconds);
        self.patches.inc_by(telemetry.patches);
        if step_seconds > 0.0 {
            self.patches_per_second
                .set(telemetry.patches as f64 / step_seconds);
        }
        set_losses(&self.loss, "clean", losses.and_then(|l| l.clean));
        set_losses(
            &self.loss,
            "adversarial",
            losses.and_then(|l| l.adversarial),
        );
        self.attack_gain
            .set(telemetry.attack_gain.unwrap_or(f64::NAN));
        self.attack_eps.set(telemetry.eps);
        self.learning_rate.set(telemetry.lr);
    }

    /// A checkpoint write completed.
    pub fn on_checkpoint(&self, write: &WriteStats) {
        self.checkpoint_duration.observe(write.seconds);
        self.checkpoint_size.set(write.bytes as f64);
    }
}

impl hsat_metrics::Exposition for WorkerMetrics {
    fn render(&self) -> String {
        encode_openmetrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_core::losses::LevelLosses;
    use hsat_metrics::Exposition;
    use hsat_metrics::exposition::{Scrape, openmetrics_to_text, promtool_check};

    #[test]
    fn a_step_sets_the_telemetry_and_promtool_accepts_the_exposition() {
        let metrics = WorkerMetrics::new();
        let adversarial = LevelLosses {
            patient: 1.0,
            slide: 2.0,
            patch: 3.0,
            total: 6.0,
        };
        let losses = StepLosses {
            total: 6.0,
            clean: None,
            adversarial: Some(adversarial),
        };
        let telemetry = StepTelemetry {
            attack_gain: Some(0.5),
            eps: 0.03,
            lr: 1e-4,
            attack_seconds: 0.2,
            allreduce_seconds: 0.1,
            patches: 12,
        };
        metrics.on_step(Some(losses), &telemetry, 2.0, 0.5);
        metrics.on_step(Some(losses), &telemetry, 2.0, 0.5);
        metrics.on_checkpoint(&WriteStats {
            dir: "step-00000002".into(),
            seconds: 0.3,
            bytes: 4096,
        });
        let text = openmetrics_to_text(&metrics.render());
        let scrape = Scrape::parse(&text).unwrap();
        assert_eq!(scrape.value("hsat_worker_steps_total", &[]), Some(2.0));
        assert_eq!(scrape.value("hsat_worker_patches_total", &[]), Some(24.0));
        assert_eq!(
            scrape.value("hsat_worker_patches_per_second", &[]),
            Some(6.0)
        );
        assert_eq!(
            scrape.value(
                "hsat_worker_loss",
                &[("level", "slide"), ("view", "adversarial")]
            ),
            Some(2.0)
        );
        let clean = scrape
            .value("hsat_worker_loss", &[("level", "slide"), ("view", "clean")])
            .unwrap();
        assert!(clean.is_nan(), "clean losses were not measured: {clean}");
        assert_eq!(scrape.value("hsat_worker_attack_gain", &[]), Some(0.5));
        assert_eq!(
            scrape.value("hsat_worker_checkpoint_size_bytes", &[]),
            Some(4096.0)
        );
        assert_eq!(
            scrape.value("hsat_worker_attack_duration_seconds_count", &[]),
            Some(2.0)
        );
        let problems = promtool_check(&text).unwrap();
        assert_eq!(problems, "", "{text}");
    }
}
