//! White-box feature-space attacks of the evaluation (method.md §7.5): PGD, BIM,
//! MI-FGSM and FGSM, each maximising `-mean cosine(f(x_adv), f(x))` over the batch.
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
    /// Iterations (FGSM always takes one).
    pub steps: usize,
    /// MI-FGSM momentum decay.
    pub decay: f64,
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

impl FeatureAttack {
    /// Adversarial images for `images` `[N, 3, H, W]` in [0, 1] starting from `delta0`
    /// (same shape, values in `[-eps, eps]`). Returns the images (no gradient).
    pub fn run(&self, model: &Encoder, images: &Tensor, delta0: &Tensor) -> Result<Tensor> {
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
                }
            })?;
        }
        Ok(adv)
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

/// `alpha * sign(grad)`.
fn sign_step(grad: &Tensor, alpha: f64) -> Result<Tensor> {
    Ok(grad.f_sign()?.f_mul_scalar(alpha)?)
}
