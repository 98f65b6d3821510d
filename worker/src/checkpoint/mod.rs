//! Checkpoints: a directory per step holding the complete training state.
//!
//! ```text
//!   step-00000012/
//!     backbone.safetensors    backbone state dict (torchvision names)
//!     backbone_pgd.safetensors  (dual-BN backbones only) the `pgd` batch-norm
//!                             branch, torchvision names: lay it over backbone.safetensors
//!     head.safetensors        projection head state dict
//!     optimizer.safetensors   AdamW moments `exp_avg.<param>`, `exp_avg_sq.<param>`
//!                             and the update counter `step` (bias corrections)
//!     checkpoint.json         format 2: step, epoch, hsat version, the config and
//!                             its fingerprint, the dataset fingerprint, losses
//!     manifest.json           written last: size and SHA-256 of every other file
//! ```
//!
//! With the model, the optimiser and the position, nothing else carries over from
//! one step to the next: the batch of step s is a function of (seed, config, s), the
//! PGD random start is seeded from (seed, s), and the schedules are functions of the
//! step and epoch; so training resumed from `step-N` continues exactly as if it had
//! never stopped.
//!
//! A checkpoint becomes visible only when complete: files are written into a hidden
//! staging directory, fsynced, the manifest is written last, and the directory is
//! renamed into place, so a crash leaves either the old set of checkpoints or the new
//! one, never a torn directory. Loading verifies the manifest first
//! ([`hsat_core::checkpoint::verify`]): a truncated or tampered file is rejected with
//! its name and what is wrong, and [`newest_usable`] falls back to the checkpoint
//! before it.
//!
//! - this file: the format, [`Snapshot`] (the state copied to host memory at a step
//!   boundary), [`write_checkpoint`], reading and choosing checkpoints.
//! - [`writer`]: [`CheckpointWriter`], which writes snapshots on a background thread
//!   (or inline) and applies retention.

pub mod writer;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use hsat_core::checkpoint::{self as core_checkpoint, Manifest};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, WorkerError};
use crate::model::{BACKBONE_FILE, BACKBONE_PGD_FILE, HEAD_FILE};
use crate::train::step::StepLosses;

pub use hsat_core::checkpoint::checkpoint_dir_name;
pub use writer::CheckpointWriter;

/// Name of the metadata file inside a checkpoint directory.
pub const META_FILE: &str = "checkpoint.json";
/// Name of the optimiser state file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Version of the checkpoint layout: 2 holds the complete training state and a
/// manifest; 1 (before) held the model only, which evaluation still reads.
pub const FORMAT_VERSION: u32 = 2;

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Optimiser steps completed: training resumes with step `step` (0-based).
    pub step: u64,
    /// Epoch of the last completed step.
    pub epoch: u64,
    /// The hsat version that wrote it (empty in format 1).
    #[serde(default)]
    pub hsat_version: String,
    /// Backbone name (`resnet50`, ...).
    pub backbone: String,
    /// Backbone feature dimension.
    pub feature_dim: i64,
    /// The effective config of the run, in TOML key names.
    pub config: serde_json::Value,
    /// [`hsat_core::checkpoint::config_fingerprint`] of `config` (empty in format 1).
    #[serde(default)]
    pub config_fingerprint: String,
    /// Losses of the last step.
    pub last_step: Option<StepLosses>,
    /// Mean optimised loss over the steps since the previous checkpoint.
    pub mean_total_loss: Option<f64>,
    /// Fingerprint of the dataset index trained on (absent for in-memory data), so a
    /// later run or evaluation can tell that the dataset changed.
    #[serde(default)]
    pub dataset_fingerprint: Option<String>,
}

/// The complete training state at a step boundary, deep-copied to host memory
/// (training may go on mutating the live tensors while this is written).
#[derive(Debug)]
pub struct Snapshot {
    /// Backbone state dict, torchvision names.
    pub backbone: Vec<(String, Tensor)>,
    /// The `pgd` batch-norm branch of a dual-BN backbone, torchvision names
    /// ([`crate::model::ModelSnapshot::backbone_pgd`]); `None` for other backbones.
    pub backbone_pgd: Option<Vec<(String, Tensor)>>,
    /// Head state dict.
    pub head: Vec<(String, Tensor)>,
    /// Optimiser state ([`crate::train::optim::AdamW::state_snapshot`]).
    pub optimizer: Vec<(String, Tensor)>,
    /// What `checkpoint.json` will say.
    pub meta: CheckpointMeta,
}

/// Removes the hidden staging and retired directories of earlier steps that a
/// killed writer left behind (`.step-N.tmp-PID`, `.step-N.old-PID`). Only rank 0
/// writes, one step after another, so nobody can still be writing an earlier step;
/// a failure to remove one is logged and does not stop the new checkpoint.
fn remove_abandoned(root: &Path, step: u64) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let abandoned_step = name
            .strip_prefix('.')
            .and_then(|rest| {
                rest.split_once(".tmp-")
                    .or_else(|| rest.split_once(".old-"))
            })
            .and_then(|(dir, _)| hsat_core::checkpoint::step_of_dir_name(dir));
        if abandoned_step.is_some_and(|s| s < step) {
            let path = entry.path();
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed an abandoned checkpoint staging directory")
                }
                Err(err) => {
                    tracing::warn!(dir = %path.display(), error = %err, "cannot remove an abandoned checkpoint staging directory")
                }
            }
        }
    }
}

/// Writes `snapshot` as the checkpoint of its step under `root` and returns its
/// directory: staging directory, every file fsynced, the manifest last, one rename.
pub fn write_checkpoint(root: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let meta = &snapshot.meta;
    if !root.exists() {
        fs::create_dir_all(root).map_err(WorkerError::io("creating", root))?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync(parent)?;
        }
    }
    let name = checkpoint_dir_name(meta.step);
    let target = root.join(&name);
    let staging = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(WorkerError::io("removing", &staging))?;
    }
    remove_abandoned(root, meta.step);
    fs::create_dir(&staging).map_err(WorkerError::io("creating", &staging))?;
    let files = [
        (BACKBONE_FILE, Some(&snapshot.backbone)),
        (BACKBONE_PGD_FILE, snapshot.backbone_pgd.as_ref()),
        (HEAD_FILE, Some(&snapshot.head)),
        (OPTIMIZER_FILE, Some(&snapshot.optimizer)),
    ];
    for (file, entries) in files
        .into_iter()
        .filter_map(|(file, entries)| entries.map(|e| (file, e)))
    {
        let path = staging.join(file);
        Tensor::write_safetensors(entries, &path).map_err(|err| WorkerError::Weights {
            path: path.clone(),
            reason: format!("cannot write it ({err})"),
        })?;
    }
    let json = serde_json::to_vec_pretty(meta).map_err(WorkerError::Metadata)?;
    let meta_path = staging.join(META_FILE);
    let mut file = File::create(&meta_path).map_err(WorkerError::io("creating", &meta_path))?;
    file.write_all(&json)
        .map_err(WorkerError::io("writing", &meta_path))?;
    drop(file);
    for entry in fs::read_dir(&staging).map_err(WorkerError::io("listing", &staging))? {
        let path = entry.map_err(WorkerError::io("listing", &staging))?.path();
        sync(&path)?;
    }
    // The manifest goes last: its presence says every file it lists was complete.
    core_checkpoint::write_manifest(
        &staging,
        meta.step,
        meta.epoch,
        &meta.config_fingerprint,
        meta.dataset_fingerprint.as_deref(),
    )
    .map_err(|source| WorkerError::Checkpoint {
        dir: staging.clone(),
        source,
    })?;
    sync(&staging)?;
    // A run started again in the same out_dir saves the same steps again. Move the old
    // checkpoint aside with one rename, so that at every instant `step-N` is either the
    // complete old one or the complete new one, and delete it only afterwards.
    let retired = root.join(format!(".{name}.old-{}", std::process::id()));
    let replaced = target.exists();
    if replaced {
        fs::rename(&target, &retired).map_err(WorkerError::io("moving aside", &target))?;
    }
    fs::rename(&staging, &target).map_err(WorkerError::io("renaming into place", &target))?;
    sync(root)?;
    if replaced {
        fs::remove_dir_all(&retired).map_err(WorkerError::io("removing", &retired))?;
    }
    Ok(target)
}

/// Reads `checkpoint.json` of a checkpoint directory.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(META_FILE);
    let text = fs::read(&path).map_err(WorkerError::io("reading", &path))?;
    serde_json::from_slice(&text).map_err(|e| WorkerError::Weights {
        path,
        reason: format!("not a valid hsat checkpoint.json ({e})"),
    })
}

/// Checkpoint directories under `root` that have their metadata, oldest first
/// (hidden staging directories are ignored). Evaluation picks from these; training
/// resumes only from a verified one ([`newest_usable`]).
pub fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let listed = core_checkpoint::list(root).map_err(|source| WorkerError::Checkpoint {
        dir: root.to_path_buf(),
        source,
    })?;
    Ok(listed
        .into_iter()
        .map(|(_, dir)| dir)
        .filter(|dir| dir.join(META_FILE).is_file())
        .collect())
}

/// Verifies the manifest of `dir` and reads its metadata, which must be of the
/// current format (the complete training state).
pub fn open_for_resume(dir: &Path) -> Result<(Manifest, CheckpointMeta)> {
    let manifest = core_checkpoint::verify(dir).map_err(|source| WorkerError::Checkpoint {
        dir: dir.to_path_buf(),
        source,
    })?;
    let meta = read_meta(dir)?;
    if meta.format_version < FORMAT_VERSION {
        return Err(WorkerError::Weights {
            path: dir.join(META_FILE),
            reason: format!(
                "format {} holds the model only, not the optimiser state: evaluate it, or \
                 start training from its backbone with model.init_checkpoint",
                meta.format_version
            ),
        });
    }
    if meta.step != manifest.step {
        return Err(WorkerError::Weights {
            path: dir.join(META_FILE),
            reason: format!(
                "says step {}, its manifest says {}: the checkpoint was tampered with",
                meta.step, manifest.step
            ),
        });
    }
    Ok((manifest, meta))
}

/// The newest checkpoint under `root` at or before step `at_or_before` (`None`:
/// any) whose manifest verifies (an error only when `root` cannot be listed). Each newer one that fails verification is logged as
/// a warning naming the file and what is wrong, and the checkpoint used instead.
pub fn newest_usable(
    root: &Path,
    at_or_before: Option<u64>,
) -> Result<Option<(PathBuf, Manifest)>> {
    let search = core_checkpoint::newest_verified(root, at_or_before).map_err(|source| {
        WorkerError::Checkpoint {
            dir: root.to_path_buf(),
            source,
        }
    })?;
    let using = search.found.as_ref().map_or_else(
        || "none (no complete checkpoint is left)".to_owned(),
        |found| found.dir.display().to_string(),
    );
    for (dir, err) in &search.rejected {
        tracing::warn!(
            "checkpoint {} rejected: {err}; using {using}",
            dir.display()
        );
    }
    Ok(search.found.map(|found| (found.dir, found.manifest)))
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(WorkerError::io("syncing", path))
}
