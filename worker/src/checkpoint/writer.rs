//! [`CheckpointWriter`]: writes [`Snapshot`]s one at a time, on a background thread
//! (asynchronous checkpoints) or on the caller's (synchronous), and applies
//! retention after each completed write.
//!
//! Rules, which keep checkpoints ordered and errors visible:
//!
//! - at most one write is in flight: submitting a snapshot first waits for the
//!   previous write;
//! - every completed directory comes out exactly once (from [`submit`], [`poll`] or
//!   [`finish`]), so a caller reports a checkpoint only when it is complete on disk;
//! - a failed write is never lost: its error comes out of the next [`submit`],
//!   [`poll`] or [`finish`], and the snapshot given to a failing [`submit`] is not
//!   written;
//! - dropping the writer waits for the write in flight (and logs its error).
//!
//! [`submit`]: CheckpointWriter::submit
//! [`poll`]: CheckpointWriter::poll
//! [`finish`]: CheckpointWriter::finish

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use hsat_core::checkpoint::{Retention, list, to_delete};

use super::{Snapshot, write_checkpoint};
use crate::error::{Result, WorkerError};

/// How a [`CheckpointWriter`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterOptions {
    /// Where the `step-N` directories go.
    pub root: PathBuf,
    /// Write on a background thread (`training.async_checkpoints`).
    pub asynchronous: bool,
    /// Delete old checkpoints after each completed write (the single-process
    /// trainer); `None` keeps them all (distributed workers: the coordinator owns
    /// retention there).
    pub retention: Option<Retention>,
}

/// How a completed checkpoint write went (for the worker's metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct WriteStats {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Seconds writing it (files, manifest, rename; retention excluded).
    pub seconds: f64,
    /// Bytes of its files.
    pub bytes: u64,
}

/// Writes checkpoints one at a time; see the [module docs](self).
#[derive(Debug)]
pub struct CheckpointWriter {
    options: WriterOptions,
    in_flight: Option<JoinHandle<Result<WriteStats>>>,
    /// The newest completed write not yet taken by [`CheckpointWriter::take_last_write`].
    last_write: Option<WriteStats>,
}

impl CheckpointWriter {
    /// A writer with nothing in flight.
    pub fn new(options: WriterOptions) -> Self {
        CheckpointWriter {
            options,
            in_flight: None,
            last_write: None,
        }
    }

    /// Waits for the previous write, then writes `snapshot`: in the background when
    /// asynchronous, before returning otherwise. Returns the directory of the
    /// write(s) completed meanwhile, newest (the previous one, or this one when
    /// synchronous); the previous write's error instead, if it failed.
    pub fn submit(&mut self, snapshot: Snapshot) -> Result<Option<PathBuf>> {
        let previous = self.finish()?;
        if !self.options.asynchronous {
            let stats = write_and_retain(&self.options, &snapshot)?;
            return Ok(Some(self.completed(stats)));
        }
        let options = self.options.clone();
        let handle = std::thread::Builder::new()
            .name("hsat-checkpoint".into())
            .spawn(move || write_and_retain(&options, &snapshot))
            .map_err(WorkerError::io(
                "starting the checkpoint thread for",
                &self.options.root,
            ))?;
        self.in_flight = Some(handle);
        Ok(previous)
    }

    /// The directory of the write in flight if it has completed meanwhile (its
    /// error if it failed); `None` while it runs or when nothing was submitted.
    pub fn poll(&mut self) -> Result<Option<PathBuf>> {
        if self.in_flight.as_ref().is_some_and(JoinHandle::is_finished) {
            return self.finish();
        }
        Ok(None)
    }

    /// Waits for the write in flight: its directory, or its error.
    pub fn finish(&mut self) -> Result<Option<PathBuf>> {
        let Some(handle) = self.in_flight.take() else {
            return Ok(None);
        };
        match handle.join() {
            Ok(written) => Ok(Some(self.completed(written?))),
            Err(_) => Err(WorkerError::CheckpointThread {
                root: self.options.root.clone(),
            }),
        }
    }

    /// Whether a write is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// How the newest write completed since the last call went.
    pub fn take_last_write(&mut self) -> Option<WriteStats> {
        self.last_write.take()
    }

    fn completed(&mut self, stats: WriteStats) -> PathBuf {
        let dir = stats.dir.clone();
        self.last_write = Some(stats);
        dir
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if let Err(err) = self.finish() {
            tracing::error!(error = %crate::error::error_chain(&err), "the last checkpoint write failed");
        }
    }
}

fn write_and_retain(options: &WriterOptions, snapshot: &Snapshot) -> Result<WriteStats> {
    let started = std::time::Instant::now();
    let written = write_checkpoint(&options.root, snapshot)?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = std::fs::read_dir(&written)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.metadata().ok())
                .filter(|meta| meta.is_file())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0);
    if let Some(retention) = options.retention {
        retain(&options.root, retention, snapshot.meta.step);
    }
    Ok(WriteStats {
        dir: written,
        seconds,
        bytes,
    })
}

/// Deletes the checkpoints `retention` lets go, never `newest`. Each goes in two
/// moves, a rename to a hidden name and then the removal, so a crash in between
/// never leaves a half-deleted `step-N` behind. Failures are logged, not fatal:
/// a checkpoint too many costs disk space, not correctness.
fn retain(root: &Path, retention: Retention, newest: u64) {
    let listed = match list(root) {
        Ok(listed) => listed,
        Err(err) => {
            tracing::warn!(error = %err, "cannot list checkpoints for retention");
            return;
        }
    };
    let steps: Vec<u64> = listed.iter().map(|(step, _)| *step).collect();
    for step in to_delete(&steps, retention, &[newest]) {
        let Some((_, dir)) = listed.iter().find(|(s, _)| *s == step) else {
            continue;
        };
        let doomed = root.join(format!(".deleting-step-{step}-{}", std::process::id()));
        let removed = fs::rename(dir, &doomed).and_then(|()| fs::remove_dir_all(&doomed));
        match removed {
            Ok(()) => tracing::debug!(step, "deleted checkpoint (retention)"),
            Err(err) => {
                tracing::warn!(checkpoint = %dir.display(), error = %err, "cannot delete an old checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointMeta, FORMAT_VERSION, read_meta};
    use tch::{Device, Kind, Tensor};

    fn snapshot(step: u64) -> Snapshot {
        let t = |v: f32| Tensor::from_slice(&[v, v + 1.0]).to_kind(Kind::Float);
        Snapshot {
            backbone: vec![("conv1.weight".into(), t(step as f32))],
            backbone_pgd: None,
            head: vec![("layers.0.bias".into(), t(0.5))],
            optimizer: vec![(
                "step".into(),
                Tensor::from_slice(&[step as i64]).to_device(Device::Cpu),
            )],
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                step,
                epoch: 0,
                hsat_version: "test".into(),
                backbone: "small_cnn".into(),
                feature_dim: 16,
                config: serde_json::json!({}),
                config_fingerprint: "cfg".into(),
                last_step: None,
                mean_total_loss: None,
                dataset_fingerprint: None,
            },
        }
    }

    fn writer(root: &Path, asynchronous: bool, retention: Option<Retention>) -> CheckpointWriter {
        CheckpointWriter::new(WriterOptions {
            root: root.to_path_buf(),
            asynchronous,
            retention,
        })
    }

    fn names(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn each_completed_write_comes_out_once_in_order_and_all_complete_at_finish() -> Result<()> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        let mut w = writer(dir.path(), true, None);
        assert_eq!(w.submit(snapshot(1))?, None);
        assert!(w.busy());
        // The second submit waits for the first: the first comes out here.
        let first = w.submit(snapshot(2))?;
        assert_eq!(first, Some(dir.path().join("step-00000001")));
        // It is complete and verified on disk when it is handed out.
        hsat_core::checkpoint::verify(&dir.path().join("step-00000001")).map_err(|source| {
            WorkerError::Checkpoint {
                dir: dir.path().into(),
                source,
            }
        })?;
        let second = w.finish()?;
        assert_eq!(second, Some(dir.path().join("step-00000002")));
        assert_eq!(w.finish()?, None, "handed out once");
        assert_eq!(read_meta(&dir.path().join("step-00000002"))?.step, 2);
        assert_eq!(names(dir.path()), ["step-00000001", "step-00000002"]);
        Ok(())
    }

    #[test]
    fn a_failed_background_write_surfaces_at_the_next_submit_and_its_snapshot_is_not_written()
    -> Result<()> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        // The root is a file: every write into it fails.
        let root = dir.path().join("blocked");
        fs::write(&root, b"not a directory").map_err(WorkerError::io("writing", &root))?;
        let mut w = writer(&root, true, None);
        assert_eq!(
            w.submit(snapshot(1))?,
            None,
            "submitting does not wait for the write"
        );
        let err = w.submit(snapshot(2)).unwrap_err();
        assert!(
            matches!(&err, WorkerError::Io { path, .. } if path.starts_with(&root)),
            "{err:?}"
        );
        assert!(!w.busy(), "the failing submit started nothing");
        assert_eq!(w.finish()?, None);

        // And at the end, when no submit follows.
        let mut w = writer(&root, true, None);
        w.submit(snapshot(3))?;
        assert!(matches!(w.finish(), Err(WorkerError::Io { .. })));
        Ok(())
    }

    #[test]
    fn synchronous_writes_complete_before_submit_returns() -> Result<()> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        let mut w = writer(dir.path(), false, None);
        assert_eq!(
            w.submit(snapshot(4))?,
            Some(dir.path().join("step-00000004"))
        );
        assert!(!w.busy());
        Ok(())
    }

    #[test]
    fn a_completed_write_reports_its_time_and_size_once() -> Result<()> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        let mut w = writer(dir.path(), true, None);
        assert_eq!(w.take_last_write(), None);
        w.submit(snapshot(2))?;
        let written = w.finish()?;
        let stats = w.take_last_write().expect("the finished write's stats");
        assert_eq!(Some(&stats.dir), written.as_ref());
        let on_disk: u64 = std::fs::read_dir(&stats.dir)
            .map_err(WorkerError::io("listing", &stats.dir))?
            .map(|e| {
                e.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .unwrap_or(0)
            })
            .sum();
        assert!(
            stats.bytes > 0 && stats.bytes == on_disk,
            "{stats:?} vs {on_disk}"
        );
        assert!(stats.seconds > 0.0, "{stats:?}");
        assert_eq!(w.take_last_write(), None);
        Ok(())
    }

    #[test]
    fn retention_keeps_the_newest_and_the_permanent_multiples() -> Result<()> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("creating", "tempdir"))?;
        let retention = Retention {
            keep_last: 2,
            keep_every: 3,
        };
        let mut w = writer(dir.path(), true, Some(retention));
        for step in 1..=7 {
            w.submit(snapshot(step))?;
        }
        w.finish()?;
        assert_eq!(
            names(dir.path()),
            ["step-00000003", "step-00000006", "step-00000007"]
        );
        Ok(())
    }
}
