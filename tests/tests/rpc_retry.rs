//! A worker carries on through a coordinator outage: a real coordinator process and
//! a real `hsat worker` talk through a [`FaultProxy`], which is cut (connections
//! closed, new ones refused) for a few seconds after the first committed step.
//!
//! - With the default retry deadline the worker retries (and logs it), the job
//!   completes and the ledger holds every step once.
//! - With a retry deadline shorter than the outage the worker exits non-zero,
//!   saying it gave up after retrying, and what it was trying to do.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hsat_tests::proxy::FaultProxy;
use hsat_tests::{hsat_binary, synth_dataset};

/// Both scenarios start processes; one at a time keeps timings honest.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 2 classes x 3 patients (4 train patients), 2 slides x 3 patches of 32 px; batch
/// 2: 2 steps per epoch, `epochs` epochs of small_cnn with a 1-step attack.
fn job(dir: &Path, epochs: usize) -> PathBuf {
    let data = dir.join("data");
    synth_dataset(
        &data,
        &[
            "--format",
            "opensrh",
            "--classes",
            "2",
            "--patients-per-class",
            "3",
            "--slides",
            "2",
            "--patches",
            "3",
            "--size",
            "32",
            "--seed",
            "3",
        ],
    );
    let text = format!(
        r#"
[infra]
seed = 11
out_dir = "{out}"
threads = 1
[data]
source = "opensrh"
db_root = "{data}"
image_size = 32
[data.loader]
threads = 1
[data.hidisc]
num_slide_samples = 2
num_patch_samples = 2
num_transforms = 2
[model]
backbone = "small_cnn"
num_embedding_out = 8
[training]
batch_size = 2
num_epochs = {epochs}
only_adv = true
save_checkpoint_interval = 0
[training.attack]
name = "pgd"
iters = 1
"#,
        out = dir.join("run").display(),
        data = data.display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A child process whose stderr is collected on a thread (it never blocks on a
/// full pipe); killed when dropped.
struct Process {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    fn spawn(mut command: Command) -> (Self, Option<std::process::ChildStdout>) {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let stdout = child.stdout.take();
        (Self { child, stderr }, stdout)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit, at most `limit`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator process for one worker, on an OS-chosen port.
fn coordinator(config: &Path) -> (Process, SocketAddr) {
    let mut command = Command::new(hsat_binary());
    command
        .args(["coordinator", "--config", config.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .stdout(Stdio::piped());
    let (process, stdout) = Process::spawn(command);
    let mut lines = BufReader::new(stdout.unwrap()).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the coordinator printed its address")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (process, address)
}

fn worker(proxy: &FaultProxy, config: &Path, extra: &[&str]) -> Process {
    let mut command = Command::new(hsat_binary());
    command
        .args(["worker", "--coordinator", &proxy.address().to_string()])
        .args(["--config", config.to_str().unwrap(), "--name", "w0"])
        .args(["--connect-timeout", "20"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    Process::spawn(command).0
}

/// The steps of the ledger's commit records, in file order.
fn committed_steps(run_dir: &Path) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string(run_dir.join("coordinator/ledger.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record.get("ranks").is_some())
        .filter_map(|record| record["step"].as_u64())
        .collect()
}

/// Waits until the ledger holds a committed step (the worker is mid-job).
fn wait_for_first_commit(run_dir: &Path, worker: &Process) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_steps(run_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no step committed within 60 s; worker log:\n{}",
            worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_worker_retries_through_a_coordinator_outage_and_the_job_completes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let epochs = 10;
    let config = job(dir.path(), epochs);
    let (_coordinator, address) = coordinator(&config);
    let proxy = FaultProxy::start(address).unwrap();
    let mut worker = worker(&proxy, &config, &[]);
    let run_dir = dir.path().join("run");
    wait_for_first_commit(&run_dir, &worker);
    let before = committed_steps(&run_dir).len();
    proxy.cut();
    std::thread::sleep(Duration::from_secs(3));
    let during = committed_steps(&run_dir).len();
    proxy.restore();
    let status = worker.wait(Duration::from_secs(120));
    let log = worker.stderr();
    assert!(
        status.is_some_and(|s| s.success()),
        "the worker finished the job ({status:?}):\n{log}"
    );
    let total = 2 * epochs as u64;
    assert!(
        (before as u64) < total && (during as u64) < total,
        "the outage fell mid-job: {before} then {during} of {total} steps committed"
    );
    assert!(
        log.contains("retrying a coordinator call"),
        "the worker logged its retries:\n{log}"
    );
    // What the outage looked like from the worker (shown with --nocapture).
    for line in log
        .lines()
        .filter(|l| l.contains("retrying a coordinator call"))
    {
        eprintln!("{line}");
    }
    assert!(
        proxy.accepted() >= 2,
        "the worker reconnected after the cut ({} connections)",
        proxy.accepted()
    );
    assert_eq!(
        committed_steps(&run_dir),
        (0..total).collect::<Vec<_>>(),
        "every step committed once, in order"
    );
}

#[test]
fn a_worker_gives_up_when_the_outage_outlasts_its_retry_deadline() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), 10);
    let (_coordinator, address) = coordinator(&config);
    let proxy = FaultProxy::start(address).unwrap();
    let mut worker = worker(&proxy, &config, &["--rpc-retry-deadline", "1"]);
    let run_dir = dir.path().join("run");
    wait_for_first_commit(&run_dir, &worker);
    proxy.cut();
    // Never restored: the worker must give up on its own, well before its lease.
    let status = worker.wait(Duration::from_secs(30));
    let log = worker.stderr();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the worker exited with an error ({status:?}):\n{log}"
    );
    let error = log
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("the worker printed its error:\n{log}"));
    assert!(
        error.contains("gave up after retrying for ")
            && error.contains("coordinator unavailable")
            && (error.contains("cannot ask the coordinator for work")
                || error.contains("cannot report a step")),
        "the error names the call, the retries and the cause: {error}"
    );
    eprintln!("{error}");
    assert!(
        log.contains("retrying a coordinator call"),
        "it retried before giving up:\n{log}"
    );
}
