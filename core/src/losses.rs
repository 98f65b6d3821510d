//! Loss values as plain numbers: what a training step measured, in the form every
//! stage shares (the engine computes them, checkpoints store them, the step report
//! carries them to the coordinator, the ledger and status show them).

use serde::{Deserialize, Serialize};

/// The hierarchical loss of one set of views, level by level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelLosses {
    /// Patient-level loss (0 when the level is off).
    pub patient: f64,
    /// Slide-level loss (0 when the level is off).
    pub slide: f64,
    /// Patch-level loss (0 when the level is off).
    pub patch: f64,
    /// Weighted total over the enabled levels.
    pub total: f64,
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    /// The optimised loss.
    pub total: f64,
    /// Levels on the clean views, when they were computed.
    pub clean: Option<LevelLosses>,
    /// Levels on the adversarial views, when attacked. Checkpoints written before
    /// this name was shared call it `adv`.
    #[serde(alias = "adv")]
    pub adversarial: Option<LevelLosses>,
}
