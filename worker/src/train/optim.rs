//! AdamW with PyTorch's single-tensor update, written out so that its state can be
//! checkpointed and the learning rate comes from the schedule each step.

use hsat_core::config::OptimizerConfig;
use tch::Tensor;

use crate::error::Result;

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
