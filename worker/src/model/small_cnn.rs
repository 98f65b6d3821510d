//! A two-convolution backbone for tests and fixtures: the same layer kinds as a
//! ResNet (so the engine is exercised end to end) at a size that trains in
//! milliseconds on a CPU.

use tch::Tensor;

use super::layers::{BatchNorm2d, Conv2d};
use super::params::Scope;
use super::pass::Pass;
use crate::error::Result;

/// Output feature dimension.
pub const SMALL_CNN_FEATURES: i64 = 16;

/// conv(3->8, 3x3) bn relu, conv(8->16, 3x3, stride 2) bn relu, global average pool.
#[derive(Debug)]
pub struct SmallCnn {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
}

impl SmallCnn {
    /// Builds the network, registering `conv1`, `bn1`, `conv2`, `bn2`.
    pub fn new(scope: &mut Scope<'_>) -> Result<Self> {
        Ok(SmallCnn {
            conv1: Conv2d::new(&mut scope.sub("conv1"), 3, 8, 3, 1, 1)?,
            bn1: BatchNorm2d::new(&mut scope.sub("bn1"), 8)?,
            conv2: Conv2d::new(&mut scope.sub("conv2"), 8, SMALL_CNN_FEATURES, 3, 2, 1)?,
            bn2: BatchNorm2d::new(&mut scope.sub("bn2"), SMALL_CNN_FEATURES)?,
        })
    }

    /// Global-average-pooled features `[N, 16]`.
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        let out = self
            .bn1
            .forward(&self.conv1.forward(xs)?, pass.train)?
            .f_relu()?;
        let out = self
            .bn2
            .forward(&self.conv2.forward(&out)?, pass.train)?
            .f_relu()?;
        Ok(out.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?)
    }
}
