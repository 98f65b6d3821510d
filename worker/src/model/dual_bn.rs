//! Batch norm with two branches, `normal` and `pgd`, selected per forward pass (the
//! reference's `batch_norm_multiple` in `models/resnet_multi_bn_stl.py`, built with
//! `bn_names=["normal", "pgd"]` for `resnet50_multi_bn`).
//!
//! Each branch is a plain [`BatchNorm2d`] with its own affine parameters and running
//! statistics; the convolutions are shared. The `normal` branch is registered under
//! the torchvision name of the layer (`layer1.0.bn1.weight`), the `pgd` branch under
//! a `pgd` child of it (`layer1.0.bn1.pgd.weight`): the backbone's state then holds
//! both, the checkpoint splits them into `backbone.safetensors` (torchvision names,
//! the `normal` branch) and `backbone_pgd.safetensors` (the `pgd` branch under the
//! same torchvision names); see [`pgd_name`] and [`torchvision_name_of_pgd`].

use tch::Tensor;

use super::layers::BatchNorm2d;
use super::params::Scope;
use super::pass::{BnBranch, Pass};
use crate::error::Result;

/// The child scope the `pgd` branch of a dual batch norm is registered under.
pub const PGD_SCOPE: &str = "pgd";

/// Two batch norms over the same channels; the pass picks one.
#[derive(Debug)]
pub struct DualBatchNorm2d {
    normal: BatchNorm2d,
    pgd: BatchNorm2d,
}

impl DualBatchNorm2d {
    /// Registers the `normal` branch in `scope` and the `pgd` branch in its
    /// [`PGD_SCOPE`] child, both with PyTorch's initial values.
    pub fn new(scope: &mut Scope<'_>, channels: i64) -> Result<Self> {
        let normal = BatchNorm2d::new(scope, channels)?;
        let pgd = BatchNorm2d::new(&mut scope.sub(PGD_SCOPE), channels)?;
        Ok(DualBatchNorm2d { normal, pgd })
    }

    /// The branch of `pass` normalises `xs` (only that branch's running statistics
    /// move in train mode, as in the reference).
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        match pass.branch {
            BnBranch::Normal => self.normal.forward(xs, pass.train),
            BnBranch::Pgd => self.pgd.forward(xs, pass.train),
        }
    }
}

/// The batch norm of a ResNet layer: one branch, or the two of a dual-BN backbone.
#[derive(Debug)]
pub enum Norm2d {
    /// torchvision's single batch norm; the pass's branch is ignored.
    Single(BatchNorm2d),
    /// `normal` and `pgd` branches.
    Dual(DualBatchNorm2d),
}

impl Norm2d {
    /// A single or dual batch norm over `channels`.
    pub fn new(scope: &mut Scope<'_>, channels: i64, dual: bool) -> Result<Self> {
        Ok(if dual {
            Norm2d::Dual(DualBatchNorm2d::new(scope, channels)?)
        } else {
            Norm2d::Single(BatchNorm2d::new(scope, channels)?)
        })
    }

    /// Normalises `xs` as `pass` says.
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        match self {
            Norm2d::Single(bn) => bn.forward(xs, pass.train),
            Norm2d::Dual(bn) => bn.forward(xs, pass),
        }
    }
}

/// The state name of the `pgd` branch's tensor whose torchvision name is `name`:
/// `layer1.0.bn1.weight` -> `layer1.0.bn1.pgd.weight`.
pub fn pgd_name(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((module, leaf)) => format!("{module}.{PGD_SCOPE}.{leaf}"),
        None => format!("{PGD_SCOPE}.{name}"),
    }
}

/// The torchvision name of a `pgd`-branch state name, `None` for any other name:
/// `layer1.0.bn1.pgd.weight` -> `layer1.0.bn1.weight`.
pub fn torchvision_name_of_pgd(name: &str) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    if module == PGD_SCOPE {
        return Some(leaf.to_owned());
    }
    let module = module.strip_suffix(&format!(".{PGD_SCOPE}"))?;
    Some(format!("{module}.{leaf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgd_names_round_trip_and_others_are_not_pgd() {
        for name in [
            "bn1.weight",
            "layer1.0.bn1.running_mean",
            "layer2.0.downsample.1.num_batches_tracked",
        ] {
            let pgd = pgd_name(name);
            assert!(pgd.contains(".pgd."), "{pgd}");
            assert_eq!(torchvision_name_of_pgd(&pgd).as_deref(), Some(name));
            assert_eq!(torchvision_name_of_pgd(name), None);
        }
        assert_eq!(pgd_name("layer1.0.bn1.bias"), "layer1.0.bn1.pgd.bias");
        assert_eq!(torchvision_name_of_pgd("conv1.weight"), None);
    }
}
