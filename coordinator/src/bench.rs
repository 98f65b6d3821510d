//! The control-plane benchmark (`hsat bench control-plane`): N simulated workers (tokio tasks in this process, no
//! libtorch, each its own registered member: `hsat_coordinator::sim`, the worker
//! protocol with fake training) drive a coordinator running as a
//! separate `hsat-coordinator` process over real gRPC/TCP at a fixed step rate, with
//! heartbeats. Prints p50/p99 latency per RPC kind, the coordinator's CPU (% of one
//! core, from `/proc/<pid>/stat`) and, as a same-run reference, the latency of a
//! health check (a no-op RPC) on the same connections.
//!
//! Each worker count runs with authentication (job token and session tokens, the
//! default) and, in the same invocation, without (`--insecure`), so the cost of
//! authentication reads as ratios of the same run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hsat_core::config::{Config, ConfigError};
use hsat_core::dataset::DatasetError;
use hsat_proto::auth::{AuthError, Token, write_token_file};
use hsat_proto::client::CoordinatorClient;
use hsat_proto::domain::{AssignmentRequest, Registration, TrainAssignment, WorkerId};
use hsat_proto::{ApiError, HSAT_VERSION};

use crate::sim::{Rpc, SimContext, SimHooks, SimStep, run_simulated_worker};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Simulated worker counts to measure, one coordinator each.
    pub workers: Vec<usize>,
    /// Training steps per second the workers drive.
    pub rate: f64,
    /// Measured seconds per worker count (after start-up).
    pub seconds: f64,
    /// Fraction of the step period over which the workers' reports are spread
    /// (ranks finish at different times); 0 = all ranks report at the same instant.
    pub spread: f64,
    /// gRPC connections the simulated workers share (at least 1 is used).
    pub channels: usize,
    /// Heartbeat interval in ms.
    pub heartbeat_ms: u64,
    /// The `hsat-coordinator` binary to run.
    pub coordinator: PathBuf,
    /// For each worker count, a run per entry: `true` with authentication, `false`
    /// without (`--insecure`).
    pub auth_modes: Vec<bool>,
}

/// Latency of one kind of RPC over the measured window.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcLatency {
    /// `Heartbeat`, `NextAssignment`, `ReportStep` or `health Check (ref)`.
    pub name: &'static str,
    /// Median in ms (NaN without calls).
    pub p50_ms: f64,
    /// 99th percentile in ms (NaN without calls).
    pub p99_ms: f64,
    /// Calls measured.
    pub calls: usize,
}

/// The result for one worker count.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlPlaneRun {
    /// Simulated workers.
    pub workers: usize,
    /// Calls carried the job token and session tokens (else `--insecure`).
    pub authenticated: bool,
    /// The first simulated worker's failure, if one failed.
    pub failure: Option<String>,
    /// Simulated workers that stopped before the end of the window.
    pub stopped_early: usize,
    /// Per RPC kind, in the order printed.
    pub rpcs: Vec<RpcLatency>,
    /// The coordinator process's CPU over the window, % of one core.
    pub coordinator_cpu_percent: f64,
    /// Steps the coordinator committed in all.
    pub committed_steps: u64,
    /// The coordinator's step rate over its last commits.
    pub steps_per_second: f64,
    /// `NextAssignment` calls answered Wait inside the window.
    pub waits: usize,
    /// 99th percentile of registration latency, ms.
    pub register_p99_ms: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// No coordinator binary at the path.
    #[error(
        "no coordinator binary at {}: build it with `cargo build --release -p hsat-coordinator` or pass --coordinator",
        path.display()
    )]
    NoCoordinator {
        /// The path tried.
        path: PathBuf,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The job token could not be made or written.
    #[error(transparent)]
    Token(#[from] AuthError),
    /// The temporary dataset or config could not be written.
    #[error(
        "cannot write the benchmark's dataset under the temporary folder (check free space in $TMPDIR)"
    )]
    Scratch(#[source] std::io::Error),
    /// The generated config was rejected.
    #[error("the benchmark's config is invalid")]
    Config(#[from] ConfigError),
    /// The generated dataset could not be indexed.
    #[error("cannot index the benchmark's dataset")]
    Dataset(#[from] DatasetError),
    /// The coordinator process could not be started.
    #[error("cannot start {}", binary.display())]
    Start {
        /// The binary.
        binary: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The coordinator did not print its address.
    #[error(
        "unexpected first line from the coordinator: {0:?} (run it by hand to see why it stopped)"
    )]
    CoordinatorOutput(String),
    /// The coordinator's CPU time could not be read.
    #[error("cannot read the coordinator's CPU time from /proc/{pid}/stat")]
    Cpu {
        /// The coordinator's process id.
        pid: u32,
    },
    /// An RPC of the benchmark itself failed.
    #[error("an RPC to the coordinator failed")]
    Rpc(#[from] ApiError),
}

#[derive(Default)]
struct Samples {
    register: Vec<f64>,
    heartbeat: Vec<f64>,
    assignment: Vec<f64>,
    report: Vec<f64>,
    health: Vec<f64>,
    waits: usize,
}

/// What the benchmark reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlPlaneEvent {
    /// The coordinator binary is there; the first worker count starts.
    Started,
    /// One worker count's result, as soon as it is measured.
    Run(ControlPlaneRun),
}

/// Runs the benchmark for each worker count, one fresh coordinator process each.
pub fn control_plane(
    options: &ControlPlaneOptions,
    mut on_event: impl FnMut(&ControlPlaneEvent),
) -> Result<(), ControlPlaneError> {
    if !options.coordinator.exists() {
        return Err(ControlPlaneError::NoCoordinator {
            path: options.coordinator.clone(),
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ControlPlaneError::Runtime)?;
    on_event(&ControlPlaneEvent::Started);
    for &workers in &options.workers {
        for &auth in &options.auth_modes {
            let run = runtime.block_on(one_run(options, workers, auth))?;
            on_event(&ControlPlaneEvent::Run(run));
        }
    }
    Ok(())
}

fn write_dataset(dir: &Path, patients: usize) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("tiles"))?;
    let mut csv = String::from("patient,slide,path,label,split\n");
    for p in 0..patients {
        let path = format!("tiles/p{p}.png");
        std::fs::write(dir.join(&path), b"")?;
        csv.push_str(&format!("P{p:05},S0,{path},{},train\n", ["a", "b"][p % 2]));
    }
    let manifest = dir.join("manifest.csv");
    std::fs::write(&manifest, csv)?;
    Ok(manifest)
}

struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, ControlPlaneError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| ControlPlaneError::Cpu { pid })?;
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or(&stat);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; after the ")" they are at 11 and 12 (0-based).
    let field = |k: usize| {
        fields
            .get(k)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or(ControlPlaneError::Cpu { pid })
    };
    Ok((field(11)? + field(12)?) / 100.0) // USER_HZ is 100 on Linux
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

async fn one_run(
    args: &ControlPlaneOptions,
    workers: usize,
    auth: bool,
) -> Result<ControlPlaneRun, ControlPlaneError> {
    let binary = &args.coordinator;
    let dir = tempfile::tempdir().map_err(ControlPlaneError::Scratch)?;
    let patients = workers * 2;
    let manifest = write_dataset(dir.path(), patients).map_err(ControlPlaneError::Scratch)?;
    let steps = ((args.seconds + 30.0) * args.rate) as usize + 10;
    // batch = workers: one patient per rank; two steps per epoch.
    let config_text = format!(
        "[infra]\nout_dir = {:?}\n[data]\nsource = \"manifest\"\nmanifest = {:?}\n\
         balance_study_per_class = false\n[data.hidisc]\nnum_slide_samples = 1\nnum_patch_samples = 1\n\
         [training]\nbatch_size = {workers}\nnum_epochs = {}\nsave_checkpoint_interval = 0\n",
        dir.path().join("out").display().to_string(),
        manifest.display().to_string(),
        steps / 2 + 1
    );
    let config_path = dir.path().join("job.toml");
    std::fs::write(&config_path, &config_text).map_err(ControlPlaneError::Scratch)?;
    let config = Config::from_toml_str(&config_text)?;
    let fingerprint = hsat_core::dataset::DatasetIndex::load(&config.data)?.fingerprint;
    let token = if auth {
        let token = Token::generate()?;
        write_token_file(&dir.path().join("token"), &token)?;
        Some(token)
    } else {
        None
    };
    let mut command = Command::new(binary);
    match &token {
        Some(_) => command.arg("--token-file").arg(dir.path().join("token")),
        None => command.arg("--insecure"),
    };
    let mut child = command
        .args(["--config"])
        .arg(&config_path)
        .args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
        .args(["--heartbeat-ms", &args.heartbeat_ms.to_string()])
        .args(["--lease-ms", &(args.heartbeat_ms * 10).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| ControlPlaneError::Start {
            binary: binary.clone(),
            source,
        })?;
    let Some(stdout) = child.stdout.take() else {
        return Err(ControlPlaneError::CoordinatorOutput(String::new()));
    };
    let pid = child.id();
    let coordinator = Coordinator(child);
    let mut line = String::new();
    // An unreadable stdout reads as an empty first line: the error below says so.
    let _ = BufReader::new(stdout).read_line(&mut line);
    let address = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|a| a.contains(':'))
        .ok_or_else(|| ControlPlaneError::CoordinatorOutput(line.clone()))?
        .to_owned();
    let mut clients = Vec::new();
    for _ in 0..args.channels.max(1) {
        clients.push(
            CoordinatorClient::connect(&address)
                .await?
                .with_token(token.as_ref()),
        );
    }
    let samples = Arc::new(Mutex::new(Samples::default()));
    let t0: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    // Two barriers: everyone holds its first steps; then the start time is set.
    let ready = Arc::new((
        tokio::sync::Barrier::new(workers + 1),
        tokio::sync::Barrier::new(workers + 1),
    ));
    let measure_from = Arc::new(OnceLock::<Instant>::new());
    let measure_until = Arc::new(OnceLock::<Instant>::new());
    let mut tasks = Vec::new();
    for i in 0..workers {
        let client = clients[i % clients.len()].clone();
        let registration = Registration {
            worker_name: format!("sim{i}"),
            config: config.to_json_value(),
            dataset_fingerprint: fingerprint.clone(),
            advertise_host: "127.0.0.1".into(),
            hsat_version: HSAT_VERSION.into(),
        };
        let (samples, t0, ready, from, until) = (
            Arc::clone(&samples),
            Arc::clone(&t0),
            Arc::clone(&ready),
            Arc::clone(&measure_from),
            Arc::clone(&measure_until),
        );
        let rate = args.rate;
        // A fixed, evenly spread offset per worker (no randomness: runs repeat).
        let offset = args.spread.clamp(0.0, 0.95) * (i as f64 * 0.618_033_988_7).fract();
        let hooks = Arc::new(PacedHooks {
            period: Duration::from_secs_f64(1.0 / rate),
            offset,
            samples,
            t0,
            ready,
            started: std::sync::atomic::AtomicBool::new(false),
            from,
            until,
        });
        tasks.push(tokio::spawn(run_simulated_worker(
            client,
            registration,
            hooks,
        )));
    }
    ready.0.wait().await;
    let _ = t0.set(Instant::now());
    ready.1.wait().await;
    // Two seconds of warm-up, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = Instant::now();
    let until = from + Duration::from_secs_f64(args.seconds);
    let _ = measure_from.set(from);
    let _ = measure_until.set(until);
    let cpu_before = cpu_seconds(pid)?;
    // The same-run reference: a no-op RPC (health check) at 100/s on the shared connections.
    let mut k = 0;
    while Instant::now() < until {
        let client = &clients[k % clients.len()];
        let begun = Instant::now();
        client.serving().await?;
        lock(&samples)
            .health
            .push(begun.elapsed().as_secs_f64() * 1e3);
        k += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = (cpu_seconds(pid)? - cpu_before) / from.elapsed().as_secs_f64() * 100.0;
    let status = clients[0].status().await?;
    let mut failed = 0;
    for task in &tasks {
        if task.is_finished() {
            failed += 1;
        }
        task.abort();
    }
    let mut failure = None;
    for task in tasks {
        if let Ok(Err(err)) = task.await {
            failure = Some(err.to_string());
            break;
        }
    }
    drop(coordinator);
    let mut s = std::mem::take(&mut *lock(&samples));
    let mut rpcs = Vec::new();
    for (name, values) in [
        ("Heartbeat", &mut s.heartbeat),
        ("NextAssignment", &mut s.assignment),
        ("ReportStep", &mut s.report),
        ("health Check (ref)", &mut s.health),
    ] {
        rpcs.push(RpcLatency {
            name,
            calls: values.len(),
            p50_ms: percentile(values, 0.5),
            p99_ms: percentile(values, 0.99),
        });
    }
    Ok(ControlPlaneRun {
        workers,
        authenticated: auth,
        failure,
        stopped_early: failed,
        rpcs,
        coordinator_cpu_percent: cpu,
        committed_steps: status.step,
        steps_per_second: status.steps_per_second,
        waits: s.waits,
        register_p99_ms: percentile(&mut s.register, 0.99),
    })
}

/// The samples, also after a simulated worker panicked while holding them (they
/// are plain numbers: a half-pushed sample cannot exist).
fn lock(samples: &Mutex<Samples>) -> std::sync::MutexGuard<'_, Samples> {
    samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The benchmark's simulation: each step "trains" until its tick (`t0 + period x
/// (step + 1 + offset)`), requests go out once every rank reported, and successful
/// calls inside the measured window are recorded.
struct PacedHooks {
    period: Duration,
    /// This worker's fixed share of a period by which its reports lag the tick.
    offset: f64,
    samples: Arc<Mutex<Samples>>,
    t0: Arc<OnceLock<Instant>>,
    ready: Arc<(tokio::sync::Barrier, tokio::sync::Barrier)>,
    /// Whether this worker passed the start barriers.
    started: std::sync::atomic::AtomicBool,
    from: Arc<OnceLock<Instant>>,
    until: Arc<OnceLock<Instant>>,
}

impl PacedHooks {
    fn measuring(&self, now: Instant) -> bool {
        self.from.get().is_some_and(|f| now >= *f) && self.until.get().is_some_and(|u| now < *u)
    }

    fn at(&self, t0: Instant, periods: f64) -> tokio::time::Instant {
        (t0 + self.period.mul_f64(periods)).into()
    }
}

impl SimHooks for PacedHooks {
    async fn train(&self, _context: SimContext<'_>, step: &TrainAssignment) -> SimStep {
        use std::sync::atomic::Ordering;
        // Everyone holds its first steps before the clock starts.
        if !self.started.swap(true, Ordering::SeqCst) {
            self.ready.0.wait().await;
            self.ready.1.wait().await;
        }
        let Some(&t0) = self.t0.get() else {
            return SimStep::CollectiveFailed("no start time".into());
        };
        // "Train" until the step's tick, then report.
        tokio::time::sleep_until(self.at(t0, step.step as f64 + 1.0 + self.offset)).await;
        SimStep::Trained
    }

    async fn before_ask(&self, request: &AssignmentRequest) {
        // After every rank reported the last step (the latest at 0.95 x 0.8 of a
        // period), so the window admits the step asked for and the call measures the
        // RPC, not the wait.
        let (Some(&t0), Some(reported)) = (self.t0.get(), request.next_step.checked_sub(1)) else {
            return;
        };
        let ask_at = reported as f64 + 1.77 + 0.22 * (self.offset / 0.76).min(1.0);
        tokio::time::sleep_until(self.at(t0, ask_at)).await;
    }

    fn observe(&self, rpc: Rpc, begun: Instant) {
        let measuring = self.measuring(begun);
        let Ok(mut s) = self.samples.lock() else {
            return;
        };
        let elapsed_ms = begun.elapsed().as_secs_f64() * 1e3;
        match rpc {
            Rpc::Register => s.register.push(elapsed_ms),
            Rpc::Heartbeat if measuring => s.heartbeat.push(elapsed_ms),
            Rpc::Ask { waited } if measuring => {
                s.assignment.push(elapsed_ms);
                s.waits += usize::from(waited);
            }
            Rpc::Report if measuring => s.report.push(elapsed_ms),
            _ => {}
        }
    }

    fn first_heartbeat(&self, worker: WorkerId, period: Duration) -> Duration {
        // Spread the heartbeats over the period.
        period.mul_f64((worker.0 % 97) as f64 / 97.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_coordinator_binary_is_named_before_anything_runs() {
        let options = ControlPlaneOptions {
            workers: vec![4],
            rate: 10.0,
            seconds: 1.0,
            spread: 0.8,
            channels: 1,
            heartbeat_ms: 1000,
            coordinator: PathBuf::from("/nonexistent/hsat-coordinator"),
            auth_modes: vec![true, false],
        };
        let mut events = 0;
        let err = control_plane(&options, |_| events += 1).unwrap_err();
        match err {
            ControlPlaneError::NoCoordinator { path } => {
                assert_eq!(path, Path::new("/nonexistent/hsat-coordinator"));
            }
            other => panic!("expected NoCoordinator, got {other:?}"),
        }
        assert_eq!(events, 0);
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut values, 0.5), 51.0);
        assert_eq!(percentile(&mut values, 0.99), 99.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
