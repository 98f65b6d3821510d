//! The hierarchical contrastive loss of HiDisc (method.md §4): SupCon in its
//! unsupervised form at patient, slide and patch level.

use hsat_core::config::{LossType, ObjectiveConfig};
pub use hsat_core::losses::LevelLosses;
use tch::{Kind, Tensor};

use crate::error::{Result, WorkerError};

/// SupCon weights and temperatures of the three levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HierarchicalLoss {
    /// Weight of the patient level.
    pub lambda_patient: f64,
    /// Weight of the slide level.
    pub lambda_slide: f64,
    /// Weight of the patch level.
    pub lambda_patch: f64,
    /// SupCon temperature T.
    pub temperature: f64,
    /// SupCon base temperature T_base (the loss is scaled by T / T_base).
    pub base_temperature: f64,
}

/// The loss of one batch: each enabled level unweighted, and the weighted total.
#[derive(Debug)]
pub struct LevelLossTensors {
    /// Patient-level loss, if the level is on.
    pub patient: Option<Tensor>,
    /// Slide-level loss, if the level is on.
    pub slide: Option<Tensor>,
    /// Patch-level loss, if the level is on.
    pub patch: Option<Tensor>,
    /// `lp * patient + ls * slide + lpt * patch` over the enabled levels (0-d).
    pub total: Tensor,
}

impl LevelLossTensors {
    /// Reads the values back to the host.
    pub fn values(&self) -> Result<LevelLosses> {
        let read = |t: &Option<Tensor>| -> Result<f64> {
            t.as_ref().map_or(Ok(0.0), |t| Ok(t.f_double_value(&[])?))
        };
        Ok(LevelLosses {
            patient: read(&self.patient)?,
            slide: read(&self.slide)?,
            patch: read(&self.patch)?,
            total: self.total.f_double_value(&[])?,
        })
    }
}

impl From<&ObjectiveConfig> for HierarchicalLoss {
    fn from(cfg: &ObjectiveConfig) -> Self {
        HierarchicalLoss {
            lambda_patient: cfg.lambda_patient,
            lambda_slide: cfg.lambda_slide,
            lambda_patch: cfg.lambda_patch,
            temperature: cfg.temperature,
            base_temperature: cfg.base_temperature,
        }
    }
}

impl HierarchicalLoss {
    /// The loss of embeddings `[B, S, P, V, D]` (rows L2-normalised) over the levels
    /// `levels` turns on.
    ///
    /// Errors, before any computation, if an enabled level has one member per group.
    pub fn compute(&self, emb: &Tensor, levels: LossType) -> Result<LevelLossTensors> {
        let shape = emb.size();
        let &[b, s, p, v, d] = shape.as_slice() else {
            return Err(WorkerError::BatchShape {
                shape,
                reason: "embeddings must be [patients, slides, patches, views, dim]".into(),
            });
        };
        let plan = [
            (
                levels.patient,
                "patient",
                b,
                s * p * v,
                self.lambda_patient,
                "num_slide_samples, num_patch_samples or num_transforms",
            ),
            (
                levels.slide,
                "slide",
                b * s,
                p * v,
                self.lambda_slide,
                "num_patch_samples or num_transforms",
            ),
            (
                levels.patch,
                "patch",
                b * s * p,
                v,
                self.lambda_patch,
                "num_transforms",
            ),
        ];
        for &(on, level, _, members, _, fix) in &plan {
            if on && members < 2 {
                return Err(WorkerError::DegenerateLevel {
                    level,
                    members,
                    shape: shape.clone(),
                    fix,
                });
            }
        }
        let mut parts: [Option<Tensor>; 3] = [None, None, None];
        let mut total: Option<Tensor> = None;
        for (slot, &(on, _, groups, members, weight, _)) in parts.iter_mut().zip(&plan) {
            if !on {
                continue;
            }
            let level = self.supcon(&emb.f_reshape([groups, members, d])?)?;
            let weighted = level.f_mul_scalar(weight)?;
            total = Some(match total {
                None => weighted,
                Some(acc) => acc.f_add(&weighted)?,
            });
            *slot = Some(level);
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::f_zeros([], (Kind::Float, emb.device()))?,
        };
        let [patient, slide, patch] = parts;
        Ok(LevelLossTensors {
            patient,
            slide,
            patch,
            total,
        })
    }

    /// Unsupervised SupCon over `[N groups, M members, D]`: positives are the other
    /// members of the anchor's group; every member is an anchor ("contrast_mode all").
    pub fn supcon(&self, features: &Tensor) -> Result<Tensor> {
        let size = features.size();
        let (groups, members, dim) = (size[0], size[1], size[2]);
        let device = features.device();
        let count = groups * members;
        // Member-major flattening: row a = member * groups + group.
        let z = features.f_transpose(0, 1)?.f_reshape([count, dim])?;
        let logits = z
            .f_matmul(&z.f_transpose(0, 1)?)?
            .f_div_scalar(self.temperature)?;
        let (row_max, _) = logits.f_max_dim(1, true)?;
        let logits = logits.f_sub(&row_max.f_detach()?)?;

        let group_of = Tensor::f_arange(count, (Kind::Int64, device))?.f_remainder(groups)?;
        let same_group = group_of
            .f_unsqueeze(1)?
            .f_eq_tensor(&group_of.f_unsqueeze(0)?)?
            .f_to_kind(Kind::Float)?;
        let not_self = Tensor::f_ones([count, count], (Kind::Float, device))?
            .f_sub(&Tensor::f_eye(count, (Kind::Float, device))?)?;
        let positives = same_group.f_mul(&not_self)?;

        let denominator = logits.f_exp()?.f_mul(&not_self)?.f_sum_dim_intlist(
            [1i64].as_slice(),
            true,
            Kind::Float,
        )?;
        let log_prob = logits.f_sub(&denominator.f_log()?)?;
        let mean_log_prob_pos = positives
            .f_mul(&log_prob)?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
            .f_div(&positives.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?)?;
        let scale = -(self.temperature / self.base_temperature);
        Ok(mean_log_prob_pos.f_mul_scalar(scale)?.f_mean(Kind::Float)?)
    }
}
