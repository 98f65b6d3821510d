//! PGD on the hierarchical loss (method.md §5), the inner maximisation of HSAT, in
//! the reference's two variants (its `train.py`):
//!
//! - `pgd` (`pgd_attack`): start `delta0 = U(-eps, eps)` as drawn; each step
//!   `delta = clamp(delta + alpha sign(g), -eps, eps)`, then
//!   `delta = clamp(x + delta, 0, 1) - x`;
//! - `pgd_2` (`pgd_attack_2`): the start is clamped into `[-x, 1 - x]` (so `x + delta`
//!   lies in [0, 1] from the first forward pass), and each step clamps
//!   `delta = clamp(clamp(delta + alpha sign(g), -eps, eps), -x, 1 - x)`: the same set,
//!   with its own rounding.
//!
//! The model runs in eval mode (batch norm on running statistics) and, for a dual-BN
//! backbone, on its `pgd` branch ([`Pass::ATTACK`]), with parameter gradients switched
//! off: the backward pass then computes only `d loss / d delta`, which is all PGD
//! needs. The deltas are the same as those of the reference, which back-propagates
//! into the parameters too (checked against PyTorch fixtures).

use hsat_core::config::LossType;
use tch::Tensor;

use super::loss::HierarchicalLoss;
use crate::error::Result;
use crate::model::{Encoder, Pass};

/// Which of the reference's PGD variants runs (`training.attack.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgdVariant {
    /// `pgd`: clamp `x + delta` into [0, 1] after each step.
    #[default]
    Pgd,
    /// `pgd_2`: clamp the start and each step's `delta` into `[-x, 1 - x]`.
    Pgd2,
}

/// One PGD attack's settings, in pixel units (images are in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pgd {
    /// The variant.
    pub variant: PgdVariant,
    /// L-infinity radius.
    pub eps: f64,
    /// Step size of each sign step.
    pub alpha: f64,
    /// Number of steps.
    pub iters: usize,
    /// Loss levels the attack maximises.
    pub loss_type: LossType,
}

/// Turns parameter gradients off while an attack runs (only the input gradient is
/// needed) and back on when dropped, also on an error path. Shared by the training
/// PGD and the evaluation attacks.
pub(crate) struct FrozenParams<'a>(&'a Encoder);

impl<'a> FrozenParams<'a> {
    pub(crate) fn new(model: &'a Encoder) -> Result<Self> {
        model.set_requires_grad(false)?;
        Ok(FrozenParams(model))
    }
}

impl Drop for FrozenParams<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.0.set_requires_grad(true) {
            tracing::error!(%err, "could not re-enable parameter gradients after the attack");
        }
    }
}

impl Pgd {
    /// The reference's uniform random start: `rand_like(x) * eps * 2 - eps` for
    /// `pgd`, `zeros_like(x).uniform_(-eps, eps)` for `pgd_2` (the same draws of the
    /// generator, each variant's own arithmetic). `pgd_2`'s clamp into `[-x, 1 - x]`
    /// happens in [`Pgd::run`], which has the images.
    pub fn random_start(&self, images: &Tensor) -> Result<Tensor> {
        match self.variant {
            PgdVariant::Pgd => Ok(images
                .f_rand_like()?
                .f_mul_scalar(self.eps)?
                .f_mul_scalar(2.0)?
                .f_sub_scalar(self.eps)?),
            PgdVariant::Pgd2 => Ok(images.f_zeros_like()?.f_uniform_(-self.eps, self.eps)?),
        }
    }

    /// Crafts adversarial images for a hierarchical batch `[B, S, P, V, C, H, W]`
    /// from the start `delta0` (same shape). Returns the final delta (no gradient).
    pub fn run(
        &self,
        model: &Encoder,
        loss: &HierarchicalLoss,
        images: &Tensor,
        delta0: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.iterate(model, loss, images, delta0, false)?.0)
    }

    /// [`Pgd::run`] that also measures the attack's gain: the attack's loss at the
    /// final delta minus at `delta0`, both in eval mode as the attack sees them.
    /// The loss at the start comes from the first iteration; the one at the end
    /// costs one more forward pass without gradients (eval mode: no batch-norm
    /// update, no random draw, so training is unchanged). `None` with 0 iterations.
    pub fn run_with_gain(
        &self,
        model: &Encoder,
        loss: &HierarchicalLoss,
        images: &Tensor,
        delta0: &Tensor,
    ) -> Result<(Tensor, Option<f64>)> {
        self.iterate(model, loss, images, delta0, true)
    }

    fn iterate(
        &self,
        model: &Encoder,
        loss: &HierarchicalLoss,
        images: &Tensor,
        delta0: &Tensor,
        measure: bool,
    ) -> Result<(Tensor, Option<f64>)> {
        let mut objective =
            |emb: &Tensor| -> Result<Tensor> { Ok(loss.compute(emb, self.loss_type)?.total) };
        self.run_with_objective(model, images, delta0, measure, &mut objective)
    }

    /// [`Pgd::run`] (with the gain when `measure`) that maximises `objective`, a
    /// scalar of the embeddings `[B, S, P, V, D]`, instead of the loss of this batch:
    /// distributed steps with a global loss pass the loss of the whole step (which
    /// gathers every rank's embeddings, so all ranks iterate together).
    pub fn run_with_objective(
        &self,
        model: &Encoder,
        images: &Tensor,
        delta0: &Tensor,
        measure: bool,
        objective: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<f64>)> {
        let _frozen = FrozenParams::new(model)?;
        let images = images.f_detach()?;
        // pgd_2 keeps x + delta in [0, 1] with tensor bounds: -x and 1 - x.
        let bounds = match self.variant {
            PgdVariant::Pgd => None,
            PgdVariant::Pgd2 => Some((images.f_neg()?, images.f_neg()?.f_add_scalar(1.0)?)),
        };
        let mut delta = match &bounds {
            None => delta0.f_detach()?,
            Some((low, high)) => delta0.f_detach()?.f_clamp_tensor(Some(low), Some(high))?,
        };
        let mut start_loss = None;
        for _ in 0..self.iters {
            let delta_var = delta.f_detach()?.f_set_requires_grad(true)?;
            let emb = model.embed_batch(&images.f_add(&delta_var)?, Pass::ATTACK)?;
            let value = objective(&emb)?;
            if measure && start_loss.is_none() {
                start_loss = Some(value.f_double_value(&[])?);
            }
            let grad = Tensor::f_run_backward(&[&value], &[&delta_var], false, false)?
                .pop()
                .ok_or_else(|| {
                    tch::TchError::Torch("autograd returned no gradient for delta".into())
                })?;
            delta = tch::no_grad(|| self.project(&images, bounds.as_ref(), &delta, &grad))?;
        }
        let gain = match start_loss {
            Some(start) => {
                let end = tch::no_grad(|| -> Result<f64> {
                    let emb = model.embed_batch(&images.f_add(&delta)?, Pass::ATTACK)?;
                    Ok(objective(&emb)?.f_double_value(&[])?)
                })?;
                Some(end - start)
            }
            None => None,
        };
        Ok((delta, gain))
    }

    /// One sign step and both clamps, in the reference's order of operations for
    /// the variant (`bounds` = `(-x, 1 - x)` for `pgd_2`).
    fn project(
        &self,
        images: &Tensor,
        bounds: Option<&(Tensor, Tensor)>,
        delta: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let stepped = delta.f_add(&grad.f_sign()?.f_mul_scalar(self.alpha)?)?;
        let bounded = stepped.f_clamp(-self.eps, self.eps)?;
        match bounds {
            None => Ok(images.f_add(&bounded)?.f_clamp(0.0, 1.0)?.f_sub(images)?),
            Some((low, high)) => Ok(bounded.f_clamp_tensor(Some(low), Some(high))?),
        }
    }
}
