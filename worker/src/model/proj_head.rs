//! The reference's projection head with batch norm (`model.proj_head = true`): the
//! `proj_head` class of HSAT's `main.py`, a `Sequential` of
//!
//! ```text
//! layers.0  Linear(d, d)               layers.1  BatchNorm1d(d)   layers.2  ReLU
//! layers.3  Linear(d, d, bias=False)   layers.4  BatchNorm1d(d)   layers.5  ReLU
//! layers.6  Linear(d, d, bias=False)   layers.7  BatchNorm1d(d)
//! ```
//!
//! with `d` the backbone's feature size, PyTorch's default initialisation (linear
//! weights and bias `U(-1/sqrt(d), 1/sqrt(d))`, batch norm weight 1, bias 0), and
//! the state names of that `Sequential`. The encoder L2-normalises its output.
//!
//! Its batch norms have one branch, also in a dual-BN backbone (the reference's head
//! is not a multi-BN module): every pass shares them, in the pass's mode. They are
//! [`BatchNorm2d`] layers, whose `at::batch_norm` normalises `[N, C]` input per
//! channel exactly as `BatchNorm1d` does.

use tch::Tensor;

use super::layers::BatchNorm2d;
use super::params::Scope;
use super::pass::Pass;
use crate::error::Result;

/// A linear layer with PyTorch's default `nn.Linear` initialisation.
#[derive(Debug)]
struct TorchLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl TorchLinear {
    /// `kaiming_uniform_(a=sqrt(5))` on the weight and the bias's `U(-1/sqrt(fan_in),
    /// 1/sqrt(fan_in))`: both are uniform with bound `1/sqrt(d_in)`.
    fn new(scope: &mut Scope<'_>, d_in: i64, d_out: i64, bias: bool) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let uniform = |shape: &[i64], scope: &Scope<'_>| -> Result<Tensor> {
            Ok(Tensor::f_rand(shape, scope.float())?
                .f_mul_scalar(2.0 * bound)?
                .f_sub_scalar(bound)?)
        };
        let init = uniform(&[d_out, d_in], scope)?;
        let weight = scope.param("weight", init)?;
        let bias = if bias {
            let init = uniform(&[d_out], scope)?;
            Some(scope.param("bias", init)?)
        } else {
            None
        };
        Ok(TorchLinear { weight, bias })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

/// Three linear layers with batch norm; `[N, d]` -> `[N, d]`.
#[derive(Debug)]
pub struct ProjHead {
    layers: [(TorchLinear, BatchNorm2d); 3],
}

impl ProjHead {
    /// Registers `layers.{0,1,3,4,6,7}.*` in `scope` for features of width `d`.
    pub fn new(scope: &mut Scope<'_>, d: i64) -> Result<Self> {
        let mut layers = scope.sub("layers");
        let mut block = |index: usize, bias: bool| -> Result<(TorchLinear, BatchNorm2d)> {
            let linear = TorchLinear::new(&mut layers.sub(index), d, d, bias)?;
            let bn = BatchNorm2d::new(&mut layers.sub(index + 1), d)?;
            Ok((linear, bn))
        };
        Ok(ProjHead {
            layers: [block(0, true)?, block(3, false)?, block(6, false)?],
        })
    }

    /// Linear, BN, ReLU, linear, BN, ReLU, linear, BN (no ReLU after the last).
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut out = xs.shallow_clone();
        for (i, (linear, bn)) in self.layers.iter().enumerate() {
            out = bn.forward(&linear.forward(&out)?, pass.train)?;
            if i + 1 < self.layers.len() {
                out = out.f_relu()?;
            }
        }
        Ok(out)
    }
}
