//! One HSAT training step (method.md §5): PGD (inner maximisation), then the outer
//! minimisation in one of three modes, then the optimiser update.

use std::time::Instant;

use hsat_core::config::LossType;
use tch::Tensor;

use super::attack::Pgd;
use super::loss::HierarchicalLoss;
use super::optim::AdamW;
use crate::error::Result;
use crate::model::{Encoder, Pass};
pub use hsat_core::losses::StepLosses;

/// What the outer minimisation optimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OuterObjective {
    /// Plain HiDisc: `L(f(x))`.
    Clean,
    /// HSAT: `L(f(x_adv))`.
    OnlyAdv,
    /// `((1 - w) L(f(x)) + (1 + w) L(f(x_adv))) / 2` with the dynamic weight `w`.
    Mixed {
        /// `lambda_dyn * (1 - strength)`, 0 without dynamic augmentation.
        weight: f64,
    },
}

/// The inputs of one step besides the model state.
#[derive(Debug)]
pub struct StepInputs<'a> {
    /// Images `[B, S, P, V, C, H, W]` in [0, 1].
    pub images: &'a Tensor,
    /// The attack and its random start, absent for `Clean`.
    pub attack: Option<(Pgd, Tensor)>,
    /// The outer objective.
    pub objective: OuterObjective,
    /// Learning rate of this step.
    pub lr: f64,
}

/// Called between backward and the optimiser update with the named parameters
/// (their gradients set): distributed runs average the gradients across ranks here.
pub type GradientHook<'a> = dyn FnMut(&[(String, Tensor)]) -> Result<()> + 'a;

/// Runs one full step and updates `model` through `optimizer`.
pub fn train_step(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
) -> Result<StepLosses> {
    train_step_synced(model, loss, optimizer, plan, &mut |_| Ok(()))
        .map(|losses| losses.unwrap_or_else(unreachable_empty))
}

/// A single-process batch is never empty (the loader refuses a step without patients).
fn unreachable_empty() -> StepLosses {
    StepLosses {
        total: f64::NAN,
        clean: None,
        adversarial: None,
    }
}

/// What a step measured besides its losses (telemetry, `hsat_core::telemetry`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepMeasures {
    /// The attack's gain (see [`Pgd::run_with_gain`]), when measured.
    pub attack_gain: Option<f64>,
    /// Seconds crafting the adversarial examples.
    pub attack_seconds: f64,
    /// Seconds in the gradient hook (the all-reduce in distributed runs).
    pub sync_seconds: f64,
}

/// Runs one step with `sync` called between the backward pass and the optimiser
/// update: in distributed runs it replaces each rank's gradients by the weighted mean
/// over ranks, so every rank applies the same update.
///
/// An empty batch (a rank with no patients in this step) computes nothing, gives
/// zero gradients to `sync` and returns `None`; it still updates, like every rank.
pub fn train_step_synced(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
    sync: &mut GradientHook<'_>,
) -> Result<Option<StepLosses>> {
    Ok(train_step_measured(model, loss, optimizer, plan, sync, false)?.0)
}

/// [`train_step_synced`] that also times the attack and `sync` and, with
/// `measure_gain`, measures the attack's gain. The measurements change nothing that
/// is trained.
pub fn train_step_measured(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
    sync: &mut GradientHook<'_>,
    measure_gain: bool,
) -> Result<(Option<StepLosses>, StepMeasures)> {
    let mut sync_seconds = 0.0;
    let mut timed_sync = |params: &[(String, Tensor)]| -> Result<()> {
        let started = Instant::now();
        let result = sync(params);
        sync_seconds += started.elapsed().as_secs_f64();
        result
    };
    optimizer.zero_grad()?;
    if plan.images.size().first() == Some(&0) {
        // A zero-weight contribution that still defines every parameter's gradient.
        let mut zero = Tensor::f_zeros([], (tch::Kind::Float, model.device()))?;
        for (_, param) in optimizer.params() {
            zero = zero.f_add(&param.f_sum(tch::Kind::Float)?.f_mul_scalar(0.0)?)?;
        }
        zero.f_backward()?;
        timed_sync(optimizer.params())?;
        optimizer.step(plan.lr)?;
        let measures = StepMeasures {
            sync_seconds,
            ..StepMeasures::default()
        };
        return Ok((None, measures));
    }
    let StepInputs {
        images,
        attack,
        objective,
        lr,
    } = plan;
    let attack_started = Instant::now();
    let mut attack_gain = None;
    let x_adv = match &attack {
        Some((pgd, delta0)) => {
            let delta = if measure_gain {
                let (delta, gain) = pgd.run_with_gain(model, loss, images, delta0)?;
                attack_gain = gain;
                delta
            } else {
                pgd.run(model, loss, images, delta0)?
            };
            Some(images.f_add(&delta)?.f_detach()?)
        }
        None => None,
    };
    let attack_seconds = attack_started.elapsed().as_secs_f64();
    // The reference's order: adversarial forward first, then clean (batch-norm running
    // statistics depend on it).
    let adv = match (&x_adv, objective) {
        (Some(x_adv), OuterObjective::OnlyAdv | OuterObjective::Mixed { .. }) => {
            Some(loss.compute(
                &model.embed_batch(x_adv, Pass::TRAIN_ADV)?,
                LossType::P_S_PT,
            )?)
        }
        _ => None,
    };
    let clean = match objective {
        OuterObjective::Clean | OuterObjective::Mixed { .. } => {
            Some(loss.compute(&model.embed_batch(images, Pass::TRAIN)?, LossType::P_S_PT)?)
        }
        OuterObjective::OnlyAdv => None,
    };
    let total = match (objective, &clean, &adv) {
        (OuterObjective::Clean, Some(c), _) => c.total.shallow_clone(),
        (OuterObjective::OnlyAdv, _, Some(a)) => a.total.shallow_clone(),
        (OuterObjective::Mixed { weight }, Some(c), Some(a)) => c
            .total
            .f_mul_scalar(1.0 - weight)?
            .f_add(&a.total.f_mul_scalar(1.0 + weight)?)?
            .f_div_scalar(2.0)?,
        _ => {
            return Err(crate::error::WorkerError::Config(
                "an adversarial objective needs an attack (training.attack.name = \"pgd\")".into(),
            ));
        }
    };
    total.f_backward()?;
    timed_sync(optimizer.params())?;
    optimizer.step(lr)?;
    let losses = StepLosses {
        total: total.f_double_value(&[])?,
        clean: clean.as_ref().map(|c| c.values()).transpose()?,
        adversarial: adv.as_ref().map(|a| a.values()).transpose()?,
    };
    let measures = StepMeasures {
        attack_gain,
        attack_seconds,
        sync_seconds,
    };
    Ok((Some(losses), measures))
}
