//! The three layer kinds the encoders are made of, with PyTorch's semantics and
//! torchvision's parameter names.

use tch::{Kind, Tensor};

use super::params::{BatchNormSlot, Scope};
use crate::error::Result;

/// PyTorch's batch-norm defaults.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// A bias-free 2-D convolution (as every ResNet convolution is).
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// Registers `weight` `[out, in, k, k]` with torchvision's init:
    /// Kaiming normal, fan-out, ReLU gain (std = sqrt(2 / (out * k * k))).
    pub fn new(
        scope: &mut Scope<'_>,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        let std = (2.0 / (c_out * kernel * kernel) as f64).sqrt();
        let init =
            Tensor::f_randn([c_out, c_in, kernel, kernel], scope.float())?.f_mul_scalar(std)?;
        Ok(Conv2d {
            weight: scope.param("weight", init)?,
            stride,
            padding,
        })
    }

    /// Applies the convolution to `[N, C, H, W]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?)
    }
}

/// 2-D batch normalisation with running statistics and `num_batches_tracked`.
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    /// Synchronised batch norm of the current generation, when one is installed.
    sync: BatchNormSlot,
}

impl BatchNorm2d {
    /// Registers weight 1, bias 0, running mean 0, running var 1, counter 0.
    pub fn new(scope: &mut Scope<'_>, channels: i64) -> Result<Self> {
        let opts = scope.float();
        Ok(BatchNorm2d {
            weight: scope.param("weight", Tensor::f_ones([channels], opts)?)?,
            bias: scope.param("bias", Tensor::f_zeros([channels], opts)?)?,
            running_mean: scope.buffer("running_mean", Tensor::f_zeros([channels], opts)?)?,
            running_var: scope.buffer("running_var", Tensor::f_ones([channels], opts)?)?,
            num_batches_tracked: scope.buffer(
                "num_batches_tracked",
                Tensor::f_zeros([], (Kind::Int64, scope.device()))?,
            )?,
            sync: scope.batch_norm_slot(),
        })
    }

    /// Normalises with batch statistics (and updates the running ones) when `train`,
    /// with the running statistics otherwise. In train mode with a synchronised batch
    /// norm installed (distributed runs, `training.sync_bn`), the batch statistics are
    /// those of every rank's input (`xs` may then have 0 rows).
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let mut counter = self.num_batches_tracked.shallow_clone();
            let _ = tch::no_grad(|| counter.f_add_scalar_(1))?;
            if let Some(sync) = self.sync.get() {
                return Ok(sync.forward(
                    xs,
                    &self.weight,
                    &self.bias,
                    &self.running_mean,
                    &self.running_var,
                    BN_MOMENTUM,
                    BN_EPS,
                )?);
            }
        }
        Ok(Tensor::f_batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )?)
    }
}

/// A fully connected layer `y = x W^T + b`.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Registers `weight` `[out, in]` xavier-uniform and `bias` filled with `bias_fill`
    /// (method.md §3: the projection head's initialisation).
    pub fn xavier(scope: &mut Scope<'_>, d_in: i64, d_out: i64, bias_fill: f64) -> Result<Self> {
        let bound = (6.0 / (d_in + d_out) as f64).sqrt();
        let init = Tensor::f_rand([d_out, d_in], scope.float())?
            .f_mul_scalar(2.0 * bound)?
            .f_sub_scalar(bound)?;
        Ok(Linear {
            weight: scope.param("weight", init)?,
            bias: scope.param("bias", Tensor::f_full([d_out], bias_fill, scope.float())?)?,
        })
    }

    /// Applies the layer to `[N, in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_linear(&self.weight, Some(&self.bias))?)
    }
}
