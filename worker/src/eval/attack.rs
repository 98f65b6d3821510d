//! White-box feature-space attacks of the evaluation (method.md §7.5): PGD, BIM,
//! MI-FGSM and FGSM, each maximising `-mean cosine(f(x_adv), f(x))` over the batch,
//! and APGD, an adaptive attack on the same objective (below).
//!
//! The definitions follow the HSAT reference's `attacks/pgd.py` (`PGD_KNN`, `BIM_KNN`,
//! `MIFGSM_KNN`, `FFGSM_KNN`) operation by operation, so that the same start gives the
//! same images as PyTorch (`worker/tests/attack_parity.rs`):
//!
//! - every attack starts at `clamp(x + delta0, 0, 1)` with `delta0 ~ U(-eps, eps)`;
//!   the start is an input ([`random_start`] draws it from a seed, per patch);
//! - PGD and MI-FGSM project with `delta = clamp(adv - x, -eps, eps)`,
//!   `adv = clamp(x + delta, 0, 1)`; BIM clips `adv` into
//!   `[max(x - eps, 0), x + eps]`, then to at most 1;
//! - MI-FGSM divides each image's gradient by its mean absolute value, adds
//!   `decay * momentum`, and steps along the sign of the sum;
//! - FGSM ("fast" FGSM, Wong et al.) takes one step of its own size from the start.
//!
//! APGD follows Croce & Hein 2020 ("Reliable evaluation of adversarial robustness
//! with an ensemble of diverse parameter-free attacks", Algorithm 1, L-infinity), in
//! its "best loss" form, since a feature-space attack has no label to flip: per patch,
//! the objective is `-cosine(f(x_adv), f(x))` and the attack returns the point of
//! highest objective seen over all iterations and restarts ([`FeatureAttack::apgd`]).
//! A fixed step size either overshoots (PGD with `alpha = eps / 4` oscillates at the
//! ball's corners) or crawls; APGD starts at `2 eps` and halves per patch when
//! progress stalls, so one setting works at every budget and on every model:
//!
//! - step `z = P(x_k + eta sign(grad))`, then
//!   `x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))` (the first step is
//!   plain: momentum 0); `P` clips into the eps ball and [0, 1];
//! - checkpoints: the first after `0.22 N` iterations, each next interval `0.03 N`
//!   shorter, never below `0.06 N` (`N` = `steps`; each rounded down, at least 1);
//! - at a checkpoint, a patch halves its step size and restarts from its best point
//!   (with its gradient there) when the objective rose in at most 75 % of the
//!   interval's iterations, or when its step was not halved at the previous
//!   checkpoint and its best objective has not improved since then;
//! - `restarts` independent random starts; the best point over all of them is kept.
//!
//! The first interval counts its increases from the starting point's objective (the
//! paper's definition); AutoAttack's code compares the first iteration with an unset
//! (zero) entry instead. The PyTorch twin in `scripts/fixtures/apgd_fixtures.py`
//! implements this module's definition and `worker/tests/attack_parity.rs` checks the
//! two agree.
//!
//! The model runs in eval mode (batch norm on running statistics) with parameter
//! gradients off, so each backward pass computes only `d loss / d x_adv`.

use hsat_core::config::{EvalAttack, EvalTarget};
use hsat_core::rng::{SplitMix64, derive_seed};
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::model::{Encoder, Pass};
use crate::train::attack::FrozenParams;

/// Smallest product of norms `cosine_similarity` divides by (PyTorch's default).
const COSINE_EPS: f64 = 1e-8;

/// One configured attack. Sizes are in pixel units (images are in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureAttack {
    /// Which attack.
    pub kind: EvalAttack,
    /// L-infinity radius.
    pub eps: f64,
    /// Step size (for FGSM, its single step).
    pub alpha: f64,
    /// Iterations (FGSM always takes one; APGD takes this many per restart).
    pub steps: usize,
    /// MI-FGSM momentum decay.
    pub decay: f64,
    /// Random starts: APGD's restarts; 1 for the others.
    pub restarts: usize,
    /// The output pushed away from the clean one.
    pub target: EvalTarget,
}

/// The attacked output of `model` for images `[N, 3, H, W]` in `pass`. The attacks use
/// [`Pass::ATTACK`] for the clean output and the adversarial ones alike (eval mode, and
/// the `pgd` branch of a dual-batch-norm backbone: the reference's
/// `get_logits(.., dual_bn)` calls `model(x, 'pgd')` for both); the features the
/// k-NN then measures use [`Pass::EVAL`] (`get_features(.., bn_name="normal")`).
pub fn attacked_output(
    model: &Encoder,
    images: &Tensor,
    target: EvalTarget,
    pass: Pass,
) -> Result<Tensor> {
    match target {
        EvalTarget::Backbone => model.features(images, pass),
        EvalTarget::Projection => model.embed(images, pass),
    }
}

/// A uniform start `delta0 ~ U(-eps, eps)` of one image of `numel` values, as f32, drawn
/// from `SplitMix64(seed)`: value `i` is `(2 u_i - 1) * eps` with `u_i` the stream's
/// `i`-th [`SplitMix64::unit`]. The same seed gives the same start on any machine,
/// which is what lets a PyTorch script replay the attack.
pub fn random_start(numel: usize, eps: f64, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..numel)
        .map(|_| ((2.0 * rng.unit() - 1.0) * eps) as f32)
        .collect()
}

/// The seed of the random start of patch `patch` under attack number `attack` of an
/// evaluation seeded with `seed`: independent of batch size and order.
pub fn start_seed(seed: u64, attack: usize, patch: usize) -> u64 {
    derive_seed(seed, &[0xE7A1, attack as u64, patch as u64])
}

/// The seed of restart `restart` of patch `patch` under attack number `attack`:
/// restart 0 is [`start_seed`] (so a single-start attack keeps its start), the others
/// have their own stream.
pub fn restart_seed(seed: u64, attack: usize, patch: usize, restart: usize) -> u64 {
    match restart {
        0 => start_seed(seed, attack, patch),
        r => derive_seed(seed, &[0xE7A2, attack as u64, patch as u64, r as u64]),
    }
}

/// What [`FeatureAttack::apgd`] found.
#[derive(Debug)]
pub struct ApgdOutcome {
    /// Per patch, the point of highest objective over all iterations and restarts
    /// (no gradient).
    pub images: Tensor,
    /// Per patch, the objective `-cosine(f(x_adv), f(x))` at `images`.
    pub objective: Vec<f32>,
    /// `[restart][patch]`: how often the patch's step size was halved.
    pub halvings: Vec<Vec<u32>>,
}

/// APGD's checkpoint schedule for `steps` iterations (Croce & Hein 2020, §3.2): the
/// first interval, the decrease per checkpoint and the shortest interval, each at
/// least 1 (`max(int(fraction * steps), 1)`, as AutoAttack's `n_iter_2`, `size_decr`
/// and `n_iter_min`).
fn apgd_schedule(steps: usize) -> (usize, usize, usize) {
    let part = |fraction: f64| ((fraction * steps as f64) as usize).max(1);
    (part(0.22), part(0.03), part(0.06))
}

/// APGD's momentum (weight of the previous displacement is `1 - APGD_MOMENTUM`).
const APGD_MOMENTUM: f64 = 0.75;
/// A checkpoint halves the step when the objective rose in at most this fraction of
/// the interval's iterations.
const APGD_RHO: f64 = 0.75;

impl FeatureAttack {
    /// Random starts this attack takes per patch: `restarts` for APGD, else 1.
    pub fn starts(&self) -> usize {
        match self.kind {
            EvalAttack::Apgd => self.restarts.max(1),
            _ => 1,
        }
    }

    /// Adversarial images for `images` `[N, 3, H, W]` in [0, 1] from the random
    /// starts `starts` ([`Self::starts`] of them, each the images' shape with values
    /// in `[-eps, eps]`). Returns the images (no gradient).
    pub fn run(&self, model: &Encoder, images: &Tensor, starts: &[Tensor]) -> Result<Tensor> {
        if starts.len() != self.starts() {
            return Err(tch::TchError::Torch(format!(
                "{} needs {} random starts per batch, got {}",
                self.kind.name(),
                self.starts(),
                starts.len()
            ))
            .into());
        }
        if self.kind == EvalAttack::Apgd {
            return Ok(self.apgd(model, images, starts)?.images);
        }
        let delta0 = &starts[0];
        let _frozen = FrozenParams::new(model)?;
        let images = images.f_detach()?;
        let clean = tch::no_grad(|| attacked_output(model, &images, self.target, Pass::ATTACK))?;
        let mut adv = images.f_add(delta0)?.f_clamp(0.0, 1.0)?;
        let steps = match self.kind {
            EvalAttack::Fgsm => 1,
            _ => self.steps,
        };
        let mut momentum: Option<Tensor> = None;
        for _ in 0..steps {
            let grad = self.gradient(model, &clean, &adv)?;
            adv = tch::no_grad(|| -> Result<Tensor> {
                match self.kind {
                    EvalAttack::Pgd => {
                        self.project(&images, &adv.f_add(&sign_step(&grad, self.alpha)?)?)
                    }
                    EvalAttack::Fgsm => {
                        self.project(&images, &adv.f_add(&sign_step(&grad, self.alpha)?)?)
                    }
                    EvalAttack::Bim => {
                        self.bim_clip(&images, &adv.f_add(&sign_step(&grad, self.alpha)?)?)
                    }
                    EvalAttack::MiFgsm => {
                        let scale =
                            grad.f_abs()?
                                .f_mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float)?;
                        let mut g = grad.f_div(&scale)?;
                        if let Some(m) = &momentum {
                            g = g.f_add(&m.f_mul_scalar(self.decay)?)?;
                        }
                        let stepped = adv.f_add(&sign_step(&g, self.alpha)?)?;
                        momentum = Some(g);
                        self.project(&images, &stepped)
                    }
                    EvalAttack::Apgd => unreachable!("APGD returned above"),
                }
            })?;
        }
        Ok(adv)
    }

    /// APGD (module docs) from each of `starts` in turn; per patch, the best point of
    /// all restarts. Every patch is independent of the others (eval mode), so the
    /// result does not depend on the batch.
    pub fn apgd(&self, model: &Encoder, images: &Tensor, starts: &[Tensor]) -> Result<ApgdOutcome> {
        let _frozen = FrozenParams::new(model)?;
        let images = images.f_detach()?;
        let clean = tch::no_grad(|| attacked_output(model, &images, self.target, Pass::ATTACK))?;
        let n = images.size()[0] as usize;
        let mut best = images.shallow_clone();
        let mut objective = vec![f32::NEG_INFINITY; n];
        let mut halvings = Vec::with_capacity(starts.len());
        for delta0 in starts {
            let run = self.apgd_restart(model, &images, &clean, delta0)?;
            // Strictly better only: a tie keeps the earlier restart's point.
            let better: Vec<bool> = run
                .objective
                .iter()
                .zip(&objective)
                .map(|(new, old)| new > old)
                .collect();
            best = select(&better, &run.images, &best)?;
            for (old, (&new, &b)) in objective.iter_mut().zip(run.objective.iter().zip(&better)) {
                if b {
                    *old = new;
                }
            }
            halvings.push(run.halvings.into_iter().next().unwrap_or_default());
        }
        Ok(ApgdOutcome {
            images: best,
            objective,
            halvings,
        })
    }

    /// One APGD run from `delta0`: its best point per patch, the objective there and
    /// the halvings of each patch's step.
    fn apgd_restart(
        &self,
        model: &Encoder,
        images: &Tensor,
        clean: &Tensor,
        delta0: &Tensor,
    ) -> Result<ApgdOutcome> {
        let n = images.size()[0] as usize;
        let (mut interval, decrease, shortest) = apgd_schedule(self.steps);
        let mut adv = images.f_add(delta0)?.f_clamp(0.0, 1.0)?;
        let (mut objective, mut grad) = self.objectives(model, clean, &adv)?;
        let mut best = adv.shallow_clone();
        let mut best_grad = grad.shallow_clone();
        let mut best_objective = objective.clone();
        // history[t]: the objectives after t iterations (t = 0: the start).
        let mut history = vec![objective.clone()];
        // f32 like AutoAttack's `step_size` tensor: halving is exact either way.
        let mut step = vec![(2.0 * self.eps) as f32; n];
        let mut halvings = vec![0_u32; n];
        let mut previous = adv.shallow_clone();
        let mut best_at_checkpoint = best_objective.clone();
        // No "not halved last time" condition at the first checkpoint.
        let mut halved_at_checkpoint = vec![true; n];
        let mut since_checkpoint = 0;
        for iteration in 0..self.steps {
            adv = tch::no_grad(|| -> Result<Tensor> {
                let eta = Tensor::from_slice(&step)
                    .f_to_device(adv.device())?
                    .f_reshape([n as i64, 1, 1, 1])?;
                let z = self.clip(images, &adv.f_add(&grad.f_sign()?.f_mul(&eta)?)?)?;
                let a = if iteration == 0 { 1.0 } else { APGD_MOMENTUM };
                let moved = adv
                    .f_add(&z.f_sub(&adv)?.f_mul_scalar(a)?)?
                    .f_add(&adv.f_sub(&previous)?.f_mul_scalar(1.0 - a)?)?;
                previous = adv.shallow_clone();
                self.clip(images, &moved)
            })?;
            (objective, grad) = self.objectives(model, clean, &adv)?;
            let improved: Vec<bool> = objective
                .iter()
                .zip(&best_objective)
                .map(|(now, best)| now > best)
                .collect();
            best = select(&improved, &adv, &best)?;
            best_grad = select(&improved, &grad, &best_grad)?;
            for (b, (&now, &up)) in best_objective
                .iter_mut()
                .zip(objective.iter().zip(&improved))
            {
                if up {
                    *b = now;
                }
            }
            history.push(objective.clone());
            since_checkpoint += 1;
            if since_checkpoint < interval {
                continue;
            }
            let recent = &history[history.len() - 1 - interval..];
            let halve: Vec<bool> = (0..n)
                .map(|i| {
                    let increases = recent.windows(2).filter(|w| w[1][i] > w[0][i]).count();
                    let oscillating = increases as f64 <= APGD_RHO * interval as f64;
                    let stalled =
                        !halved_at_checkpoint[i] && best_at_checkpoint[i] >= best_objective[i];
                    oscillating || stalled
                })
                .collect();
            for i in (0..n).filter(|&i| halve[i]) {
                step[i] /= 2.0;
                halvings[i] += 1;
            }
            adv = select(&halve, &best, &adv)?;
            grad = select(&halve, &best_grad, &grad)?;
            halved_at_checkpoint = halve;
            best_at_checkpoint = best_objective.clone();
            interval = interval.saturating_sub(decrease).max(shortest);
            since_checkpoint = 0;
        }
        Ok(ApgdOutcome {
            images: best,
            objective: best_objective,
            halvings: vec![halvings],
        })
    }

    /// Per patch `-cosine(clean_n, f(adv)_n)`, and `d/d adv` of their sum (each
    /// patch's gradient is its own objective's: the model is in eval mode).
    fn objectives(
        &self,
        model: &Encoder,
        clean: &Tensor,
        adv: &Tensor,
    ) -> Result<(Vec<f32>, Tensor)> {
        let adv_var = adv.f_detach()?.f_set_requires_grad(true)?;
        let out = attacked_output(model, &adv_var, self.target, Pass::ATTACK)?;
        let n = out.size()[0];
        let out = out.f_reshape([n, -1])?;
        let clean = clean.f_reshape([n, -1])?;
        let per_patch = Tensor::f_cosine_similarity(&clean, &out, 1, COSINE_EPS)?.f_neg()?;
        let total = per_patch.f_sum(Kind::Float)?;
        let grad = Tensor::f_run_backward(&[&total], &[&adv_var], false, false)?
            .pop()
            .ok_or_else(|| {
                tch::TchError::Torch("autograd returned no gradient for the images".into())
            })?;
        let values = Vec::<f32>::try_from(&per_patch.f_detach()?.f_to_device(tch::Device::Cpu)?)?;
        Ok((values, grad))
    }

    /// APGD's projection, as AutoAttack's: `clamp(min(max(adv, x - eps), x + eps), 0, 1)`.
    fn clip(&self, images: &Tensor, adv: &Tensor) -> Result<Tensor> {
        let low = images.f_sub_scalar(self.eps)?;
        let high = images.f_add_scalar(self.eps)?;
        Ok(adv.f_maximum(&low)?.f_minimum(&high)?.f_clamp(0.0, 1.0)?)
    }

    /// `d/d adv` of `-mean_n cosine(clean_n, f(adv)_n)`.
    fn gradient(&self, model: &Encoder, clean: &Tensor, adv: &Tensor) -> Result<Tensor> {
        let adv_var = adv.f_detach()?.f_set_requires_grad(true)?;
        let out = attacked_output(model, &adv_var, self.target, Pass::ATTACK)?;
        let n = out.size()[0];
        let out = out.f_reshape([n, -1])?;
        let clean = clean.f_reshape([n, -1])?;
        let cost = Tensor::f_cosine_similarity(&clean, &out, 1, COSINE_EPS)?
            .f_mean(Kind::Float)?
            .f_neg()?;
        Ok(Tensor::f_run_backward(&[&cost], &[&adv_var], false, false)?
            .pop()
            .ok_or_else(|| {
                tch::TchError::Torch("autograd returned no gradient for the images".into())
            })?)
    }

    /// `clamp(x + clamp(adv - x, -eps, eps), 0, 1)` (PGD, MI-FGSM, FGSM).
    fn project(&self, images: &Tensor, adv: &Tensor) -> Result<Tensor> {
        let delta = adv.f_sub(images)?.f_clamp(-self.eps, self.eps)?;
        Ok(images.f_add(&delta)?.f_clamp(0.0, 1.0)?)
    }

    /// The reference BIM's clip: `max(adv, max(x - eps, 0))`, then `min(., x + eps)`,
    /// then at most 1.
    fn bim_clip(&self, images: &Tensor, adv: &Tensor) -> Result<Tensor> {
        let low = images.f_sub_scalar(self.eps)?.f_clamp_min(0.0)?;
        let high = images.f_add_scalar(self.eps)?;
        Ok(adv.f_maximum(&low)?.f_minimum(&high)?.f_clamp_max(1.0)?)
    }
}

/// Per patch (first dimension), `when_true` where `mask` holds, else `otherwise`.
fn select(mask: &[bool], when_true: &Tensor, otherwise: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1_i64; when_true.dim()];
    shape[0] = mask.len() as i64;
    let mask = Tensor::from_slice(mask)
        .f_to_device(when_true.device())?
        .f_reshape(shape.as_slice())?;
    Ok(when_true.f_where_self(&mask, otherwise)?)
}

/// `alpha * sign(grad)`.
fn sign_step(grad: &Tensor, alpha: f64) -> Result<Tensor> {
    Ok(grad.f_sign()?.f_mul_scalar(alpha)?)
}
