//! AdamW with PyTorch's single-tensor update, written out so that its state can be
//! checkpointed and the learning rate comes from the schedule each step.

use std::collections::BTreeMap;
use std::path::Path;

use hsat_core::config::OptimizerConfig;
use tch::{Kind, Tensor};

use crate::error::{Result, WorkerError};

/// Name of the step counter in [`AdamW::state_snapshot`].
pub const STEP_KEY: &str = "step";
/// Prefix of the first-moment entries in [`AdamW::state_snapshot`].
pub const EXP_AVG_PREFIX: &str = "exp_avg.";
/// Prefix of the second-moment entries in [`AdamW::state_snapshot`].
pub const EXP_AVG_SQ_PREFIX: &str = "exp_avg_sq.";

/// Per-parameter moment estimates.
#[derive(Debug)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    moments: Vec<Moments>,
    /// Optimiser steps taken so far (PyTorch's `state["step"]`).
    step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Creates the optimiser with zeroed moments.
    pub fn new(params: Vec<(String, Tensor)>, cfg: &OptimizerConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(_, p)| {
                Ok(Moments {
                    exp_avg: p.f_zeros_like()?.f_detach()?,
                    exp_avg_sq: p.f_zeros_like()?.f_detach()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            params,
            moments,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The moment tensors (`exp_avg`, `exp_avg_sq` of each parameter, in update
    /// order), sharing storage with the optimiser: what a new process group
    /// broadcasts, with the parameters, so that every rank continues identically.
    pub fn moment_tensors(&self) -> Vec<Tensor> {
        self.moments
            .iter()
            .flat_map(|m| [m.exp_avg.shallow_clone(), m.exp_avg_sq.shallow_clone()])
            .collect()
    }

    /// Sets the number of updates taken (the bias corrections depend on it), after
    /// the moments were taken from another rank.
    pub fn set_steps_taken(&mut self, steps: u64) {
        self.step = steps;
    }

    /// The optimiser's state as named host tensors, deep copies (training may go on
    /// mutating the live moments): `exp_avg.<param>` and `exp_avg_sq.<param>` for
    /// each parameter (names as in [`crate::model::Encoder::parameters`]), and
    /// `step`, the updates taken (an `int64` tensor of one element), which the bias
    /// corrections depend on.
    pub fn state_snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        let mut entries = Vec::with_capacity(2 * self.params.len() + 1);
        for ((name, _), m) in self.params.iter().zip(&self.moments) {
            entries.push((format!("{EXP_AVG_PREFIX}{name}"), host_copy(&m.exp_avg)?));
            entries.push((
                format!("{EXP_AVG_SQ_PREFIX}{name}"),
                host_copy(&m.exp_avg_sq)?,
            ));
        }
        let steps = i64::try_from(self.step).map_err(|_| {
            WorkerError::Config(format!("{} optimiser steps do not fit in int64", self.step))
        })?;
        entries.push((STEP_KEY.to_owned(), Tensor::from_slice(&[steps])));
        Ok(entries)
    }

    /// Restores what [`AdamW::state_snapshot`] produced (read back from `origin`):
    /// every parameter's moments, same shapes, and the step counter. Nothing is
    /// changed unless every entry checks out; the error lists what is wrong.
    pub fn restore_state(&mut self, entries: Vec<(String, Tensor)>, origin: &Path) -> Result<()> {
        let mut entries: BTreeMap<String, Tensor> = entries.into_iter().collect();
        let mut problems = Vec::new();
        let steps = match entries.remove(STEP_KEY) {
            Some(t) if t.numel() == 1 && t.kind() == Kind::Int64 => {
                u64::try_from(t.f_int64_value(&[0])?).ok()
            }
            _ => None,
        };
        if steps.is_none() {
            problems.push(format!(
                "missing or malformed `{STEP_KEY}` (one non-negative int64)"
            ));
        }
        let mut moments = Vec::with_capacity(self.params.len());
        for (name, param) in &self.params {
            let mut take = |prefix: &str| {
                let key = format!("{prefix}{name}");
                match entries.remove(&key) {
                    None => {
                        problems.push(format!("missing `{key}`"));
                        None
                    }
                    Some(t) if t.size() != param.size() || t.kind() != param.kind() => {
                        problems.push(format!(
                            "`{key}` is {:?} {:?}, the parameter is {:?} {:?}",
                            t.kind(),
                            t.size(),
                            param.kind(),
                            param.size()
                        ));
                        None
                    }
                    Some(t) => Some(t),
                }
            };
            let (avg, avg_sq) = (take(EXP_AVG_PREFIX), take(EXP_AVG_SQ_PREFIX));
            moments.push(avg.zip(avg_sq));
        }
        if !entries.is_empty() {
            let extra: Vec<&str> = entries.keys().take(5).map(String::as_str).collect();
            problems.push(format!(
                "{} unexpected entries (first: {}): is this the optimiser of another model?",
                entries.len(),
                extra.join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(WorkerError::Weights {
                path: origin.to_path_buf(),
                reason: problems.join("; "),
            });
        }
        tch::no_grad(|| -> Result<()> {
            for (m, loaded) in self.moments.iter_mut().zip(moments.into_iter().flatten()) {
                let device = m.exp_avg.device();
                m.exp_avg.f_copy_(&loaded.0.f_to_device(device)?)?;
                m.exp_avg_sq.f_copy_(&loaded.1.f_to_device(device)?)?;
            }
            Ok(())
        })?;
        self.step = steps.unwrap_or_default();
        Ok(())
    }

    /// The parameters, in update order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Clears all parameter gradients (PyTorch's `zero_grad(set_to_none=True)` has the
    /// same effect on the next backward).
    pub fn zero_grad(&mut self) -> Result<()> {
        for (_, p) in &self.params {
            let mut grad = p.f_grad()?;
            if grad.defined() {
                let _ = grad.f_detach_()?.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One update with learning rate `lr`, in the order of PyTorch's `_single_tensor_adamw`.
    /// A parameter without gradient is skipped, as in PyTorch.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - self.beta1.powi(step);
        let bias_correction2 = 1.0 - self.beta2.powi(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        tch::no_grad(|| -> Result<()> {
            for ((_, param), m) in self.params.iter().zip(self.moments.iter_mut()) {
                let grad = param.f_grad()?;
                if !grad.defined() {
                    continue;
                }
                let mut param = param.shallow_clone();
                let _ = param.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
                let _ = m.exp_avg.f_lerp_(&grad, 1.0 - self.beta1)?;
                // addcmul_(g, g, value=1-b2) computes (value * g) * g: same rounding here.
                let _ = m.exp_avg_sq.f_mul_scalar_(self.beta2)?;
                let _ = m
                    .exp_avg_sq
                    .f_addcmul_(&grad.f_mul_scalar(1.0 - self.beta2)?, &grad)?;
                let denom = m
                    .exp_avg_sq
                    .f_sqrt()?
                    .f_div_scalar(bias_correction2_sqrt)?
                    .f_add_scalar(self.eps)?;
                let update = m.exp_avg.f_div(&denom)?.f_mul_scalar(-step_size)?;
                let _ = param.f_add_(&update)?;
            }
            Ok(())
        })
    }
}

/// A detached copy of `tensor` in host memory that shares nothing with it: later
/// in-place updates of `tensor` (the next training step) do not reach the copy.
pub fn host_copy(tensor: &Tensor) -> Result<Tensor> {
    Ok(tensor
        .f_detach()?
        .f_to_device_(tch::Device::Cpu, tensor.kind(), false, true)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_core::config::Config;

    fn optimiser(seed: i64) -> Result<(Vec<(String, Tensor)>, AdamW)> {
        tch::manual_seed(seed);
        let params = vec![
            (
                "a.weight".to_owned(),
                Tensor::f_randn([3, 2], (Kind::Float, tch::Device::Cpu))?
                    .f_set_requires_grad(true)?,
            ),
            (
                "head.b".to_owned(),
                Tensor::f_randn([4], (Kind::Float, tch::Device::Cpu))?.f_set_requires_grad(true)?,
            ),
        ];
        let shared = params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect();
        let opt = AdamW::new(shared, &Config::default().training.optimizer)?;
        Ok((params, opt))
    }

    fn update(params: &[(String, Tensor)], opt: &mut AdamW, scale: f64) -> Result<()> {
        opt.zero_grad()?;
        let loss = params
            .iter()
            .map(|(_, p)| {
                p.f_pow_tensor_scalar(2.0)
                    .and_then(|q| q.f_sum(Kind::Float))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let total = loss
            .iter()
            .try_fold(Tensor::from(0.0f32), |acc, l| acc.f_add(l))?;
        total.f_mul_scalar(scale)?.backward();
        opt.step(1e-2)
    }

    /// Two updates, snapshot, more updates on one copy; a second optimiser restored
    /// from the snapshot (and given the same parameters) continues bit for bit.
    #[test]
    fn a_restored_optimiser_continues_bitwise_identically() -> Result<()> {
        let (params, mut opt) = optimiser(1)?;
        update(&params, &mut opt, 1.0)?;
        update(&params, &mut opt, 0.5)?;
        let snapshot = opt.state_snapshot()?;
        let saved_params: Vec<Tensor> = params
            .iter()
            .map(|(_, p)| host_copy(p))
            .collect::<Result<_>>()?;
        // The snapshot is a deep copy: further updates do not change it.
        let before: Vec<Tensor> = snapshot.iter().map(|(_, t)| t.copy()).collect();
        update(&params, &mut opt, 2.0)?;
        for ((name, t), b) in snapshot.iter().zip(&before) {
            assert!(
                t.equal(b),
                "snapshot entry {name} changed with the live state"
            );
        }

        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        let file = dir.path().join("optimizer.safetensors");
        Tensor::write_safetensors(&snapshot, &file)?;
        let (params2, mut opt2) = optimiser(99)?;
        tch::no_grad(|| -> Result<()> {
            for ((_, p), saved) in params2.iter().zip(&saved_params) {
                p.shallow_clone().f_copy_(saved)?;
            }
            Ok(())
        })?;
        opt2.restore_state(Tensor::read_safetensors(&file)?, &file)?;
        assert_eq!(opt2.steps_taken(), 2);
        update(&params2, &mut opt2, 2.0)?;
        for ((name, a), (_, b)) in params.iter().zip(&params2) {
            assert!(
                a.equal(b),
                "parameter {name} differs after the restored update"
            );
        }
        for (a, b) in opt.moment_tensors().iter().zip(opt2.moment_tensors()) {
            assert!(a.equal(&b));
        }
        Ok(())
    }

    #[test]
    fn restoring_names_every_missing_or_misshapen_entry_and_changes_nothing() -> Result<()> {
        let (_, mut opt) = optimiser(1)?;
        let mut entries = opt.state_snapshot()?;
        entries.retain(|(name, _)| name != "exp_avg_sq.head.b");
        if let Some(entry) = entries.iter_mut().find(|(n, _)| n == "exp_avg.a.weight") {
            entry.1 = Tensor::f_zeros([5], (Kind::Float, tch::Device::Cpu))?;
        }
        let err = opt
            .restore_state(entries, Path::new("ck/optimizer.safetensors"))
            .unwrap_err();
        let WorkerError::Weights { path, reason } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(path, Path::new("ck/optimizer.safetensors"));
        assert!(reason.contains("missing `exp_avg_sq.head.b`"), "{reason}");
        assert!(
            reason.contains("`exp_avg.a.weight` is Float [5]"),
            "{reason}"
        );
        assert_eq!(opt.steps_taken(), 0);
        Ok(())
    }
}
