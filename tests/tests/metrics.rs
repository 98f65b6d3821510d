//! The metrics of a running job, from the outside, as an operator's monitoring
//! sees them:
//!
//! - a job of separate processes (`hsat coordinator` and two `hsat worker`, each
//!   with `--metrics-listen 127.0.0.1:0`) is scraped while it runs; with the workers
//!   paused (SIGSTOP) so that nothing commits, the coordinator's committed steps and
//!   generation equal the ledger's; the names and types exposed by the coordinator
//!   and by a worker are exactly those of the README's tables; `promtool check
//!   metrics` accepts both expositions;
//! - a real Prometheus server (Debian's `prometheus` package) scrapes a local job
//!   (`hsat run --workers 2`, whose printed metrics addresses it is given) and,
//!   with the workers paused, answers a query for `hsat_committed_steps` with the
//!   ledger's count; the job is then stopped with SIGTERM.
//!
//! A missing `promtool` or `prometheus` fails these tests with what to install.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hsat_metrics::exposition::promtool_check;
use hsat_tests::metrics::{
    Prometheus, children_of, documented_metrics, metrics_address, sample_value, scrape, signal,
};
use hsat_tests::{
    Ledger, Sandbox, SandboxSpec, SmallJob, hsat_binary, synth_opensrh, write_small_job_config,
};

/// Steps of [`job`] with 30 epochs.
const TOTAL_STEPS: usize = 60;

/// Each scenario runs several processes; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job long enough to pause mid-way: 4 train patients, 2 per step (`epochs` x 2
/// steps); more PGD iterations make each step longer.
fn job(dir: &Path, epochs: usize, attack_iters: usize) -> std::path::PathBuf {
    let data = synth_opensrh(dir, 7, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 2,
            epochs,
            attack_iters,
        },
    )
}

/// Polls `find` until it gives a value, or panics after `limit` with `context()`.
fn wait_until<T>(
    limit: Duration,
    mut find: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = find() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_jobs_metrics_agree_with_the_ledger_and_the_documented_table() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), TOTAL_STEPS / 2, 2);
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 2)
            // Paused workers must keep their lease while the test looks.
            .coordinator_args(&["--metrics-listen", "127.0.0.1:0", "--lease-ms", "120000"])
            .worker_args(&["--metrics-listen", "127.0.0.1:0"]),
    );
    let coordinator = wait_until(
        Duration::from_secs(30),
        || metrics_address(&sandbox.coordinator_output(), "hsat coordinator"),
        || sandbox.logs(),
    );
    let workers: Vec<SocketAddr> = (0..2)
        .map(|k| {
            wait_until(
                Duration::from_secs(60),
                || metrics_address(&sandbox.worker_output(k), &format!("hsat worker w{k}")),
                || sandbox.logs(),
            )
        })
        .collect();
    sandbox.wait_for_commits(2, Duration::from_secs(120));
    let (running, _) = scrape(coordinator);
    assert_eq!(
        running.value("hsat_workers_alive", &[]),
        Some(2.0),
        "{}",
        sandbox.logs()
    );
    let total = running.value("hsat_total_steps", &[]).unwrap();
    assert_eq!(total, TOTAL_STEPS as f64);

    // Pause both workers: nothing commits until they continue (their own
    // endpoints pause with them: they are scraped after).
    let pids: Vec<u32> = (0..2).map(|k| sandbox.worker_pid(k)).collect();
    for &pid in &pids {
        signal(pid, "STOP");
    }
    // Reports already sent are committed, and the ticker (100 ms) has run.
    std::thread::sleep(Duration::from_millis(1500));
    let ledger = sandbox.ledger();
    let committed = ledger.committed();
    let (paused, coordinator_text) = scrape(coordinator);
    for &pid in &pids {
        signal(pid, "CONT");
    }
    let worker_scrapes: Vec<_> = workers.iter().map(|&w| scrape(w)).collect();
    let last = committed.values().next_back().unwrap();
    assert!(
        (committed.len() as f64) < total,
        "the job finished before it was paused; make it longer"
    );
    assert_eq!(
        paused.value("hsat_committed_steps", &[]),
        Some(committed.len() as f64),
        "{coordinator_text}"
    );
    assert_eq!(
        paused.value("hsat_generation", &[]),
        Some(last.generation as f64),
        "{coordinator_text}"
    );
    assert_eq!(
        paused.value("hsat_epoch", &[]),
        Some((committed.len() / 2) as f64)
    );
    assert_eq!(
        paused.value("hsat_job_state", &[("state", "training")]),
        Some(1.0)
    );
    assert_eq!(
        paused.value("hsat_step_duration_seconds_count", &[]),
        Some(committed.len() as f64)
    );
    let adversarial = paused
        .value("hsat_loss", &[("level", "total"), ("view", "adversarial")])
        .unwrap();
    let clean = paused
        .value("hsat_loss", &[("level", "patient"), ("view", "clean")])
        .unwrap();
    assert!(
        adversarial.is_finite() && clean.is_finite(),
        "{coordinator_text}"
    );
    assert!(paused.value("hsat_attack_gain", &[]).unwrap().is_finite());
    assert!(paused.value("hsat_learning_rate", &[]).unwrap() > 0.0);
    // Each worker trains a shard of every step: at least the committed ones.
    for (k, (scraped, text)) in worker_scrapes.iter().enumerate() {
        let steps = scraped.value("hsat_worker_steps_total", &[]).unwrap();
        assert!(
            steps >= committed.len() as f64,
            "w{k} trained {steps} steps, {} committed:\n{text}",
            committed.len()
        );
        assert!(scraped.value("hsat_worker_patches_total", &[]).unwrap() > 0.0);
        assert!(
            scraped
                .value("hsat_worker_attack_gain", &[])
                .unwrap()
                .is_finite()
        );
    }

    // The documented table is exactly what a live scrape exposes, types included.
    let documented = documented_metrics();
    let (doc_worker, doc_coordinator): (std::collections::BTreeMap<_, _>, _) = documented
        .into_iter()
        .partition(|(name, _)| name.starts_with("hsat_worker_"));
    assert_eq!(
        paused.families, doc_coordinator,
        "coordinator vs the README's metric tables"
    );
    assert_eq!(
        worker_scrapes[0].0.families, doc_worker,
        "worker vs the README's metric tables"
    );

    // promtool (Debian's `prometheus` package) accepts both expositions.
    for text in [&coordinator_text, &worker_scrapes[0].1] {
        let problems = promtool_check(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(problems, "", "promtool check metrics:\n{text}");
    }

    let end = sandbox.wait_for_end(Duration::from_secs(240));
    assert!(end.coordinator.success(), "{}", sandbox.logs());
    sandbox.assert_ledger_complete(&[2]);
}

/// `hsat run --workers N` with its output captured; its workers (and it) are
/// killed if the test fails, paused ones included.
struct LocalRun {
    child: Child,
    output: Arc<Mutex<String>>,
    paused: Vec<u32>,
}

impl LocalRun {
    fn start(config: &Path, workers: usize, sets: &[&str]) -> LocalRun {
        let mut command = Command::new(hsat_binary());
        command
            .args(["run", "--config", config.to_str().unwrap()])
            .args(["--workers", &workers.to_string()]);
        for set in sets {
            command.args(["--set", set]);
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut text = output.lock().unwrap_or_else(|p| p.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        LocalRun {
            child,
            output,
            paused: Vec::new(),
        }
    }

    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        for &pid in &self.paused {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_a_local_job_and_answers_the_committed_steps_of_the_ledger() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Far more steps than the test needs (it stops the job when done): however
    // slow Prometheus is to start and discover the targets, the job still runs.
    let config = job(dir.path(), 1000, 4);
    let out_dir = dir.path().join("run");
    // Prometheus first (it takes a moment to start), told the targets once the
    // job prints them.
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = Prometheus::start(&prometheus_dir);
    prometheus.wait_ready(Duration::from_secs(30));
    // Paused workers must keep their lease while Prometheus is asked.
    let mut run = LocalRun::start(&config, 2, &["cluster.lease_s=120"]);
    let coordinator = wait_until(
        Duration::from_secs(30),
        || metrics_address(&run.output(), "hsat: coordinator metrics"),
        || run.output(),
    );
    let workers: Vec<SocketAddr> = (0..2)
        .map(|k| {
            wait_until(
                Duration::from_secs(60),
                || metrics_address(&run.output(), &format!("hsat worker worker-{k}:")),
                || run.output(),
            )
        })
        .collect();
    let mut targets = vec![coordinator];
    targets.extend(&workers);
    prometheus.set_targets(&targets);
    // Every target is scraped successfully, the workers' series too...
    prometheus.wait_for("up", Duration::from_secs(60), |result| {
        result.len() == 3 && result.iter().all(|r| sample_value(r) == Some(1.0))
    });
    prometheus.wait_for(
        "hsat_worker_steps_total",
        Duration::from_secs(30),
        |result| result.len() == 2,
    );
    wait_until(
        Duration::from_secs(120),
        || {
            Ledger::read(&out_dir)
                .ok()
                .filter(|l| l.committed().len() >= 2)
        },
        || run.output(),
    );
    // Pause the workers so that nothing commits while Prometheus is asked.
    let pids = children_of(run.child.id());
    assert_eq!(pids.len(), 2, "the worker processes of hsat run: {pids:?}");
    for &pid in &pids {
        signal(pid, "STOP");
        run.paused.push(pid);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let committed = Ledger::read(&out_dir).unwrap().committed().len();
    assert!(committed < 2000, "the job finished before it was paused");
    // ...and the committed steps it stored are the ledger's.
    let answer = prometheus.wait_for("hsat_committed_steps", Duration::from_secs(30), |result| {
        result.len() == 1 && sample_value(&result[0]) == Some(committed as f64)
    });
    assert_eq!(
        answer[0]["metric"]["instance"].as_str(),
        Some(coordinator.to_string().as_str())
    );
    drop(prometheus);

    // Stop the job as an operator would (SIGTERM): it drains and exits with 75
    // (cancelled, resumable: retryable), its ledger intact up to where it stopped.
    for &pid in &pids {
        signal(pid, "CONT");
    }
    run.paused.clear();
    signal(run.child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = run.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "hsat run did not stop after SIGTERM:\n{}",
            run.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(75), "{}", run.output());
    let ledger = Ledger::read(&out_dir).unwrap();
    assert!(ledger.committed().len() >= committed, "{}", run.output());
    assert_eq!(ledger.end(), Some("cancelled"), "{}", run.output());
}
