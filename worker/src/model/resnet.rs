//! torchvision's ResNet family without the classifier: ResNet-18/34 (basic blocks),
//! ResNet-50/101 and Wide-ResNet-50-2 (bottlenecks, stride on the 3x3 as in
//! torchvision's "v1.5"), with torchvision's state-dict names; and the same networks
//! with the reference's dual batch norm (`resnet50_multi_bn`, see [`super::dual_bn`]).
//!
//! The reference's multi-BN ResNet (`models/resnet_multi_bn_stl.py`) has the same
//! convolutions, strides and forward order as torchvision's; only its module names
//! differ (`bn1.bn_list.0`, `downsample.conv`, `downsample.bn`), and hsat keeps
//! torchvision's names for the `normal` branch so checkpoints load into torchvision.

use tch::Tensor;

use super::dual_bn::Norm2d;
use super::layers::Conv2d;
use super::params::Scope;
use super::pass::Pass;
use crate::error::Result;

/// The shape of a ResNet: block kind, blocks per stage and bottleneck width.
#[derive(Debug, Clone, Copy)]
pub struct ResNetSpec {
    /// Bottleneck (3 convolutions, expansion 4) or basic (2 convolutions) blocks.
    pub bottleneck: bool,
    /// Blocks in `layer1` .. `layer4`.
    pub layers: [usize; 4],
    /// torchvision's `width_per_group` (64; 128 for Wide-ResNet-50-2).
    pub width_per_group: i64,
    /// Every batch norm with `normal` and `pgd` branches (`resnet50_multi_bn`).
    pub dual_bn: bool,
}

impl ResNetSpec {
    /// Feature dimension after global pooling.
    pub fn feature_dim(&self) -> i64 {
        if self.bottleneck { 512 * 4 } else { 512 }
    }
}

#[derive(Debug)]
struct Block {
    convs: Vec<(Conv2d, Norm2d)>,
    downsample: Option<(Conv2d, Norm2d)>,
}

impl Block {
    fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut out = xs.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            out = bn.forward(&conv.forward(&out)?, pass)?;
            if i != last {
                out = out.f_relu()?;
            }
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(xs)?, pass)?,
            None => xs.shallow_clone(),
        };
        Ok(out.f_add(&identity)?.f_relu()?)
    }
}

/// A ResNet backbone: `[N, 3, H, W]` -> `[N, feature_dim]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: Norm2d,
    stages: Vec<Vec<Block>>,
}

impl ResNet {
    /// Builds the network, registering its tensors in `scope`.
    pub fn new(scope: &mut Scope<'_>, spec: ResNetSpec) -> Result<Self> {
        let conv1 = Conv2d::new(&mut scope.sub("conv1"), 3, 64, 7, 2, 3)?;
        let bn1 = Norm2d::new(&mut scope.sub("bn1"), 64, spec.dual_bn)?;
        let expansion = if spec.bottleneck { 4 } else { 1 };
        let mut in_planes = 64i64;
        let mut stages = Vec::with_capacity(4);
        for (stage, &blocks) in spec.layers.iter().enumerate() {
            let planes = 64i64 << stage;
            let mut layer = scope.sub(format!("layer{}", stage + 1));
            let mut stage_blocks = Vec::with_capacity(blocks);
            for index in 0..blocks {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let mut block = layer.sub(index);
                let out_planes = planes * expansion;
                let convs = if spec.bottleneck {
                    let width = planes * spec.width_per_group / 64;
                    vec![
                        conv_bn(&mut block, 1, in_planes, width, 1, 1, 0, spec.dual_bn)?,
                        conv_bn(&mut block, 2, width, width, 3, stride, 1, spec.dual_bn)?,
                        conv_bn(&mut block, 3, width, out_planes, 1, 1, 0, spec.dual_bn)?,
                    ]
                } else {
                    vec![
                        conv_bn(&mut block, 1, in_planes, planes, 3, stride, 1, spec.dual_bn)?,
                        conv_bn(&mut block, 2, planes, planes, 3, 1, 1, spec.dual_bn)?,
                    ]
                };
                let downsample = if stride != 1 || in_planes != out_planes {
                    let mut ds = block.sub("downsample");
                    let conv = Conv2d::new(&mut ds.sub(0), in_planes, out_planes, 1, stride, 0)?;
                    let bn = Norm2d::new(&mut ds.sub(1), out_planes, spec.dual_bn)?;
                    Some((conv, bn))
                } else {
                    None
                };
                stage_blocks.push(Block { convs, downsample });
                in_planes = out_planes;
            }
            stages.push(stage_blocks);
        }
        Ok(ResNet { conv1, bn1, stages })
    }

    /// Global-average-pooled features.
    pub fn forward(&self, xs: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut out = self.bn1.forward(&self.conv1.forward(xs)?, pass)?.f_relu()?;
        out = out.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for stage in &self.stages {
            for block in stage {
                out = block.forward(&out, pass)?;
            }
        }
        Ok(out.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?)
    }
}

/// `conv{n}` + `bn{n}` inside a block.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    block: &mut Scope<'_>,
    n: usize,
    c_in: i64,
    c_out: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
    dual_bn: bool,
) -> Result<(Conv2d, Norm2d)> {
    let conv = Conv2d::new(
        &mut block.sub(format!("conv{n}")),
        c_in,
        c_out,
        kernel,
        stride,
        padding,
    )?;
    let bn = Norm2d::new(&mut block.sub(format!("bn{n}")), c_out, dual_bn)?;
    Ok((conv, bn))
}
