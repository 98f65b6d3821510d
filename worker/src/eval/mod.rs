//! The evaluation engine behind `hsat eval` (method.md §7): backbone features of every
//! train and val patch, and the white-box and transfer attacks on them. The kNN
//! scores, aggregation and metrics that turn features into the paper's numbers are
//! pure functions in `hsat_core::eval`.
//!
//! - [`images`]: the patch list of a split and batched, multi-threaded decoding
//!   (base processing only, no augmentation).
//! - [`attack`]: PGD, BIM, MI-FGSM and FGSM on `-cosine(f(x_adv), f(x))`, as the
//!   reference defines them, and APGD (adaptive step size, momentum, restarts) on the
//!   same objective; random starts drawn from a per-patch seed.
//! - [`features`]: clean features, and one pass over the val patches that crafts
//!   every attack against every model and embeds the results (white-box and
//!   transfer).
//! - [`knn`]: kNN class scores on the model's device (f32 similarities and top-k in
//!   chunks, exact f64 rescoring of the selected neighbours; equal to the CPU path).
//! - [`store`]: feature rows streamed to a raw f32 file and read back by range (a
//!   bank larger than memory).
//! - [`load_checkpoint`]: an encoder from a checkpoint directory, a run folder or a
//!   `backbone.safetensors` file.
//! - [`run`]: the whole of `hsat eval` ([`run_eval`]): dataset, models, features,
//!   attacks, the report (`hsat_core::eval::report`) and its files.

pub mod attack;
pub mod features;
pub mod images;
pub mod knn;
pub mod run;
pub mod store;

use std::path::{Path, PathBuf};

use hsat_core::config::{Backbone, Config, ModelConfig};
use tch::Device;

use crate::checkpoint::{CheckpointMeta, META_FILE, list_checkpoints, read_meta};
use crate::error::WorkerError;
use crate::model::{BACKBONE_FILE, Encoder};
use hsat_core::eval::EvalInputError;
use hsat_data::check::DatasetCheckError;
use hsat_data::image::ImageError;
use hsat_data::plot::PlotError;

pub use attack::FeatureAttack;
pub use features::{Rows, ValFeatures, clean_features, val_features};
pub use images::{BatchSpec, PatchRecord, patches_of};
pub use knn::{BankRows, DeviceKnn, KnnStats, device_knn_scores};
pub use run::{EvalEvent, EvalPlan, EvalRequest, ModelSpec, run_eval};
pub use store::{FeatureFile, FeatureWriter};

/// Why an evaluation could not run (or stopped). The inputs the kNN math rejects
/// have their own type, `hsat_core::eval::EvalInputError`, kept here as a source.
#[derive(Debug, thiserror::Error)]
pub enum EvalRunError {
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
    /// Nothing at the path looks like a model.
    #[error(
        "no model at {}: pass a checkpoint directory (with {BACKBONE_FILE} and {META_FILE}), \
         a run's out_dir or checkpoints folder, or a .safetensors backbone file",
        path.display()
    )]
    NoModel {
        /// The path given.
        path: PathBuf,
    },
    /// A checkpoint's `checkpoint.json` names a backbone or config this build cannot use.
    #[error("{}: {reason}", file.display())]
    CheckpointConfig {
        /// The `checkpoint.json` file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model's features are not a `[N, D]` matrix (a backbone bug).
    #[error("expected features [N, D], got {shape:?}")]
    FeatureShape {
        /// The shape the backbone returned.
        shape: Vec<i64>,
    },
    /// The operating system refused the decode thread.
    #[error("cannot start the decode thread: {0}")]
    DecodeThread(#[source] std::io::Error),
    /// A worker thread panicked (a bug; its message is on stderr).
    #[error("{what} thread panicked")]
    ThreadPanicked {
        /// Which kind of thread.
        what: &'static str,
    },
    /// `data.source` is the in-memory generator, which has no train/val split.
    #[error(
        "hsat eval needs a dataset on disk with a train/val split, but data.source = \"synthetic\" \
         (generated in memory); write one with `hsat synth --out DIR` and set data.source = \"opensrh\", \
         data.db_root = DIR"
    )]
    SyntheticData,
    /// The dataset cannot be indexed or has errors.
    #[error(transparent)]
    Dataset(#[from] DatasetCheckError),
    /// One split has no patch.
    #[error(
        "the dataset has {train} train and {val} val patches: the kNN evaluation needs both \
         (check the split file)"
    )]
    EmptySplit {
        /// Train patches.
        train: usize,
        /// Val patches.
        val: usize,
    },
    /// A model of the request could not be loaded.
    #[error("cannot load the model {name:?} from {}", path.display())]
    LoadModel {
        /// The model's name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// Why it failed.
        source: Box<EvalRunError>,
    },
    /// Two models have the same name, so their rows could not be told apart.
    #[error("two models are named alike ({names:?}): name them with --checkpoint NAME=PATH")]
    DuplicateNames {
        /// Every model name, in request order.
        names: Vec<String>,
    },
    /// The kNN math rejected the features (a bug or an inconsistent index).
    #[error(transparent)]
    Input(#[from] EvalInputError),
    /// An output file could not be written.
    #[error("cannot write {}; check that the output directory is writable", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The report could not be serialised.
    #[error("serialising the results")]
    Serialise(#[source] serde_json::Error),
    /// A plot could not be drawn or written.
    #[error(transparent)]
    Plot(#[from] PlotError),
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
) -> Result<LoadedModel, EvalRunError> {
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
    let mut encoder = Encoder::with_head(
        model_cfg.backbone,
        crate::model::HeadSpec::of(&model_cfg),
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
fn resolve(path: &Path) -> Result<(PathBuf, PathBuf), EvalRunError> {
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
    Err(EvalRunError::NoModel {
        path: path.to_path_buf(),
    })
}

/// The `[model]` section a checkpoint was trained with.
fn model_of(meta: &CheckpointMeta, dir: &Path) -> Result<ModelConfig, EvalRunError> {
    let bad = |reason: String| EvalRunError::CheckpointConfig {
        file: dir.join(META_FILE),
        reason,
    };
    let backbone: Backbone = meta.backbone.parse().map_err(|e| bad(format!("{e}")))?;
    let mut model = Config::from_json_value(&meta.config)
        .map(|cfg| cfg.model)
        .map_err(|e| bad(format!("{e}")))?;
    model.backbone = backbone;
    model.init_checkpoint = None;
    Ok(model)
}
