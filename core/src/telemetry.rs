//! What one training step measured besides its losses: the attack's strength and
//! effect, the schedules in effect and where the time went. The engine fills it,
//! the step report carries it to the coordinator, which averages it over ranks into
//! its metrics and `<out_dir>/metrics.jsonl`.

use serde::{Deserialize, Serialize};

/// One rank's telemetry of one step. Durations are wall-clock seconds, finite and
/// >= 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTelemetry {
    /// How much PGD raised the attack's loss on this rank's shard: the loss at the
    /// last iterate minus the loss at the random start (both with the model in
    /// eval mode, on the attack's loss levels). `None` without an attack or for an
    /// empty shard.
    pub attack_gain: Option<f64>,
    /// The attack radius in effect (pixel units, images in [0, 1]); 0 without an
    /// attack.
    pub eps: f64,
    /// The learning rate in effect.
    pub lr: f64,
    /// Seconds spent crafting the adversarial examples.
    pub attack_seconds: f64,
    /// Seconds spent averaging gradients (and batch-norm buffers) across ranks; 0 in
    /// a single process.
    pub allreduce_seconds: f64,
    /// Patches (patient x slide x patch samples, each with its views) of this
    /// rank's shard.
    pub patches: u64,
}
