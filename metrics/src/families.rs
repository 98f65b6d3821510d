//! Metric families both sides export with the same labels: the losses by level
//! and view (`hsat_loss`, `hsat_worker_loss`).

use std::sync::atomic::AtomicU64;

use hsat_core::losses::LevelLosses;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// A gauge of a float value.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// `level` and `view` of the loss gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    /// `patient`, `slide`, `patch` or `total`.
    pub level: &'static str,
    /// `clean` or `adversarial`.
    pub view: &'static str,
}

/// The loss levels, in label order.
pub const LEVELS: [&str; 4] = ["patient", "slide", "patch", "total"];
/// The views.
pub const VIEWS: [&str; 2] = ["clean", "adversarial"];

/// A loss family with all 8 series, NaN (not measured yet).
pub fn loss_family() -> Family<LossLabels, FloatGauge> {
    let family = Family::default();
    for view in VIEWS {
        set_losses(&family, view, None);
    }
    family
}

/// Sets the loss gauges of `view` from `losses`; absent losses become NaN (not
/// measured at that step), so a stale value is never shown as current.
pub fn set_losses(
    family: &Family<LossLabels, FloatGauge>,
    view: &'static str,
    losses: Option<LevelLosses>,
) {
    let values = losses.map_or([f64::NAN; 4], |l| [l.patient, l.slide, l.patch, l.total]);
    for (level, value) in LEVELS.into_iter().zip(values) {
        family.get_or_create(&LossLabels { level, view }).set(value);
    }
}
