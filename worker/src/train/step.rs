//! One HSAT training step (method.md §5): PGD (inner maximisation), then the outer
//! minimisation in one of three modes, then the optimiser update.

use std::time::Instant;

use hsat_core::config::LossType;
use tch::Tensor;

use super::attack::Pgd;
use super::loss::{HierarchicalLoss, LevelLossTensors};
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
/// (their gradients set): distributed runs sum the gradients across ranks here (each
/// rank's loss already carries its [`StepScope::loss_weight`]).
pub type GradientHook<'a> = dyn FnMut(&[(String, Tensor)]) -> Result<()> + 'a;

/// Gathers every rank's rows `[n_r, ...]` of a distributed step into the whole step's
/// `[N, ...]`, in single-process order, without gradient (global loss scope).
pub type RowGather<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// The whole step's rows for a loss over the whole step (`training.loss_scope =
/// "global"`).
pub struct GlobalRows<'a> {
    /// All-gathers the embeddings of every rank.
    pub gather: Box<RowGather<'a>>,
    /// Row of this rank's first patient in the whole step.
    pub first_row: i64,
}

/// What a rank's loss covers and how much it weighs in the step's objective.
pub struct StepScope<'a> {
    /// Factor of this rank's loss before backward: its share of the step's patients
    /// with a local loss (gradients are then summed, which gives the weighted mean),
    /// 1 with a global loss (every rank differentiates the same loss through its own
    /// rows, and the sum is the whole-batch gradient) and on one process.
    pub loss_weight: f64,
    /// `Some`: the loss of the whole step (rows of the other ranks detached).
    pub global: Option<GlobalRows<'a>>,
}

impl std::fmt::Debug for StepScope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepScope")
            .field("loss_weight", &self.loss_weight)
            .field("global", &self.global.as_ref().map(|g| g.first_row))
            .finish()
    }
}

impl StepScope<'_> {
    /// A single process: the loss of its batch, weight 1.
    pub fn whole_batch() -> StepScope<'static> {
        StepScope {
            loss_weight: 1.0,
            global: None,
        }
    }

    /// The loss this rank differentiates, of its embeddings `emb` `[n, S, P, V, D]`:
    /// local, or of the whole step with the other ranks' rows detached. `None` for
    /// an empty shard with a local loss (there is no loss of zero patients).
    pub fn loss(
        &mut self,
        loss: &HierarchicalLoss,
        emb: &Tensor,
        levels: LossType,
    ) -> Result<Option<LevelLossTensors>> {
        let rows = emb.size().first().copied().unwrap_or(0);
        let Some(global) = self.global.as_mut() else {
            return if rows == 0 {
                Ok(None)
            } else {
                loss.compute(emb, levels).map(Some)
            };
        };
        let whole = (global.gather)(&emb.f_detach()?)?;
        let total = whole.size()[0];
        let first = global.first_row;
        let after = first + rows;
        if after > total {
            return Err(crate::error::WorkerError::Config(format!(
                "rows {first}..{after} of this rank lie outside the step's {total} rows"
            )));
        }
        let joined = Tensor::f_cat(
            &[
                whole.f_narrow(0, 0, first)?,
                emb.shallow_clone(),
                whole.f_narrow(0, after, total - after)?,
            ],
            0,
        )?;
        loss.compute(&joined, levels).map(Some)
    }

    /// [`StepScope::loss`]'s total, or for an empty shard with a local loss a zero that
    /// still depends on `emb` (its backward pass reaches every synchronised batch norm,
    /// whose peers wait for its all-reduce).
    fn objective(
        &mut self,
        loss: &HierarchicalLoss,
        emb: &Tensor,
        levels: LossType,
    ) -> Result<(Tensor, Option<LevelLossTensors>)> {
        match self.loss(loss, emb, levels)? {
            Some(parts) => Ok((parts.total.shallow_clone(), Some(parts))),
            None => Ok((emb.f_sum(tch::Kind::Float)?.f_mul_scalar(0.0)?, None)),
        }
    }
}

/// Runs one full step and updates `model` through `optimizer`.
pub fn train_step(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
) -> Result<StepLosses> {
    train_step_synced(
        model,
        loss,
        optimizer,
        plan,
        StepScope::whole_batch(),
        &mut |_| Ok(()),
    )
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
/// update: in distributed runs it sums each rank's gradients over ranks (the losses
/// carry `scope`'s weights), so every rank applies the same update.
///
/// An empty batch (a rank with no patients in this step) gives zero gradients to
/// `sync` and returns `None` with a local loss; it still updates, like every rank.
/// With synchronised batch norm or a global loss it runs every pass on its zero rows,
/// since its peers wait for the collectives inside them.
pub fn train_step_synced(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
    scope: StepScope<'_>,
    sync: &mut GradientHook<'_>,
) -> Result<Option<StepLosses>> {
    Ok(train_step_measured(model, loss, optimizer, plan, scope, sync, false)?.0)
}

/// [`train_step_synced`] that also times the attack and `sync` and, with
/// `measure_gain`, measures the attack's gain. The measurements change nothing that
/// is trained.
pub fn train_step_measured(
    model: &Encoder,
    loss: &HierarchicalLoss,
    optimizer: &mut AdamW,
    plan: StepInputs<'_>,
    mut scope: StepScope<'_>,
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
    let synced_bn = model.batch_norm_sync();
    let joins_collectives = synced_bn.is_some() || scope.global.is_some();
    if plan.images.size().first() == Some(&0) && !joins_collectives {
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
            // The attack maximises the loss this rank trains on (global: the whole
            // step's, one all-gather per iteration).
            let mut objective = |emb: &Tensor| -> Result<Tensor> {
                Ok(scope.objective(loss, emb, pgd.loss_type)?.0)
            };
            let (delta, gain) =
                pgd.run_with_objective(model, images, delta0, measure_gain, &mut objective)?;
            attack_gain = gain;
            Some(images.f_add(&delta)?.f_detach()?)
        }
        None => None,
    };
    let attack_seconds = attack_started.elapsed().as_secs_f64();
    // The reference's order: adversarial forward first, then clean (batch-norm running
    // statistics depend on it).
    let adv = match (&x_adv, objective) {
        (Some(x_adv), OuterObjective::OnlyAdv | OuterObjective::Mixed { .. }) => {
            Some(scope.objective(
                loss,
                &model.embed_batch(x_adv, Pass::TRAIN_ADV)?,
                LossType::P_S_PT,
            )?)
        }
        _ => None,
    };
    let clean = match objective {
        OuterObjective::Clean | OuterObjective::Mixed { .. } => Some(scope.objective(
            loss,
            &model.embed_batch(images, Pass::TRAIN)?,
            LossType::P_S_PT,
        )?),
        OuterObjective::OnlyAdv => None,
    };
    let total = match (objective, &clean, &adv) {
        (OuterObjective::Clean, Some(c), _) => c.0.shallow_clone(),
        (OuterObjective::OnlyAdv, _, Some(a)) => a.0.shallow_clone(),
        (OuterObjective::Mixed { weight }, Some(c), Some(a)) => {
            c.0.f_mul_scalar(1.0 - weight)?
                .f_add(&a.0.f_mul_scalar(1.0 + weight)?)?
                .f_div_scalar(2.0)?
        }
        _ => {
            return Err(crate::error::WorkerError::Config(
                "an adversarial objective needs an attack (training.attack.name = \"pgd\")".into(),
            ));
        }
    };
    let weighted = if scope.loss_weight == 1.0 {
        total.shallow_clone()
    } else {
        total.f_mul_scalar(scope.loss_weight)?
    };
    if let Err(err) = weighted.f_backward() {
        // A synchronised batch norm's all-reduce failed inside the backward pass: say
        // so as a collective failure (the group must be rebuilt), not a torch error.
        if let Some(failure) = synced_bn.as_ref().and_then(|s| s.take_backward_failure()) {
            return Err(failure.into());
        }
        return Err(err.into());
    }
    timed_sync(optimizer.params())?;
    optimizer.step(lr)?;
    let values = |part: &Option<(Tensor, Option<LevelLossTensors>)>| {
        part.as_ref()
            .and_then(|(_, parts)| parts.as_ref())
            .map(LevelLossTensors::values)
            .transpose()
    };
    let measured = clean
        .iter()
        .chain(adv.iter())
        .all(|(_, parts)| parts.is_some());
    if !measured {
        // An empty shard with a local loss: nothing to report.
        let measures = StepMeasures {
            attack_gain: None,
            attack_seconds,
            sync_seconds,
        };
        return Ok((None, measures));
    }
    let losses = StepLosses {
        total: total.f_double_value(&[])?,
        clean: values(&clean)?,
        adversarial: values(&adv)?,
    };
    let measures = StepMeasures {
        attack_gain,
        attack_seconds,
        sync_seconds,
    };
    Ok((Some(losses), measures))
}
