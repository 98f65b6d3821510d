//! One coordinator per job: an exclusive lock on `<out_dir>/coordinator/lock`,
//! taken before the ledger is opened and held for the life of the process.
//!
//! Why: Kubernetes (a `Job` with `podReplacementPolicy: Failed`) already starts a
//! replacement coordinator only once the old pod is gone, but a node that drops
//! out of the cluster, a hand-started coordinator or a second `hsat run --workers`
//! on the same `out_dir` could still make two processes append to one ledger. The
//! lock is the belt to that pair of braces.
//!
//! The lock is the operating system's (`flock(2)` through
//! [`std::fs::File::try_lock`]): it goes with the process, whatever kills it
//! (`kill -9`, OOM), so a crashed coordinator never leaves a stale lock behind. The
//! holder writes its pid, host name and start time into the file, for the log of
//! the one that waits. A coordinator that finds the lock held polls it for up to
//! `cluster.lock_wait_s` (logging who holds it), then gives up with
//! [`CoordinatorError::LockHeld`] (exit 75, retryable).
//!
//! On a network file system the lock is as good as the file system's own locking
//! (NFSv4 supports it; Linux maps `flock` to a whole-file lease there).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::CoordinatorError;

/// The lock file's name under `<out_dir>/coordinator/`.
pub const LOCK_FILE: &str = "lock";

/// How often a waiting coordinator tries the lock again.
const POLL: Duration = Duration::from_millis(200);

/// How often a waiting coordinator says again that it waits.
const REPEAT_LOG: Duration = Duration::from_secs(15);

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct InstanceLock {
    /// Kept open: the lock lives as long as this descriptor.
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the lock of the job in `coordinator_dir` (`<out_dir>/coordinator`),
/// waiting up to `wait` while another process holds it. Blocking (it sleeps
/// between attempts): call it before the async runtime starts, or from a blocking
/// task.
pub fn acquire(coordinator_dir: &Path, wait: Duration) -> Result<InstanceLock, CoordinatorError> {
    let path = coordinator_dir.join(LOCK_FILE);
    let io = |source: std::io::Error| CoordinatorError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(coordinator_dir).map_err(io)?;
    // Not truncated on open: the holder's note stays readable until we hold it.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::Error(source)) => return Err(io(source)),
            Err(TryLockError::WouldBlock) => {
                let holder = holder_of(&path);
                let waited = started.elapsed();
                if waited >= wait {
                    return Err(CoordinatorError::LockHeld {
                        path,
                        holder,
                        waited,
                    });
                }
                if last_log.is_none_or(|at| at.elapsed() >= REPEAT_LOG) {
                    last_log = Some(Instant::now());
                    tracing::warn!(
                        lock = %path.display(),
                        %holder,
                        waited_s = waited.as_secs_f64().round(),
                        wait_s = wait.as_secs_f64(),
                        "another coordinator holds this job's lock: waiting for it to exit \
                         (cluster.lock_wait_s); two coordinators must never write one ledger"
                    );
                }
                std::thread::sleep(
                    POLL.min(wait.saturating_sub(waited))
                        .max(Duration::from_millis(1)),
                );
            }
        }
    }
    // Ours now: replace the previous holder's note with ours.
    let note = format!(
        "pid={}\nhost={}\nstarted_unix_s={}\n",
        std::process::id(),
        host_name(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    file.set_len(0).map_err(io)?;
    file.write_all(note.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    if started.elapsed() >= POLL {
        tracing::info!(
            lock = %path.display(),
            waited_s = started.elapsed().as_secs_f64(),
            "took over this job's lock: the previous coordinator has exited"
        );
    }
    Ok(InstanceLock { _file: file, path })
}

/// `pid 123 on host-a since 1700000000 (unix s)` from the holder's note, or a
/// placeholder when it has not written one (yet).
fn holder_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    match (field("pid"), field("host"), field("started_unix_s")) {
        (Some(pid), Some(host), Some(since)) => {
            format!("pid {pid} on {host} since {since} (unix s)")
        }
        (Some(pid), host, _) => format!(
            "pid {pid} on {}",
            host.unwrap_or_else(|| "an unknown host".into())
        ),
        _ => "a process that has not written its pid yet".to_owned(),
    }
}

/// This machine's (or pod's) host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_job_waits_then_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path(), Duration::ZERO).unwrap();
        let note = std::fs::read_to_string(held.path()).unwrap();
        assert!(
            note.contains(&format!("pid={}", std::process::id())),
            "{note}"
        );
        let started = Instant::now();
        let err = acquire(dir.path(), Duration::from_millis(600)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(600));
        match &err {
            CoordinatorError::LockHeld { holder, .. } => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            hsat_core::exit::ExitClass::exit(&err),
            hsat_core::exit::Exit::Retryable
        );
        // Released with its holder: the next one takes it at once.
        drop(held);
        let again = acquire(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(again.path(), dir.path().join(LOCK_FILE));
    }
}
