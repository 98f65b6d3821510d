//! What makes a checkpoint directory complete, and which ones to keep.
//!
//! A checkpoint is a directory `step-NNNNNNNN` under `<out_dir>/checkpoints` whose
//! last file written is `manifest.json`: the size and SHA-256 of every other file.
//! The worker writes the files (it alone links libtorch); this module, free of
//! libtorch, is shared by the worker, which verifies before loading, and the
//! coordinator, which verifies before choosing a checkpoint to roll back to and
//! applies the retention policy. A directory without a manifest was never
//! completed; one whose files disagree with it was truncated, flipped or edited.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::compare_hex;
pub use crate::config::config_fingerprint;

/// The manifest's file name; written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// Directory name of the checkpoint holding `step` applied steps.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint directory name (`step-00000012` -> 12).
pub fn step_of_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// One file of a checkpoint as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of its content.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// The hsat version that wrote it.
    pub hsat_version: String,
    /// Optimizer steps the state holds.
    pub step: u64,
    /// Epoch of the last applied step.
    pub epoch: u64,
    /// [`config_fingerprint`] of the job's config.
    pub config_fingerprint: String,
    /// Fingerprint of the dataset index (absent for in-memory data).
    pub dataset_fingerprint: Option<String>,
    /// Every other file of the directory, by name.
    pub files: Vec<ManifestFile>,
}

/// Why a checkpoint cannot be written or used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `listing`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// No manifest: the checkpoint was never completed.
    #[error("{}: no {MANIFEST_FILE}: the checkpoint was not completed (a crash while writing it?)", dir.display())]
    Incomplete {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The manifest is not valid.
    #[error("{}: not a valid hsat checkpoint manifest ({reason})", path.display())]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file the manifest lists is gone.
    #[error("{}: missing (the manifest lists it)", path.display())]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// A file's size differs from the manifest's.
    #[error("{}: {actual} bytes, the manifest says {expected}: truncated or overwritten", path.display())]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Size recorded.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// A file's content differs from the manifest's digest.
    #[error("{}: SHA-256 {actual} differs from the manifest's {expected}: the file is corrupt or was modified", path.display())]
    WrongDigest {
        /// The file.
        path: PathBuf,
        /// Digest recorded.
        expected: String,
        /// Digest found.
        actual: String,
    },
}

impl CheckpointError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// Hashes every file of `dir` (but the manifest and hidden files) and writes
/// `manifest.json` last, through a temporary file, fsynced and renamed, so that a
/// manifest exists only once every file it lists is on disk.
///
/// # Errors
///
/// [`CheckpointError::Io`] naming the file that could not be read or written.
pub fn write_manifest(
    dir: &Path,
    step: u64,
    epoch: u64,
    config_fingerprint: &str,
    dataset_fingerprint: Option<&str>,
) -> Result<Manifest, CheckpointError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(CheckpointError::io("listing", dir))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name != MANIFEST_FILE && !name.starts_with('.'))
        .collect();
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let (bytes, sha256) = digest(&path)?;
        files.push(ManifestFile {
            name,
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        hsat_version: env!("CARGO_PKG_VERSION").to_owned(),
        step,
        epoch,
        config_fingerprint: config_fingerprint.to_owned(),
        dataset_fingerprint: dataset_fingerprint.map(str::to_owned),
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::BadManifest {
        path: dir.join(MANIFEST_FILE),
        reason: e.to_string(),
    })?;
    let staging = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    let mut file = File::create(&staging).map_err(CheckpointError::io("creating", &staging))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(CheckpointError::io("writing", &staging))?;
    drop(file);
    let target = dir.join(MANIFEST_FILE);
    fs::rename(&staging, &target).map_err(CheckpointError::io("renaming into place", &target))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CheckpointError::io("syncing", dir))?;
    Ok(manifest)
}

/// Reads `dir`'s manifest and checks every file it lists (present, same size, same
/// SHA-256), and that the manifest's step is the directory's.
///
/// # Errors
///
/// The first problem found, naming the file: [`CheckpointError::Incomplete`],
/// [`BadManifest`](CheckpointError::BadManifest),
/// [`MissingFile`](CheckpointError::MissingFile),
/// [`WrongSize`](CheckpointError::WrongSize),
/// [`WrongDigest`](CheckpointError::WrongDigest) or `Io`.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Incomplete {
                dir: dir.to_path_buf(),
            });
        }
        Err(err) => return Err(CheckpointError::io("reading", &path)(err)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format_version != MANIFEST_VERSION {
        return Err(CheckpointError::BadManifest {
            path,
            reason: format!(
                "format_version {}, this hsat reads {MANIFEST_VERSION}",
                manifest.format_version
            ),
        });
    }
    let named_step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(step_of_dir_name);
    if let Some(named) = named_step
        && named != manifest.step
    {
        return Err(CheckpointError::BadManifest {
            path,
            reason: format!(
                "it records step {} but the directory is step {named}",
                manifest.step
            ),
        });
    }
    for file in &manifest.files {
        if file.name.contains('/') || file.name.contains('\\') || file.name.starts_with('.') {
            return Err(CheckpointError::BadManifest {
                path,
                reason: format!("file name {:?} is not a plain name", file.name),
            });
        }
        let file_path = dir.join(&file.name);
        let metadata = match fs::metadata(&file_path) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingFile { path: file_path });
            }
            Err(err) => return Err(CheckpointError::io("reading", &file_path)(err)),
        };
        if metadata.len() != file.bytes {
            return Err(CheckpointError::WrongSize {
                path: file_path,
                expected: file.bytes,
                actual: metadata.len(),
            });
        }
        let (_, sha256) = digest(&file_path)?;
        if sha256 != file.sha256 {
            return Err(CheckpointError::WrongDigest {
                path: file_path,
                expected: file.sha256.clone(),
                actual: sha256,
            });
        }
    }
    Ok(manifest)
}

/// Checkpoint directories (`step-N`) under `root` with their steps, oldest first;
/// staging and retired directories (hidden names) are not listed. A missing root
/// has none.
///
/// # Errors
///
/// [`CheckpointError::Io`] when `root` exists but cannot be listed.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(CheckpointError::io("listing", root)(err)),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| {
            let step = step_of_dir_name(entry.file_name().to_str()?)?;
            Some((step, entry.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// A checkpoint that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// What [`newest_verified`] found.
#[derive(Debug, Default)]
pub struct Search {
    /// The newest checkpoint that verified, if any.
    pub found: Option<Verified>,
    /// Every newer candidate that did not, newest first (to log as warnings).
    pub rejected: Vec<(PathBuf, CheckpointError)>,
}

/// The newest checkpoint under `root` that verifies, among those holding at most
/// `at_or_before` steps (`None`: any), and the newer ones rejected on the way.
///
/// # Errors
///
/// [`CheckpointError::Io`] when `root` cannot be listed.
pub fn newest_verified(root: &Path, at_or_before: Option<u64>) -> Result<Search, CheckpointError> {
    let mut search = Search::default();
    for (_, dir) in list(root)?
        .into_iter()
        .rev()
        .filter(|(step, _)| at_or_before.is_none_or(|limit| *step <= limit))
    {
        match verify(&dir) {
            Ok(manifest) => {
                search.found = Some(Verified { dir, manifest });
                break;
            }
            Err(err) => search.rejected.push((dir, err)),
        }
    }
    Ok(search)
}

/// Which checkpoints to keep: the newest `keep_last`, and those at multiples of
/// `keep_every` for good (`training.keep_checkpoints`, `training.keep_checkpoint_every`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Newest checkpoints kept; at least 1 is kept whatever this says.
    pub keep_last: usize,
    /// Steps whose multiples are kept for good; 0 = none.
    pub keep_every: u64,
}

/// The steps of `steps` to delete under `retention`, never one in `protect`
/// (the checkpoint a rollback to the ledger's last commit needs, and any not yet
/// committed). Sorted ascending.
pub fn to_delete(steps: &[u64], retention: Retention, protect: &[u64]) -> Vec<u64> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let keep_last = retention.keep_last.max(1);
    let recent_from = sorted.len().saturating_sub(keep_last);
    sorted
        .iter()
        .enumerate()
        .filter(|&(position, step)| {
            position < recent_from
                && !(retention.keep_every > 0 && step.is_multiple_of(retention.keep_every))
                && !protect.contains(step)
        })
        .map(|(_, &step)| step)
        .collect()
}

fn digest(path: &Path) -> Result<(u64, String), CheckpointError> {
    let mut file = File::open(path).map_err(CheckpointError::io("reading", path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(CheckpointError::io("reading", path))?;
        if read == 0 {
            break;
        }
        bytes += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((bytes, compare_hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(root: &Path, step: u64, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = root.join(checkpoint_dir_name(step));
        fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            fs::write(dir.join(name), content).unwrap();
        }
        write_manifest(&dir, step, 0, "cfg", Some("data")).unwrap();
        dir
    }

    #[test]
    fn a_complete_checkpoint_verifies_and_lists_every_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = checkpoint(root.path(), 7, &[("a.bin", b"hello"), ("b.json", b"{}")]);
        let manifest = verify(&dir).unwrap();
        assert_eq!(manifest.step, 7);
        let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.bin", "b.json"]);
        assert_eq!(manifest.files[0].bytes, 5);
        // SHA-256("hello")
        assert_eq!(
            manifest.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn truncated_flipped_missing_and_unfinished_checkpoints_are_rejected_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = checkpoint(root.path(), 1, &[("w.bin", b"0123456789")]);
        let file = dir.join("w.bin");

        fs::write(&file, b"01234").unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::WrongSize { path, expected: 10, actual: 5 } if *path == file),
            "{err}"
        );
        assert!(err.to_string().contains("w.bin"), "{err}");

        fs::write(&file, b"0123456788").unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::WrongDigest { path, .. } if *path == file),
            "{err}"
        );

        fs::remove_file(&file).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingFile { path } if *path == file),
            "{err}"
        );

        fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(&err, CheckpointError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn a_manifest_moved_to_another_step_is_rejected() {
        let root = tempfile::tempdir().unwrap();
        let dir = checkpoint(root.path(), 3, &[("w.bin", b"x")]);
        let moved = root.path().join(checkpoint_dir_name(4));
        fs::rename(&dir, &moved).unwrap();
        let err = verify(&moved).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::BadManifest { reason, .. } if reason.contains("step 3")),
            "{err}"
        );
    }

    #[test]
    fn the_newest_verified_checkpoint_skips_damaged_newer_ones_and_respects_the_limit() {
        let root = tempfile::tempdir().unwrap();
        for step in [2, 4, 6] {
            checkpoint(root.path(), step, &[("w.bin", b"weights")]);
        }
        // A staging directory and an unrelated one are not candidates.
        fs::create_dir_all(root.path().join(".step-00000008.tmp-1")).unwrap();
        fs::create_dir_all(root.path().join("notes")).unwrap();
        fs::write(root.path().join("step-00000006/w.bin"), b"weightz").unwrap();

        let search = newest_verified(root.path(), None).unwrap();
        assert_eq!(search.found.unwrap().manifest.step, 4);
        assert_eq!(search.rejected.len(), 1);
        assert!(search.rejected[0].0.ends_with("step-00000006"));

        let search = newest_verified(root.path(), Some(3)).unwrap();
        assert_eq!(search.found.unwrap().manifest.step, 2);
        assert!(search.rejected.is_empty());

        let empty = newest_verified(&root.path().join("none"), None).unwrap();
        assert!(empty.found.is_none());
    }

    #[test]
    fn retention_keeps_the_newest_the_permanent_and_the_protected() {
        let steps = [10, 20, 30, 40, 50, 60];
        let keep = |keep_last, keep_every| Retention {
            keep_last,
            keep_every,
        };
        assert_eq!(to_delete(&steps, keep(3, 0), &[]), [10, 20, 30]);
        assert_eq!(to_delete(&steps, keep(3, 20), &[]), [10, 30]);
        assert_eq!(to_delete(&steps, keep(2, 0), &[30]), [10, 20, 40]);
        assert_eq!(to_delete(&steps, keep(0, 0), &[]), [10, 20, 30, 40, 50]);
        assert!(to_delete(&steps, keep(10, 0), &[]).is_empty());
    }

    #[test]
    fn directory_names_round_trip() {
        assert_eq!(checkpoint_dir_name(12), "step-00000012");
        assert_eq!(step_of_dir_name("step-00000012"), Some(12));
        assert_eq!(step_of_dir_name("step-"), None);
        assert_eq!(step_of_dir_name("step-12a"), None);
        assert_eq!(step_of_dir_name(".step-00000012.tmp-3"), None);
    }
}
