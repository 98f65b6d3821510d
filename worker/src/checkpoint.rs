//! Model checkpoints: a directory per step holding `backbone.safetensors`
//! (torchvision names), `head.safetensors` and `checkpoint.json`.
//!
//! A checkpoint becomes visible only when complete: files are written into a hidden
//! temporary directory, fsynced, and the directory is renamed into place, so a crash
//! leaves either the old set of checkpoints or the new one, never a torn directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WorkerError};
use crate::model::Encoder;
use crate::train::step::StepLosses;

/// Name of the metadata file inside a checkpoint directory.
pub const META_FILE: &str = "checkpoint.json";
/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Optimiser steps completed.
    pub step: u64,
    /// Epoch of the last completed step.
    pub epoch: u64,
    /// Backbone name (`resnet50`, ...).
    pub backbone: String,
    /// Backbone feature dimension.
    pub feature_dim: i64,
    /// The effective config of the run, in TOML key names.
    pub config: serde_json::Value,
    /// Losses of the last step.
    pub last_step: Option<StepLosses>,
    /// Mean optimised loss over the steps since the previous checkpoint.
    pub mean_total_loss: Option<f64>,
    /// Fingerprint of the dataset index trained on (absent for in-memory data), so a
    /// later run or evaluation can tell that the dataset changed.
    #[serde(default)]
    pub dataset_fingerprint: Option<String>,
}

/// Directory name of the checkpoint of `step`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `model` under `root` and returns its directory.
pub fn write_checkpoint(root: &Path, model: &Encoder, meta: &CheckpointMeta) -> Result<PathBuf> {
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
    fs::create_dir(&staging).map_err(WorkerError::io("creating", &staging))?;
    model.save(&staging)?;
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

/// Complete checkpoints under `root`, oldest first (temporary directories are ignored).
pub fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<PathBuf> = fs::read_dir(root)
        .map_err(WorkerError::io("listing", root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .filter(|p| p.join(META_FILE).is_file())
        .collect();
    found.sort();
    Ok(found)
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(WorkerError::io("syncing", path))
}
