//! STAND-IN for the lead's `hsat_core::checkpoint` (same API as announced in the
//! issue-10 brief) so that the worker side builds before it lands on main. On
//! `git merge main`, take main's version of this file.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Keys (dotted prefixes) that may differ between machines of one job.
pub const WORKER_LOCAL_KEYS: &[&str] = &[
    "data.loader",
    "data.db_root",
    "data.manifest",
    "infra.threads",
    "infra.out_dir",
    "infra.log_every",
];

/// What is wrong with a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The manifest is missing or unreadable.
    #[error("{}: {reason}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file does not match the manifest.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version.
    pub format_version: u32,
    /// hsat version that wrote it.
    pub hsat_version: String,
    /// Steps applied.
    pub step: u64,
    /// Epoch of the last step.
    pub epoch: u64,
    /// Config fingerprint.
    pub config_fingerprint: String,
    /// Dataset fingerprint.
    pub dataset_fingerprint: Option<String>,
    /// Every file but the manifest.
    pub files: Vec<ManifestFile>,
}

/// Retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Newest checkpoints kept.
    pub keep_last: usize,
    /// Multiples of this step kept forever (0 = none).
    pub keep_every: u64,
}

/// `step-00000012`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-N` directory name.
pub fn step_of_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn sha256_of(path: &Path) -> Result<(u64, String), CheckpointError> {
    let io = |action| {
        move |source| CheckpointError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("opening"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("reading"))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((bytes, hex))
}

/// Hashes every file of `dir` (but the manifest), writes manifest.json last.
pub fn write_manifest(
    dir: &Path,
    step: u64,
    epoch: u64,
    config_fingerprint: &str,
    dataset_fingerprint: Option<&str>,
) -> Result<Manifest, CheckpointError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io {
            action,
            path,
            source,
        }
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io("listing", dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST_FILE && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut files = Vec::new();
    for name in names {
        let (bytes, sha256) = sha256_of(&dir.join(&name))?;
        files.push(ManifestFile {
            name,
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format_version: 2,
        hsat_version: env!("CARGO_PKG_VERSION").to_owned(),
        step,
        epoch,
        config_fingerprint: config_fingerprint.to_owned(),
        dataset_fingerprint: dataset_fingerprint.map(str::to_owned),
        files,
    };
    let tmp = dir.join(".manifest.json.tmp");
    let mut file = File::create(&tmp).map_err(io("creating", &tmp))?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Manifest {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    file.write_all(&json).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    let path = dir.join(MANIFEST_FILE);
    fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    Ok(manifest)
}

/// Checks the manifest against the files.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read(&path).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        reason: format!("cannot read it ({e})"),
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Manifest {
            path: path.clone(),
            reason: format!("not a valid manifest ({e})"),
        })?;
    for f in &manifest.files {
        let file = dir.join(&f.name);
        if !file.is_file() {
            return Err(CheckpointError::File {
                path: file,
                reason: "missing".into(),
            });
        }
        let (bytes, sha) = sha256_of(&file)?;
        if bytes != f.bytes {
            return Err(CheckpointError::File {
                path: file,
                reason: format!("{bytes} bytes, the manifest says {}", f.bytes),
            });
        }
        if sha != f.sha256 {
            return Err(CheckpointError::File {
                path: file,
                reason: format!("SHA-256 {sha}, the manifest says {}", f.sha256),
            });
        }
    }
    Ok(manifest)
}

/// Checkpoint directories `step-N` under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(root)
        .map_err(|source| CheckpointError::Io {
            action: "listing",
            path: root.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            step_of_dir_name(&name).map(|s| (s, e.path()))
        })
        .filter(|(_, p)| p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}

/// The newest verified checkpoint at or before `at_or_before`, plus the newer rejected ones.
#[allow(clippy::type_complexity)]
pub fn newest_verified(
    root: &Path,
    at_or_before: Option<u64>,
) -> (Option<(PathBuf, Manifest)>, Vec<(PathBuf, CheckpointError)>) {
    let mut rejected = Vec::new();
    let candidates = match list(root) {
        Ok(c) => c,
        Err(e) => return (None, vec![(root.to_path_buf(), e)]),
    };
    for (step, dir) in candidates.into_iter().rev() {
        if at_or_before.is_some_and(|limit| step > limit) {
            continue;
        }
        match verify(&dir) {
            Ok(m) => return (Some((dir, m)), rejected),
            Err(e) => rejected.push((dir, e)),
        }
    }
    (None, rejected)
}

/// Steps to delete.
pub fn to_delete(steps: &[u64], retention: Retention, protect: &[u64]) -> Vec<u64> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    let keep_from = sorted.len().saturating_sub(retention.keep_last);
    sorted
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            *i < keep_from
                && !(retention.keep_every > 0 && **s % retention.keep_every == 0)
                && !protect.contains(s)
        })
        .map(|(_, s)| *s)
        .collect()
}

fn strip_local(value: &mut serde_json::Value, prefix: &str) {
    if let serde_json::Value::Object(map) = value {
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if WORKER_LOCAL_KEYS.contains(&key.as_str()) {
                map.remove(&k);
            } else if let Some(child) = map.get_mut(&k) {
                strip_local(child, &key);
            }
        }
    }
}

/// SHA-256 hex of the canonical JSON of a config without worker-local keys.
pub fn config_fingerprint(config: &serde_json::Value) -> String {
    let mut value = config.clone();
    strip_local(&mut value, "");
    // serde_json's map is a BTreeMap (sorted keys) without `preserve_order`.
    let text = value.to_string();
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
