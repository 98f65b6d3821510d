//! The evaluation engine behind `hsat eval` (method.md §7): backbone features of every
//! train and val patch, and the white-box and transfer attacks on them. The kNN
//! scores, aggregation and metrics that turn features into the paper's numbers are
//! pure functions in `hsat_core::eval`.
//!
//! - [`images`]: the patch list of a split and batched, multi-threaded decoding
//!   (base processing only, no augmentation).
//! - [`attack`]: PGD, BIM, MI-FGSM and FGSM on `-cosine(f(x_adv), f(x))`, as the
//!   reference defines them; random starts drawn from a per-patch seed.
//! - [`features`]: clean features, and one pass over the val patches that crafts
//!   every attack against every model and embeds the results (white-box and
//!   transfer).
//! - [`load_checkpoint`]: an encoder from a checkpoint directory, a run folder or a
//!   `backbone.safetensors` file.

pub mod attack;
pub mod features;
pub mod images;

use std::path::{Path, PathBuf};

use hsat_core::config::{Backbone, Config, ModelConfig};
use tch::Device;

use crate::checkpoint::{CheckpointMeta, META_FILE, list_checkpoints, read_meta};
use crate::error::WorkerError;
use crate::model::{BACKBONE_FILE, Encoder};
use hsat_data::image::ImageError;

pub use attack::FeatureAttack;
pub use features::{Rows, ValFeatures, clean_features, val_features};
pub use images::{BatchSpec, PatchRecord, patches_of};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The model, a checkpoint file or libtorch failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// libtorch rejected an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A patch could not be read.
    #[error(
        "cannot read patch {}: {source}; `hsat data check` lists every unreadable patch",
        path.display()
    )]
    Patch {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        source: ImageError,
    },
    /// Inputs that do not fit (no checkpoint found, unknown backbone, ...).
    #[error("{0}")]
    Bad(String),
}

/// A loaded model and where it came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The encoder, weights loaded.
    pub encoder: Encoder,
    /// The checkpoint directory (or the folder of the weights file).
    pub dir: PathBuf,
    /// Its `checkpoint.json`, when there is one.
    pub meta: Option<CheckpointMeta>,
}

/// Loads the model at `path`: a checkpoint directory (`backbone.safetensors`,
/// `head.safetensors`, `checkpoint.json`), a folder of checkpoints or a run's
/// `out_dir` (the newest complete checkpoint is taken), or a `.safetensors` backbone
/// file (with a `checkpoint.json` beside it, or else built as `fallback` says).
///
/// The backbone and head shapes come from `checkpoint.json` when present, so a model
/// evaluates correctly whatever the `--config` file's `[model]` section says.
pub fn load_checkpoint(
    path: &Path,
    fallback: &ModelConfig,
    device: Device,
) -> Result<LoadedModel, EvalError> {
    let (dir, weights) = resolve(path)?;
    let meta = dir
        .join(META_FILE)
        .is_file()
        .then(|| read_meta(&dir))
        .transpose()?;
    let model_cfg = match &meta {
        Some(meta) => model_of(meta, &dir)?,
        None => fallback.clone(),
    };
    let mut encoder = Encoder::new(
        model_cfg.backbone,
        &model_cfg.mlp_hidden,
        model_cfg.num_embedding_out,
        device,
    )?;
    if weights.file_name().is_some_and(|n| n == BACKBONE_FILE) && meta.is_some() {
        encoder.load(&dir)?;
    } else {
        encoder.load_backbone(&weights)?;
    }
    encoder.set_requires_grad(false)?;
    Ok(LoadedModel { encoder, dir, meta })
}

/// The checkpoint directory and backbone weights file `path` stands for.
fn resolve(path: &Path) -> Result<(PathBuf, PathBuf), EvalError> {
    if path.is_file() {
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        return Ok((dir, path.to_path_buf()));
    }
    if path.join(BACKBONE_FILE).is_file() {
        return Ok((path.to_path_buf(), path.join(BACKBONE_FILE)));
    }
    for root in [path.to_path_buf(), path.join("checkpoints")] {
        if let Some(newest) = list_checkpoints(&root)?.pop() {
            return Ok((newest.clone(), newest.join(BACKBONE_FILE)));
        }
    }
    Err(EvalError::Bad(format!(
        "no model at {}: pass a checkpoint directory (with {BACKBONE_FILE} and {META_FILE}), \
         a run's out_dir or checkpoints folder, or a .safetensors backbone file",
        path.display()
    )))
}

/// The `[model]` section a checkpoint was trained with.
fn model_of(meta: &CheckpointMeta, dir: &Path) -> Result<ModelConfig, EvalError> {
    let backbone: Backbone = meta
        .backbone
        .parse()
        .map_err(|e| EvalError::Bad(format!("{}: {e}", dir.join(META_FILE).display())))?;
    let mut model = Config::from_json_value(&meta.config)
        .map(|cfg| cfg.model)
        .map_err(|e| EvalError::Bad(format!("{}: {e}", dir.join(META_FILE).display())))?;
    model.backbone = backbone;
    model.init_checkpoint = None;
    Ok(model)
}
