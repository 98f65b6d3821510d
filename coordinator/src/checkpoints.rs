//! The coordinator's view of the checkpoints under `<out_dir>/checkpoints`: which
//! exist, whether one is complete, and which old ones retention deletes. The format
//! and its checks are `hsat_core::checkpoint`'s (a manifest with the size and
//! SHA-256 of every file, written last); this module adapts them to the
//! scheduler's injected check and the retention thread.

use std::path::{Path, PathBuf};

pub use hsat_core::checkpoint::{Retention, step_of_dir_name, to_delete};

/// The checkpoint root of a job writing to `out_dir`.
pub fn root(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// Checkpoint directories `step-N` under `root`, oldest first (hidden staging
/// directories ignored); empty when `root` does not exist or cannot be listed
/// (logged).
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    hsat_core::checkpoint::list(root).unwrap_or_else(|err| {
        tracing::warn!(error = %err, "cannot list the checkpoints");
        Vec::new()
    })
}

/// `Ok` when `dir` holds a complete checkpoint (its manifest verifies); `Err` names
/// the file and what is wrong.
pub fn verify(dir: &Path) -> Result<(), String> {
    hsat_core::checkpoint::verify(dir)
        .map(|_| ())
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_and_verifying_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for step in [12, 3] {
            std::fs::create_dir_all(root.join(format!("step-{step:08}"))).unwrap();
        }
        std::fs::create_dir_all(root.join(".step-00000013.tmp-1")).unwrap();
        let listed = list(root);
        assert_eq!(listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 12]);
        let unfinished = verify(&listed[0].1).unwrap_err();
        assert!(unfinished.contains("not completed"), "{unfinished}");
        let ckpt = &listed[1].1;
        std::fs::write(ckpt.join("model.safetensors"), b"abcd").unwrap();
        hsat_core::checkpoint::write_manifest(ckpt, 12, 0, "cfg", None).unwrap();
        assert_eq!(verify(ckpt), Ok(()));
        std::fs::write(ckpt.join("model.safetensors"), b"abc").unwrap();
        let short = verify(ckpt).unwrap_err();
        assert!(
            short.contains("model.safetensors") && short.contains("3 bytes"),
            "{short}"
        );
    }
}
