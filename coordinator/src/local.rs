//! A whole job on one machine (`hsat run --workers N`): the coordinator in this
//! process on a loopback port and N worker processes (`<program> worker ...`) that
//! it supervises. It needs no libtorch: the workers are other processes.
//!
//! Why the supervision: a coordinator alone would wait for workers forever; here
//! every worker is ours, so when all of them have failed nothing can finish and the
//! job is stopped instead of hanging.
//!
//! Authentication needs nothing from the user: each run draws a new job token,
//! writes it to `<out_dir>/coordinator/token` (mode 0600) and starts its workers
//! with `--token-file` pointing there (a flag wins over any `HSAT_TOKEN` the
//! environment holds).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hsat_core::config::{self, Config, ConfigError, ConfigSources};
use hsat_proto::auth::{Token, write_token_file};
use tokio::net::TcpListener;

use crate::durable::{self, JobStart, StartMode};
use crate::{ClusterSettings, CoordinatorError, JobOutcome, OutcomeKind, load_job, serve_job_with};

/// The job token file of a local job, under `<out_dir>/coordinator/`.
pub const TOKEN_FILE: &str = "token";

/// What to run.
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    /// The executable whose `worker` subcommand runs one worker (`hsat`).
    pub worker_program: PathBuf,
    /// The job's config. The workers get the same file and overrides and inherit
    /// this process's environment, so `env` should be this process's `HSAT__...`
    /// variables ([`ConfigSources::from_process_env`]) for both sides to agree.
    pub sources: ConfigSources,
    /// Worker processes to start (at least 1); the coordinator expects this many
    /// whatever `cluster.workers` says. The other membership settings come from the
    /// config's `[cluster]` section.
    pub workers: usize,
    /// What to do with a job already in `infra.out_dir` (`--resume`, `--new-job`).
    pub start_mode: StartMode,
    /// Serve without authentication (`hsat run --insecure`).
    pub insecure: bool,
    /// GPUs of this machine (0: none, or a CPU build): worker `i` trains on
    /// `cuda:(i mod gpus)` ([`local_worker_device`]).
    pub gpus: usize,
}

/// The `--device` of local worker `index` on a machine with `gpus` GPUs:
/// `cuda:(index mod gpus)`, so N workers spread over the GPUs round-robin (more
/// workers than GPUs share them); `None` without GPUs (the worker's own `auto`
/// then picks the CPU).
pub fn local_worker_device(index: usize, gpus: usize) -> Option<String> {
    (gpus > 0).then(|| format!("cuda:{}", index % gpus))
}

/// What happens while a local job runs, in order.
#[derive(Debug)]
pub enum LocalEvent<'a> {
    /// The job is loaded; the workers are about to start.
    Starting {
        /// The job's config.
        config: &'a Config,
        /// Worker processes.
        workers: usize,
        /// Steps of the job.
        total_steps: u64,
    },
    /// The coordinator serves its metrics (`hsat run --workers` always does, on
    /// loopback); each worker prints its own address when it starts.
    Metrics {
        /// `http://127.0.0.1:PORT/metrics`.
        url: &'a str,
    },
    /// A worker process exited with a failure while the job ran (or at its end).
    WorkerFailed {
        /// `worker-<k>`.
        name: &'a str,
        /// Its exit status.
        status: ExitStatus,
    },
    /// Every worker process failed: the job is being stopped.
    AllWorkersFailed,
    /// A worker did not exit within the grace period after the job ended and was
    /// killed.
    WorkerKilled {
        /// `worker-<k>`.
        name: &'a str,
    },
}

/// Why a local job could not run.
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    /// No workers asked for.
    #[error("--workers must be at least 1")]
    NoWorkers,
    /// The config could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The job could not be loaded or its coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// No loopback port for the coordinator.
    #[error("cannot open a local port for the coordinator")]
    Listen(#[source] std::io::Error),
    /// The job token could not be made or written.
    #[error(transparent)]
    Token(#[from] hsat_proto::auth::AuthError),
    /// A worker process could not be started.
    #[error("cannot start {name} ({}); check that the hsat executable is still there", program.display())]
    Spawn {
        /// `worker-<k>`.
        name: String,
        /// The executable.
        program: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Runs a job with the coordinator in this process and `options.workers` worker
/// processes until it finishes, fails, every worker has failed, or `shutdown`
/// resolves. The job's outcome (finished, failed or cancelled) is returned, not an
/// error: the caller reports it. A job in `infra.out_dir` is resumed (or refused,
/// see [`durable`]); one that already finished starts no worker and returns
/// `Finished` with `already_finished` at once, its ledger untouched.
pub fn run_local(
    options: LocalClusterOptions,
    shutdown: impl Future<Output = ()> + Send,
    mut on_event: impl FnMut(LocalEvent<'_>),
) -> Result<JobOutcome, LocalClusterError> {
    if options.workers == 0 {
        return Err(LocalClusterError::NoWorkers);
    }
    let cfg = config::load(&options.sources)?;
    // One coordinator per job, as `hsat coordinator` (held until the job ends).
    let _lock = crate::lock::acquire(
        &cfg.infra.out_dir.join("coordinator"),
        cfg.cluster.lock_wait,
    )?;
    let mut settings = ClusterSettings::from_config(&cfg.cluster);
    settings.expected_workers = options.workers;
    settings.validate().map_err(CoordinatorError::Settings)?;
    let job = load_job(cfg.clone())?;
    let start = durable::prepare(&job, options.start_mode)?;
    if let JobStart::Finished { header, state } = &start {
        return Ok(JobOutcome {
            kind: OutcomeKind::Finished,
            committed_steps: state.committed,
            total_steps: job.plan.total_steps,
            last_checkpoint: state.checkpoints.values().next_back().cloned(),
            ledger: job.coordinator_dir().join(crate::ledger::LEDGER_FILE),
            job_id: header.job_id.clone(),
            already_finished: true,
        });
    }
    on_event(LocalEvent::Starting {
        config: &cfg,
        workers: options.workers,
        total_steps: job.plan.total_steps,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(LocalClusterError::Runtime)?;
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .map_err(LocalClusterError::Listen)?;
    let address = format!(
        "http://{}",
        listener.local_addr().map_err(LocalClusterError::Listen)?
    );
    // Metrics on loopback: at `metrics.listen` when set, else on a free port.
    let metrics = std::sync::Arc::new(crate::metrics::CoordinatorMetrics::new());
    let metrics_address = cfg
        .metrics
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let endpoint = runtime.block_on(crate::cli::serve_metrics(metrics_address, &metrics, None))?;
    on_event(LocalEvent::Metrics {
        url: &endpoint.url(),
    });
    let token_file = if options.insecure {
        crate::cli::warn_insecure(&address);
        None
    } else {
        let token = Token::generate()?;
        let path = job.coordinator_dir().join(TOKEN_FILE);
        write_token_file(&path, &token)?;
        Some((token, path))
    };
    let mut server =
        crate::cli::server_options(&cfg, token_file.as_ref().map(|(t, _)| t.clone()), &metrics)?;
    // Loopback only: the workers connect over plain HTTP/2 whatever `[security]`
    // says about TLS.
    server.tls = None;
    let token_path = token_file.map(|(_, path)| path);
    let mut children = LocalWorkers::spawn(&options, &address, &cfg, token_path.as_deref())?;
    let grace = settings.shutdown_grace;
    let workers = options.workers;
    let (crashed_tx, crashed_rx) = tokio::sync::oneshot::channel::<()>();
    let outcome = runtime.block_on(async {
        let server = serve_job_with(job, start, settings, server, listener, metrics, async {
            tokio::select! {
                () = shutdown => {}
                _ = crashed_rx => {}
            }
        });
        tokio::pin!(server);
        let mut crashed_tx = Some(crashed_tx);
        let mut alive = workers;
        let mut ticker = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                outcome = &mut server => break outcome,
                _ = ticker.tick() => {
                    for (name, status) in children.failed() {
                        on_event(LocalEvent::WorkerFailed { name: &name, status });
                        alive -= 1;
                    }
                    // Without any worker left nothing can finish: stop instead of waiting.
                    if alive == 0
                        && let Some(tx) = crashed_tx.take()
                    {
                        on_event(LocalEvent::AllWorkersFailed);
                        let _ = tx.send(());
                    }
                }
            }
        }
    })?;
    children.finish(grace, &mut on_event);
    Ok(outcome)
}

/// Worker processes of a local job.
struct LocalWorkers {
    /// `(name, process, failure already reported)`.
    children: Vec<(String, Child, bool)>,
}

impl LocalWorkers {
    /// Starts the worker processes against `address`, with the job's config file
    /// and overrides; cores are split between them.
    fn spawn(
        options: &LocalClusterOptions,
        address: &str,
        cfg: &Config,
        token_file: Option<&Path>,
    ) -> Result<Self, LocalClusterError> {
        let cores = hsat_core::config::available_cores();
        let count = options.workers;
        let mut children = Vec::with_capacity(count);
        for k in 0..count {
            let name = format!("worker-{k}");
            let mut command = worker_command(
                &options.worker_program,
                address,
                &name,
                &options.sources,
                cfg,
                (cores / count).max(1),
            );
            if let Some(path) = token_file {
                command.arg("--token-file").arg(path);
            }
            if let Some(device) = local_worker_device(k, options.gpus) {
                tracing::info!(worker = %name, %device, gpus = options.gpus, "local worker device");
                command.arg("--device").arg(device);
            }
            let child = command.spawn().map_err(|source| LocalClusterError::Spawn {
                name: name.clone(),
                program: options.worker_program.clone(),
                source,
            })?;
            children.push((name, child, false));
        }
        Ok(LocalWorkers { children })
    }

    /// Workers that exited with a failure since the last call, with their status.
    fn failed(&mut self) -> Vec<(String, ExitStatus)> {
        let mut failed = Vec::new();
        for (name, child, reported) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait()
                && !status.success()
                && !*reported
            {
                failed.push((name.clone(), status));
                *reported = true;
            }
        }
        failed
    }

    /// Waits up to `grace` for every worker to exit, then kills the rest.
    fn finish(mut self, grace: Duration, on_event: &mut impl FnMut(LocalEvent<'_>)) {
        let deadline = Instant::now() + grace;
        for (name, child, reported) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() && !*reported {
                            on_event(LocalEvent::WorkerFailed { name, status });
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        on_event(LocalEvent::WorkerKilled { name });
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `<program> worker --coordinator ADDRESS --name NAME [--config FILE] [--set ...]`.
fn worker_command(
    program: &Path,
    address: &str,
    name: &str,
    sources: &ConfigSources,
    cfg: &Config,
    threads_each: usize,
) -> Command {
    let mut command = Command::new(program);
    command
        .arg("worker")
        .arg("--coordinator")
        .arg(address)
        .arg("--name")
        .arg(name);
    if let Some(file) = &sources.file {
        command.arg("--config").arg(file);
    }
    for set in &sources.overrides {
        command.arg("--set").arg(set);
    }
    // Share the cores: N workers each using every core would thrash.
    if cfg.infra.threads == 0 {
        command
            .arg("--set")
            .arg(format!("infra.threads={threads_each}"));
    }
    // Each worker serves its metrics on a free loopback port and prints it.
    command
        .arg("--set")
        .arg("metrics.worker_listen=\"127.0.0.1:0\"");
    if cfg.data.loader.threads == 0 {
        command
            .arg("--set")
            .arg(format!("data.loader.threads={threads_each}"));
    }
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
    // One job, one log format (the flag is not passed on; the variable is).
    command.env(
        crate::logging::LOG_FORMAT_ENV,
        crate::logging::current_format().name(),
    );
    command.stdin(Stdio::null());
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest dataset of 4 patients (empty tiles: the index never opens them)
    /// and a config file over it.
    fn job_file(dir: &Path) -> PathBuf {
        let mut csv = String::from("patient,slide,path,label,split\n");
        std::fs::create_dir_all(dir.join("tiles")).unwrap();
        for p in 0..4 {
            let path = format!("tiles/p{p}.png");
            std::fs::write(dir.join(&path), b"").unwrap();
            csv.push_str(&format!("P{p},S0,{path},{},train\n", ["a", "b"][p % 2]));
        }
        std::fs::write(dir.join("manifest.csv"), csv).unwrap();
        let file = dir.join("job.toml");
        std::fs::write(
            &file,
            format!(
                "[infra]\nout_dir = {:?}\n[data]\nsource = \"manifest\"\nmanifest = {:?}\n\
                 [data.hidisc]\nnum_slide_samples = 1\nnum_patch_samples = 1\n\
                 [training]\nbatch_size = 2\nnum_epochs = 1\n",
                dir.join("out").display().to_string(),
                dir.join("manifest.csv").display().to_string()
            ),
        )
        .unwrap();
        file
    }

    fn options(dir: &Path, program: &str, workers: usize) -> LocalClusterOptions {
        LocalClusterOptions {
            worker_program: PathBuf::from(program),
            sources: ConfigSources {
                file: Some(job_file(dir)),
                overrides: vec![
                    "cluster.shutdown_grace_s=2".into(),
                    "cluster.regroup_wait_s=1.5".into(),
                    "cluster.collective_timeout_s=1".into(),
                ],
                ..ConfigSources::default()
            },
            workers,
            start_mode: StartMode::Auto,
            insecure: false,
            gpus: 0,
        }
    }

    #[test]
    fn local_workers_spread_over_the_gpus_round_robin() {
        assert_eq!(
            local_worker_device(0, 0),
            None,
            "no GPU: the worker decides (cpu)"
        );
        let spread: Vec<String> = (0..5).map(|i| local_worker_device(i, 2).unwrap()).collect();
        assert_eq!(spread, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]);
    }

    #[cfg(unix)]
    #[test]
    fn each_local_worker_process_is_started_on_its_own_gpu() {
        use std::os::unix::fs::PermissionsExt;
        // "Workers" that record their arguments (one line each), then fail.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("worker.sh");
        let record = dir.path().join("args");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh
echo \"$@\" >> {record:?}\nexit 1\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut opts = options(dir.path(), script.to_str().unwrap(), 3);
        opts.gpus = 2;
        let outcome = run_local(opts, std::future::pending(), |_| {}).unwrap();
        assert!(!outcome.is_success());
        let recorded = std::fs::read_to_string(&record).unwrap();
        let mut devices: Vec<(String, String)> = recorded
            .lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |flag: &str| {
                    let at = words.iter().position(|w| *w == flag).unwrap();
                    words[at + 1].to_owned()
                };
                (after("--name"), after("--device"))
            })
            .collect();
        devices.sort();
        assert_eq!(
            devices,
            [
                ("worker-0".to_owned(), "cuda:0".to_owned()),
                ("worker-1".to_owned(), "cuda:1".to_owned()),
                ("worker-2".to_owned(), "cuda:0".to_owned()),
            ],
            "{recorded}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn workers_get_the_generated_token_file_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        // A "worker" that records its arguments and the token file, then fails.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("worker.sh");
        let record = dir.path().join("args");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > {record:?}\nwhile [ $# -gt 0 ]; do [ \"$1\" = --token-file ] && cat \"$2\" >> {record:?}; shift; done\nexit 1\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let opts = options(dir.path(), script.to_str().unwrap(), 1);
        let outcome = run_local(opts, std::future::pending(), |_| {}).unwrap();
        assert!(!outcome.is_success());
        let token_path = dir.path().join("out/coordinator").join(TOKEN_FILE);
        let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = std::fs::read_to_string(&token_path).unwrap();
        assert_eq!(token.trim().len(), 64, "{token:?}");
        let recorded = std::fs::read_to_string(&record).unwrap();
        assert!(
            recorded.contains(&format!("--token-file {}", token_path.display())),
            "{recorded}"
        );
        assert!(recorded.contains(token.trim()), "{recorded}");
    }

    #[test]
    fn no_workers_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut events = 0;
        let err = run_local(
            options(dir.path(), "false", 0),
            std::future::pending(),
            |_| events += 1,
        )
        .unwrap_err();
        assert!(matches!(err, LocalClusterError::NoWorkers), "{err:?}");
        assert_eq!(events, 0);
    }

    #[test]
    fn the_job_stops_when_every_worker_process_failed() {
        // `false` exits 1 at once whatever its arguments: two workers that fail.
        let dir = tempfile::tempdir().unwrap();
        let mut failed = Vec::new();
        let mut all_failed = 0;
        let started = Instant::now();
        // The backstop: without the supervision the job would wait for workers
        // forever; this stops it and the assertions below say what was missing.
        let backstop = async { tokio::time::sleep(Duration::from_secs(20)).await };
        let outcome = run_local(
            options(dir.path(), "false", 2),
            backstop,
            |event| match event {
                LocalEvent::WorkerFailed { name, status } => {
                    failed.push((name.to_owned(), status.code()));
                }
                LocalEvent::AllWorkersFailed => all_failed += 1,
                _ => {}
            },
        )
        .unwrap();
        failed.sort();
        assert_eq!(
            failed,
            [
                ("worker-0".to_owned(), Some(1)),
                ("worker-1".to_owned(), Some(1))
            ]
        );
        assert_eq!(all_failed, 1);
        assert!(
            matches!(outcome.kind, crate::OutcomeKind::Cancelled(_)),
            "{outcome:?}"
        );
        assert_eq!(outcome.committed_steps, 0);
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[test]
    fn a_missing_worker_program_names_the_worker_and_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_local(
            options(dir.path(), "/nonexistent/hsat", 1),
            std::future::pending(),
            |_| {},
        )
        .unwrap_err();
        match err {
            LocalClusterError::Spawn { name, program, .. } => {
                assert_eq!(name, "worker-0");
                assert_eq!(program, Path::new("/nonexistent/hsat"));
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
    }
}
