//! The encoder HSAT trains: a backbone without classifier, a projection head and L2
//! normalisation (method.md §3).
//!
//! - [`params`]: named parameters and buffers (torchvision state-dict names).
//! - [`layers`]: convolution, batch norm, linear.
//! - [`resnet`], [`small_cnn`]: the backbones.
//!
//! The backbone and the head keep separate stores so a checkpoint's
//! `backbone.safetensors` loads into torchvision's model as it is (with
//! `fc = nn.Identity()`, `strict=True`).

pub mod layers;
pub mod params;
pub mod resnet;
pub mod small_cnn;

use std::path::Path;

use hsat_core::config::{Backbone, ModelConfig};
use tch::{Device, Tensor};

use crate::collective::BatchNormSync;
use crate::error::{Result, WorkerError};
use layers::Linear;
use params::{Named, ParamStore, Scope};
use resnet::{ResNet, ResNetSpec};
use small_cnn::{SMALL_CNN_FEATURES, SmallCnn};

/// The bias every projection layer starts with (method.md §3).
const HEAD_BIAS_INIT: f64 = 0.01;

/// Prefixes of torchvision files that the encoder does not use: the classifier.
const IGNORED_BACKBONE_KEYS: &[&str] = &["fc."];

#[derive(Debug)]
enum BackboneNet {
    Small(SmallCnn),
    ResNet(ResNet),
}

/// ResNet shapes as torchvision defines them.
pub fn resnet_spec(backbone: Backbone) -> Option<ResNetSpec> {
    let (bottleneck, layers, width_per_group) = match backbone {
        Backbone::SmallCnn => return None,
        Backbone::ResNet18 => (false, [2, 2, 2, 2], 64),
        Backbone::ResNet34 => (false, [3, 4, 6, 3], 64),
        Backbone::ResNet50 => (true, [3, 4, 6, 3], 64),
        Backbone::ResNet101 => (true, [3, 4, 23, 3], 64),
        Backbone::WideResNet50_2 => (true, [3, 4, 6, 3], 128),
    };
    Some(ResNetSpec {
        bottleneck,
        layers,
        width_per_group,
    })
}

/// Tensors with their state-dict names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Backbone + projection head + L2 normalisation.
#[derive(Debug)]
pub struct Encoder {
    kind: Backbone,
    backbone: BackboneNet,
    head: Vec<Linear>,
    backbone_store: ParamStore,
    head_store: ParamStore,
    feature_dim: i64,
    device: Device,
}

impl Encoder {
    /// Builds a freshly initialised encoder (torchvision's backbone init; xavier head).
    pub fn new(
        backbone: Backbone,
        mlp_hidden: &[usize],
        embedding_dim: usize,
        device: Device,
    ) -> Result<Self> {
        let mut backbone_store = ParamStore::default();
        let mut scope = Scope::root(&mut backbone_store, device);
        let (net, feature_dim) = match resnet_spec(backbone) {
            None => (
                BackboneNet::Small(SmallCnn::new(&mut scope)?),
                SMALL_CNN_FEATURES,
            ),
            Some(spec) => (
                BackboneNet::ResNet(ResNet::new(&mut scope, spec)?),
                spec.feature_dim(),
            ),
        };
        let mut head_store = ParamStore::default();
        let mut head_scope = Scope::root(&mut head_store, device);
        let mut layers_scope = head_scope.sub("layers");
        let mut head = Vec::new();
        let mut d_in = feature_dim;
        // Sequential(Linear, ReLU, Linear, ReLU, ..., Linear): linear layers sit at even indices.
        for (i, &d_out) in mlp_hidden
            .iter()
            .chain(std::iter::once(&embedding_dim))
            .enumerate()
        {
            let d_out = d_out as i64;
            head.push(Linear::xavier(
                &mut layers_scope.sub(2 * i),
                d_in,
                d_out,
                HEAD_BIAS_INIT,
            )?);
            d_in = d_out;
        }
        Ok(Encoder {
            kind: backbone,
            backbone: net,
            head,
            backbone_store,
            head_store,
            feature_dim,
            device,
        })
    }

    /// Builds the encoder a model config describes, loading `init_checkpoint` if set.
    pub fn from_config(cfg: &ModelConfig, device: Device) -> Result<Self> {
        let mut encoder =
            Encoder::new(cfg.backbone, &cfg.mlp_hidden, cfg.num_embedding_out, device)?;
        if let Some(path) = &cfg.init_checkpoint {
            encoder.load_backbone(path)?;
        }
        Ok(encoder)
    }

    /// The backbone kind.
    pub fn kind(&self) -> Backbone {
        self.kind
    }

    /// Backbone feature dimension (512 for ResNet-18, 2048 for ResNet-50).
    pub fn feature_dim(&self) -> i64 {
        self.feature_dim
    }

    /// Device of all tensors.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Backbone features `[N, feature_dim]` of images `[N, 3, H, W]` (what evaluation uses).
    pub fn features(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        match &self.backbone {
            BackboneNet::Small(net) => net.forward(images, train),
            BackboneNet::ResNet(net) => net.forward(images, train),
        }
    }

    /// L2-normalised projections `[N, D]` of images `[N, 3, H, W]`.
    pub fn embed(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut out = self.features(images, train)?;
        let last = self.head.len() - 1;
        for (i, layer) in self.head.iter().enumerate() {
            out = layer.forward(&out)?;
            if i != last {
                out = out.f_relu()?;
            }
        }
        l2_normalize(&out)
    }

    /// Embeddings `[B, S, P, V, D]` of a hierarchical batch `[B, S, P, V, C, H, W]`.
    pub fn embed_batch(&self, batch: &Tensor, train: bool) -> Result<Tensor> {
        let shape = check_batch_shape(batch)?;
        let flat = batch.f_reshape([-1, shape[4], shape[5], shape[6]])?;
        let emb = self.embed(&flat, train)?;
        let dim = emb.size()[1];
        Ok(emb.f_reshape([shape[0], shape[1], shape[2], shape[3], dim])?)
    }

    /// Trainable tensors in optimiser order: backbone, then head (head names prefixed `head.`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let backbone = self
            .backbone_store
            .params()
            .iter()
            .map(|n| (n.name.clone(), n.tensor.shallow_clone()));
        let head = self
            .head_store
            .params()
            .iter()
            .map(|n| (format!("head.{}", n.name), n.tensor.shallow_clone()));
        backbone.chain(head).collect()
    }

    /// The full state (parameters and buffers), names as in [`Encoder::parameters`].
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let backbone = self
            .backbone_store
            .state()
            .map(|n| (n.name.clone(), n.tensor.shallow_clone()));
        let head = self
            .head_store
            .state()
            .map(|n| (format!("head.{}", n.name), n.tensor.shallow_clone()));
        backbone.chain(head).collect()
    }

    /// The backbone's state dict, torchvision names.
    pub fn backbone_state(&self) -> &[Named] {
        self.backbone_store.params()
    }

    /// Number of trainable scalars (backbone and head).
    pub fn num_parameters(&self) -> i64 {
        self.backbone_store.num_parameters() + self.head_store.num_parameters()
    }

    /// Installs (`Some`) or removes (`None`) synchronised batch norm in every
    /// batch-norm layer (backbone and head): train-mode passes then normalise with the
    /// statistics of all ranks and must run on every rank, in the same order.
    pub fn set_batch_norm_sync(&self, sync: Option<std::sync::Arc<BatchNormSync>>) {
        self.head_store.batch_norm_slot().set(sync.clone());
        self.backbone_store.batch_norm_slot().set(sync);
    }

    /// The synchronised batch norm installed, if any.
    pub fn batch_norm_sync(&self) -> Option<std::sync::Arc<BatchNormSync>> {
        self.backbone_store.batch_norm_slot().get()
    }

    /// Gradient tracking of all parameters on or off (off while attacking).
    pub fn set_requires_grad(&self, on: bool) -> Result<()> {
        self.backbone_store.set_requires_grad(on)?;
        self.head_store.set_requires_grad(on)
    }

    /// Writes `backbone.safetensors` (torchvision names) and `head.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.backbone_store.save(&dir.join(BACKBONE_FILE))?;
        self.head_store.save(&dir.join(HEAD_FILE))
    }

    /// Deep copies in host memory of the backbone's and the head's state dicts, named
    /// as in their files (what [`Encoder::save`] writes): a checkpoint taken at a step
    /// boundary while training goes on mutating the live tensors.
    pub fn state_snapshot(&self) -> Result<(NamedTensors, NamedTensors)> {
        let copy = |store: &ParamStore| {
            store
                .state()
                .map(|n| crate::train::optim::host_copy(&n.tensor).map(|t| (n.name.clone(), t)))
                .collect::<Result<Vec<_>>>()
        };
        Ok((copy(&self.backbone_store)?, copy(&self.head_store)?))
    }

    /// Loads backbone weights from a `.safetensors` file with torchvision names
    /// (a torchvision `state_dict()`; its `fc.*` classifier is ignored).
    pub fn load_backbone(&mut self, path: &Path) -> Result<()> {
        self.backbone_store.load(path, "", IGNORED_BACKBONE_KEYS)
    }

    /// Loads both files of a checkpoint directory written by [`Encoder::save`].
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        self.load_backbone(&dir.join(BACKBONE_FILE))?;
        self.head_store.load(&dir.join(HEAD_FILE), "", &[])
    }

    /// Loads every tensor from `(name, tensor)` pairs named as in [`Encoder::state`]
    /// (head tensors prefixed `head.`); used to start from reference weights.
    pub fn load_state(&mut self, entries: &[(String, Tensor)], origin: &Path) -> Result<()> {
        let mut backbone = std::collections::BTreeMap::new();
        let mut head = std::collections::BTreeMap::new();
        for (name, tensor) in entries {
            match name.strip_prefix("head.") {
                Some(rest) => head.insert(rest.to_owned(), tensor.shallow_clone()),
                None => backbone.insert(name.clone(), tensor.shallow_clone()),
            };
        }
        self.backbone_store
            .load_entries(backbone, origin, IGNORED_BACKBONE_KEYS)?;
        self.head_store.load_entries(head, origin, &[])
    }
}

/// File name of the backbone weights inside a checkpoint directory.
pub const BACKBONE_FILE: &str = "backbone.safetensors";
/// File name of the projection-head weights inside a checkpoint directory.
pub const HEAD_FILE: &str = "head.safetensors";

/// `x / max(||x||_2, 1e-12)` along the last dimension, as `F.normalize`.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs
        .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(xs.f_div(&norm.f_expand_as(xs)?)?)
}

/// Checks a hierarchical batch is `[B, S, P, V, C, H, W]` with every dimension >= 1
/// except `B`, which may be 0 (a rank without patients in a distributed step still
/// runs the passes whose collectives its peers wait for).
pub fn check_batch_shape(batch: &Tensor) -> Result<Vec<i64>> {
    let shape = batch.size();
    if shape.len() != 7 || shape[0] < 0 || shape[1..].iter().any(|&d| d < 1) {
        return Err(WorkerError::BatchShape {
            shape,
            reason:
                "expected [patients, slides, patches, views, channels, height, width], all >= 1 (patients >= 0)"
                    .into(),
        });
    }
    if shape[4] != 3 {
        return Err(WorkerError::BatchShape {
            shape,
            reason: "the encoders take 3-channel images (OpenSRH's 2 channels become 3 in base processing)".into(),
        });
    }
    Ok(shape)
}
