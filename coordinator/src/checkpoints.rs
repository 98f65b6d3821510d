//! The coordinator's view of the checkpoints under `<out_dir>/checkpoints`: which
//! exist, whether one is complete, and which old ones retention deletes.
//!
//! The format and its checks belong to `hsat_core::checkpoint` (manifest with the
//! size and SHA-256 of every file). Until that module is on this branch, these
//! functions implement the part the coordinator needs (naming, a presence check,
//! the retention rule) and are the one place to switch over.

use std::path::{Path, PathBuf};

/// The checkpoint root of a job writing to `out_dir`.
pub fn root(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// `step-00000012` -> 12.
pub fn step_of_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Checkpoint directories `step-N` under `root`, oldest first (hidden staging
/// directories ignored); empty when `root` does not exist.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let step = step_of_dir_name(e.file_name().to_str()?)?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// `Ok` when `dir` holds a complete checkpoint; `Err` says what is wrong.
///
/// Verifies the manifest when the checkpoint has one (`manifest.json`: every file
/// listed with its size); a checkpoint without one must at least exist and hold
/// files.
pub fn verify(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .count();
    if entries == 0 {
        return Err(format!("{} is empty", dir.display()));
    }
    let manifest = dir.join("manifest.json");
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return Ok(());
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not JSON: {e}", manifest.display()))?;
    for file in value["files"].as_array().into_iter().flatten() {
        let name = file["name"].as_str().unwrap_or_default();
        let expected = file["bytes"].as_u64();
        let path = dir.join(name);
        let actual = std::fs::metadata(&path)
            .map_err(|e| format!("{} is missing: {e}", path.display()))?
            .len();
        if expected.is_some_and(|bytes| bytes != actual) {
            return Err(format!(
                "{} has {actual} bytes, the manifest says {}",
                path.display(),
                expected.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// How many checkpoints retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many are kept (0: retention is off, nothing is deleted).
    pub keep_last: usize,
    /// Every checkpoint whose step is a multiple of this is kept (0: none).
    pub keep_every: u64,
}

/// The steps of `steps` to delete: all but the newest `keep_last`, the multiples of
/// `keep_every` and `protect`.
pub fn to_delete(steps: &[u64], retention: Retention, protect: &[u64]) -> Vec<u64> {
    if retention.keep_last == 0 {
        return Vec::new();
    }
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let newest = sorted.len().saturating_sub(retention.keep_last);
    sorted[..newest]
        .iter()
        .copied()
        .filter(|step| retention.keep_every == 0 || step % retention.keep_every != 0)
        .filter(|step| !protect.contains(step))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_the_multiples_and_the_protected() {
        let steps = [2, 4, 6, 8, 10, 12];
        let keep = Retention {
            keep_last: 2,
            keep_every: 4,
        };
        // Newest two: 10, 12; multiples of 4: 4, 8; protected: 6.
        assert_eq!(to_delete(&steps, keep, &[6]), [2]);
        assert_eq!(to_delete(&steps, keep, &[]), [2, 6]);
        let off = Retention {
            keep_last: 0,
            keep_every: 0,
        };
        assert!(to_delete(&steps, off, &[]).is_empty());
    }

    #[test]
    fn listing_and_verifying_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for step in [12, 3] {
            std::fs::create_dir_all(root.join(format!("step-{step:08}"))).unwrap();
        }
        std::fs::create_dir_all(root.join(".staging-step-00000013")).unwrap();
        let listed = list(root);
        assert_eq!(listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 12]);
        let empty = verify(&listed[0].1).unwrap_err();
        assert!(empty.ends_with("is empty"), "{empty}");
        let ckpt = &listed[1].1;
        std::fs::write(ckpt.join("model.safetensors"), b"abc").unwrap();
        std::fs::write(
            ckpt.join("manifest.json"),
            r#"{"files":[{"name":"model.safetensors","bytes":4}]}"#,
        )
        .unwrap();
        let short = verify(ckpt).unwrap_err();
        assert!(
            short.contains("has 3 bytes, the manifest says 4"),
            "{short}"
        );
        std::fs::write(ckpt.join("model.safetensors"), b"abcd").unwrap();
        assert_eq!(verify(ckpt), Ok(()));
    }
}
