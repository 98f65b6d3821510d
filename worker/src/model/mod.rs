//! The encoder HSAT trains: a backbone without classifier, a projection head and L2
//! normalisation (method.md §3).
//!
//! - [`params`]: named parameters and buffers (torchvision state-dict names).
//! - [`layers`]: convolution, batch norm, linear.
//! - [`pass`]: what a forward pass is (mode and batch-norm branch).
//! - [`dual_bn`]: the `normal`/`pgd` batch norm of `resnet50_multi_bn`.
//! - [`resnet`], [`small_cnn`]: the backbones.
//! - [`proj_head`]: the reference's projection head with batch norm
//!   (`model.proj_head`); the default head is an MLP.
//!
//! The backbone and the head keep separate stores so a checkpoint's
//! `backbone.safetensors` loads into torchvision's model as it is (with
//! `fc = nn.Identity()`, `strict=True`). A dual-BN backbone writes its `normal` branch
//! there and its `pgd` branch's batch-norm tensors, under the same torchvision names,
//! into `backbone_pgd.safetensors`: laid over `backbone.safetensors` they give the
//! torchvision model of the `pgd` branch, without a second copy of the convolutions.

pub mod dual_bn;
pub mod layers;
pub mod params;
pub mod pass;
pub mod proj_head;
pub mod resnet;
pub mod small_cnn;

use std::collections::BTreeMap;
use std::path::Path;

use hsat_core::config::{Backbone, ModelConfig};
use tch::{Device, Tensor};

use crate::collective::BatchNormSync;
use crate::error::{Result, WorkerError};
use dual_bn::{pgd_name, torchvision_name_of_pgd};
use layers::Linear;
use params::{Named, ParamStore, Scope};
pub use pass::{BnBranch, Pass};
use proj_head::ProjHead;
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
        Backbone::ResNet18 | Backbone::ResNet18MultiBn => (false, [2, 2, 2, 2], 64),
        Backbone::ResNet34 => (false, [3, 4, 6, 3], 64),
        Backbone::ResNet50 | Backbone::ResNet50MultiBn => (true, [3, 4, 6, 3], 64),
        Backbone::ResNet101 => (true, [3, 4, 23, 3], 64),
        Backbone::WideResNet50_2 => (true, [3, 4, 6, 3], 128),
    };
    Some(ResNetSpec {
        bottleneck,
        layers,
        width_per_group,
        dual_bn: backbone.dual_bn(),
    })
}

/// Which projection head an encoder has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSpec<'a> {
    /// HiDisc's MLP: `Linear+ReLU` per hidden width, then `Linear` to `out`
    /// (xavier weights, bias 0.01).
    Mlp {
        /// Hidden widths (`model.mlp_hidden`).
        hidden: &'a [usize],
        /// Embedding size (`model.num_embedding_out`).
        out: usize,
    },
    /// The reference's three-layer head with batch norm, as wide as the features
    /// (`model.proj_head = true`).
    Proj,
}

impl<'a> HeadSpec<'a> {
    /// The head a model config describes (`model.proj_head`, else the MLP).
    pub fn of(cfg: &'a ModelConfig) -> Self {
        if cfg.proj_head {
            HeadSpec::Proj
        } else {
            HeadSpec::Mlp {
                hidden: &cfg.mlp_hidden,
                out: cfg.num_embedding_out,
            }
        }
    }
}

#[derive(Debug)]
enum Head {
    Mlp(Vec<Linear>),
    Proj(ProjHead),
}

/// The model's tensors split as a checkpoint holds them, deep-copied to host memory.
#[derive(Debug)]
pub struct ModelSnapshot {
    /// `backbone.safetensors`: the backbone (its `normal` branch), torchvision names.
    pub backbone: NamedTensors,
    /// `backbone_pgd.safetensors`: the `pgd` branch's batch norms of a dual-BN
    /// backbone, torchvision names; `None` for other backbones.
    pub backbone_pgd: Option<NamedTensors>,
    /// `head.safetensors`: the projection head.
    pub head: NamedTensors,
}

/// Tensors with their state-dict names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Backbone + projection head + L2 normalisation.
#[derive(Debug)]
pub struct Encoder {
    kind: Backbone,
    backbone: BackboneNet,
    head: Head,
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
        Self::with_head(
            backbone,
            HeadSpec::Mlp {
                hidden: mlp_hidden,
                out: embedding_dim,
            },
            device,
        )
    }

    /// Builds a freshly initialised encoder with the head `head` (torchvision's
    /// backbone init; the head's own init, see [`HeadSpec`]).
    pub fn with_head(backbone: Backbone, head: HeadSpec<'_>, device: Device) -> Result<Self> {
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
        let head = match head {
            HeadSpec::Proj => Head::Proj(ProjHead::new(&mut head_scope, feature_dim)?),
            HeadSpec::Mlp { hidden, out } => {
                let mut layers_scope = head_scope.sub("layers");
                let mut layers = Vec::new();
                let mut d_in = feature_dim;
                // Sequential(Linear, ReLU, Linear, ReLU, ..., Linear): linear layers sit
                // at even indices.
                for (i, &d_out) in hidden.iter().chain(std::iter::once(&out)).enumerate() {
                    let d_out = d_out as i64;
                    layers.push(Linear::xavier(
                        &mut layers_scope.sub(2 * i),
                        d_in,
                        d_out,
                        HEAD_BIAS_INIT,
                    )?);
                    d_in = d_out;
                }
                Head::Mlp(layers)
            }
        };
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
        let mut encoder = Encoder::with_head(cfg.backbone, HeadSpec::of(cfg), device)?;
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
    pub fn features(&self, images: &Tensor, pass: Pass) -> Result<Tensor> {
        match &self.backbone {
            BackboneNet::Small(net) => net.forward(images, pass),
            BackboneNet::ResNet(net) => net.forward(images, pass),
        }
    }

    /// L2-normalised projections `[N, D]` of images `[N, 3, H, W]`.
    pub fn embed(&self, images: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut out = self.features(images, pass)?;
        match &self.head {
            Head::Mlp(layers) => {
                let last = layers.len() - 1;
                for (i, layer) in layers.iter().enumerate() {
                    out = layer.forward(&out)?;
                    if i != last {
                        out = out.f_relu()?;
                    }
                }
            }
            Head::Proj(head) => out = head.forward(&out, pass)?,
        }
        l2_normalize(&out)
    }

    /// Embeddings `[B, S, P, V, D]` of a hierarchical batch `[B, S, P, V, C, H, W]`.
    pub fn embed_batch(&self, batch: &Tensor, pass: Pass) -> Result<Tensor> {
        let shape = check_batch_shape(batch)?;
        let flat = batch.f_reshape([-1, shape[4], shape[5], shape[6]])?;
        let emb = self.embed(&flat, pass)?;
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

    /// The parameters a training run updates when its training forward passes use
    /// the batch-norm branches `normal` and/or `pgd`: all of them, except that a
    /// dual-BN backbone leaves out the affine parameters of a branch no training
    /// forward uses (`only_adv` never trains `normal`, plain HiDisc never `pgd`).
    /// The reference's DDP (`find_unused_parameters=True`) leaves their gradients
    /// `None`, so its AdamW skips them, weight decay included; keeping them out of the
    /// optimiser does the same in a distributed run, whose gradient all-reduce would
    /// otherwise give them zero gradients (and AdamW would decay them).
    pub fn trained_parameters(&self, normal: bool, pgd: bool) -> Vec<(String, Tensor)> {
        if !self.kind.dual_bn() {
            return self.parameters();
        }
        let pgd_branch: std::collections::HashSet<String> = self.pgd_torchvision_names().collect();
        self.parameters()
            .into_iter()
            .filter(|(name, _)| {
                if torchvision_name_of_pgd(name).is_some() {
                    pgd
                } else if pgd_branch.contains(name) {
                    normal
                } else {
                    true
                }
            })
            .collect()
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

    /// The backbone's trainable parameters, torchvision names (a dual-BN backbone's
    /// `pgd` branch under `<module>.pgd.<leaf>`, see [`dual_bn::pgd_name`]).
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

    /// Writes the files of [`Encoder::state_snapshot`] into `dir`:
    /// `backbone.safetensors` (torchvision names), `backbone_pgd.safetensors` (dual-BN
    /// backbones only) and `head.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let snapshot = self.state_snapshot()?;
        let mut files = vec![
            (BACKBONE_FILE, snapshot.backbone),
            (HEAD_FILE, snapshot.head),
        ];
        if let Some(pgd) = snapshot.backbone_pgd {
            files.push((BACKBONE_PGD_FILE, pgd));
        }
        for (file, entries) in files {
            let path = dir.join(file);
            Tensor::write_safetensors(&entries, &path).map_err(|err| WorkerError::Weights {
                path: path.clone(),
                reason: format!("cannot write it ({err})"),
            })?;
        }
        Ok(())
    }

    /// Deep copies in host memory of the state dicts, split and named as in their
    /// files (what [`Encoder::save`] writes): a checkpoint taken at a step boundary
    /// while training goes on mutating the live tensors.
    pub fn state_snapshot(&self) -> Result<ModelSnapshot> {
        let copy =
            |n: &Named, name: String| crate::train::optim::host_copy(&n.tensor).map(|t| (name, t));
        let mut backbone = Vec::new();
        let mut backbone_pgd = Vec::new();
        for n in self.backbone_store.state() {
            match torchvision_name_of_pgd(&n.name) {
                Some(name) => backbone_pgd.push(copy(n, name)?),
                None => backbone.push(copy(n, n.name.clone())?),
            }
        }
        let head = self
            .head_store
            .state()
            .map(|n| copy(n, n.name.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelSnapshot {
            backbone,
            backbone_pgd: self.kind.dual_bn().then_some(backbone_pgd),
            head,
        })
    }

    /// Loads backbone weights from a `.safetensors` file with torchvision names
    /// (a torchvision `state_dict()`; its `fc.*` classifier is ignored). A dual-BN
    /// backbone starts both branches from the file's batch norms.
    pub fn load_backbone(&mut self, path: &Path) -> Result<()> {
        let mut entries = read_weights(path)?;
        if self.kind.dual_bn() {
            let pgd: Vec<(String, Tensor)> = self
                .pgd_torchvision_names()
                .filter_map(|name| {
                    entries
                        .get(&name)
                        .map(|t| (pgd_name(&name), t.shallow_clone()))
                })
                .collect();
            entries.extend(pgd);
        }
        self.backbone_store
            .load_entries(entries, path, IGNORED_BACKBONE_KEYS)
    }

    /// Loads a checkpoint directory written by [`Encoder::save`]: the backbone, the
    /// `pgd` branch (dual-BN backbones; the file must be there) and the head.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(BACKBONE_FILE);
        let mut entries = read_weights(&path)?;
        if self.kind.dual_bn() {
            let pgd_path = dir.join(BACKBONE_PGD_FILE);
            if !pgd_path.is_file() {
                return Err(WorkerError::Weights {
                    path: pgd_path,
                    reason: format!(
                        "missing: a {} checkpoint holds its pgd batch-norm branch there \
                         (was this checkpoint written for another backbone?)",
                        self.kind
                    ),
                });
            }
            let pgd = read_weights(&pgd_path)?;
            let known: Vec<String> = self.pgd_torchvision_names().collect();
            if let Some(stray) = pgd.keys().find(|k| !known.contains(k)) {
                return Err(WorkerError::Weights {
                    path: pgd_path,
                    reason: format!(
                        "`{stray}` is not a batch-norm tensor of the {} backbone",
                        self.kind
                    ),
                });
            }
            entries.extend(pgd.into_iter().map(|(name, t)| (pgd_name(&name), t)));
        }
        self.backbone_store
            .load_entries(entries, &path, IGNORED_BACKBONE_KEYS)?;
        self.head_store.load(&dir.join(HEAD_FILE), "", &[])
    }

    /// torchvision names of the tensors the `pgd` branch holds.
    fn pgd_torchvision_names(&self) -> impl Iterator<Item = String> + '_ {
        self.backbone_store
            .state()
            .filter_map(|n| torchvision_name_of_pgd(&n.name))
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
/// File name of the `pgd` batch-norm branch of a dual-BN backbone inside a
/// checkpoint directory (torchvision names; lay it over [`BACKBONE_FILE`]).
pub const BACKBONE_PGD_FILE: &str = "backbone_pgd.safetensors";

/// Every tensor of a `.safetensors` file by name.
fn read_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let read = Tensor::read_safetensors(path).map_err(|err| WorkerError::Weights {
        path: path.to_path_buf(),
        reason: format!("cannot read it as safetensors ({err})"),
    })?;
    Ok(read.into_iter().collect())
}

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
