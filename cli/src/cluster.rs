//! Distributed jobs: `hsat worker` (one worker process), `hsat coordinator` (the job's
//! coordinator) and `hsat run --workers N` (both on this machine: the coordinator
//! in this process and N worker processes).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use hsat_core::exit::{Exit, ExitClass};

use crate::exit::Ended;
use clap::Args;
use hsat_coordinator::cli::{CoordinatorArgs, MembershipArgs, run_coordinator, shutdown_signal};
use hsat_coordinator::local::{self, LocalClusterOptions, LocalEvent};
use hsat_coordinator::{JobOutcome, OutcomeKind};
use hsat_core::config::{self, ConfigSources};
use hsat_worker::cluster::{WorkerOptions, run_worker};

/// `hsat worker` arguments.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The coordinator, `host:port` or `http://host:port`.
    #[arg(long)]
    pub coordinator: String,
    /// The job's TOML config; it must match the coordinator's (loader settings and
    /// data.db_root may differ).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set data.loader.threads=4`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Name shown by the coordinator (default: host name and process id).
    #[arg(long)]
    pub name: Option<String>,
    /// Address other workers reach this one at (it may host the rendezvous store);
    /// default: this machine's address on the route to the coordinator.
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Seconds a rendezvous or a collective may take before the group is given up
    /// [cluster.collective_timeout_s].
    #[arg(long)]
    pub collective_timeout: Option<f64>,
    /// Seconds to keep trying to reach the coordinator at start-up
    /// [cluster.connect_timeout_s].
    #[arg(long)]
    pub connect_timeout: Option<f64>,
    /// Gradient bucket size in MB (PyTorch DDP's default is 25) [cluster.bucket_mb].
    #[arg(long)]
    pub bucket_mb: Option<usize>,
    /// Seconds each call to the coordinator keeps being retried (backoff 100 ms
    /// doubling to 1 s) while the coordinator is unreachable, restarting or too
    /// slow; 0 = give up at the first such error [cluster.rpc_retry_deadline_s].
    #[arg(long)]
    pub rpc_retry_deadline: Option<f64>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (IP:PORT; port 0 picks a
    /// free port, printed on stdout; "" = off) [metrics.worker_listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// File holding the job token (also HSAT_TOKEN_FILE, HSAT_TOKEN,
    /// security.token_file); the coordinator's, unless it runs with --insecure.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Where to train: auto, cpu, cuda or cuda:N (also HSAT_DEVICE). auto:
    /// cuda:$LOCAL_RANK when LOCAL_RANK is set (one worker process per GPU), else
    /// cuda:0 when there is a GPU, else the CPU; cuda:N beyond the GPUs present is
    /// refused (exit 78).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
}

impl WorkerArgs {
    /// `--set` overrides, then the flags as `cluster.*` overrides (a flag wins).
    fn overrides(&self) -> Vec<String> {
        let mut sets = self.set.clone();
        let float = |value: f64| format!("{value:?}");
        if let Some(s) = self.collective_timeout {
            sets.push(format!("cluster.collective_timeout_s={}", float(s)));
        }
        if let Some(s) = self.connect_timeout {
            sets.push(format!("cluster.connect_timeout_s={}", float(s)));
        }
        if let Some(mb) = self.bucket_mb {
            sets.push(format!("cluster.bucket_mb={mb}"));
        }
        if let Some(s) = self.rpc_retry_deadline {
            sets.push(format!("cluster.rpc_retry_deadline_s={}", float(s)));
        }
        if let Some(address) = &self.metrics_listen {
            sets.push(format!("metrics.worker_listen={address:?}"));
        }
        sets
    }
}

/// Runs one worker until the job ends; SIGINT/SIGTERM make it leave after the
/// current step (reported) or at once when it is not in one.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let overrides = args.overrides();
    let cfg = config::load(&ConfigSources::from_process_env(args.config, overrides))?;
    let device = hsat_worker::cluster::device::device_from_process(args.device.as_deref())?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown))
            .context("cannot install the signal handler")?;
    }
    let name = args
        .name
        .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()));
    let cluster = cfg.cluster.clone();
    let metrics_listen = cfg.metrics.worker_listen;
    let token = hsat_coordinator::cli::client_token(args.token_file.as_deref(), &cfg)?;
    let tls = hsat_coordinator::cli::client_tls(&cfg)?;
    tracing::info!(worker = %name, device = ?device.device, why = %device.reason, "device");
    let options = WorkerOptions {
        token,
        tls,
        coordinator: args.coordinator,
        config: cfg,
        name: name.clone(),
        advertise_host: args.advertise_host,
        device: device.device,
        collective_timeout: cluster.collective_timeout,
        bucket_bytes: cluster.bucket_bytes(),
        connect_deadline: cluster.connect_timeout,
        rpc_retry_deadline: cluster.rpc_retry_deadline,
        metrics_listen,
    };
    let summary = run_worker(options, shutdown).with_context(|| format!("worker {name}"))?;
    let line = format!(
        "hsat worker {name}: {} ({} step shards trained in {} generation(s))",
        summary.reason, summary.steps_trained, summary.generations
    );
    let exit = hsat_core::exit::ExitClass::exit(&summary);
    if exit != Exit::Success {
        // Left before the job finished (SIGTERM, its coordinator stopped): the job
        // goes on, this worker may be started again.
        return Err(Ended::with(
            exit,
            format!("{line}; the job is not finished"),
        ));
    }
    eprintln!("{line}");
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

/// Runs the coordinator of a job until it finishes, fails, or SIGINT/SIGTERM.
pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let outcome = run_coordinator("hsat coordinator", args)?;
    finish(&outcome)
}

/// `hsat run --workers N`: the coordinator in this process, N worker processes.
pub fn run_local(
    file: Option<PathBuf>,
    overrides: Vec<String>,
    workers: usize,
    membership: &MembershipArgs,
    start_mode: hsat_coordinator::StartMode,
    insecure: bool,
) -> anyhow::Result<()> {
    // The membership flags become `cluster.*` overrides; the workers get them too
    // (harmless: `[cluster]` is per process and not compared at registration).
    let mut overrides = overrides;
    overrides.push(format!("cluster.workers={workers}"));
    overrides.extend(membership.overrides());
    let gpus = hsat_worker::cluster::device::gpu_count();
    if gpus > 0 {
        println!(
            "hsat: {gpus} GPU(s): local worker i trains on cuda:(i mod {gpus}) ({})",
            (0..workers)
                .filter_map(
                    |i| local::local_worker_device(i, gpus).map(|d| format!("worker-{i} {d}"))
                )
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let options = LocalClusterOptions {
        worker_program: std::env::current_exe().context("cannot find the hsat executable")?,
        sources: ConfigSources::from_process_env(file, overrides),
        workers,
        start_mode,
        insecure,
        gpus,
    };
    let outcome = local::run_local(options, shutdown_signal(), |event| match event {
        LocalEvent::Starting {
            config,
            workers,
            total_steps,
        } => println!(
            "hsat: training {} on {} local worker processes, {} patients per step (all workers together), {} steps, out_dir {}",
            config.model.backbone,
            workers,
            config.training.batch_size,
            total_steps,
            config.infra.out_dir.display()
        ),
        LocalEvent::Metrics { url } => println!("hsat: coordinator metrics on {url}"),
        LocalEvent::WorkerFailed { name, status } => {
            eprintln!("hsat: {name} exited with {status}");
        }
        LocalEvent::AllWorkersFailed => {
            eprintln!("hsat: every worker process failed; stopping the job");
        }
        LocalEvent::WorkerKilled { name } => {
            eprintln!("hsat: {name} did not exit in time and was killed");
        }
    })?;
    finish(&outcome)
}

fn finish(outcome: &JobOutcome) -> anyhow::Result<()> {
    match &outcome.kind {
        OutcomeKind::Finished if outcome.already_finished => {
            println!(
                "hsat: job {} already finished ({} of {} steps committed); nothing to train. Ledger {} (left as it is); \
                 to train again from scratch, rerun with --new-job",
                outcome.job_id,
                outcome.committed_steps,
                outcome.total_steps,
                outcome.ledger.display()
            );
            Ok(())
        }
        OutcomeKind::Finished => {
            match &outcome.last_checkpoint {
                Some(dir) => println!(
                    "hsat: done, {} steps committed; final checkpoint {}; ledger {}",
                    outcome.committed_steps,
                    dir.display(),
                    outcome.ledger.display()
                ),
                None => println!(
                    "hsat: done, {} steps committed; ledger {}",
                    outcome.committed_steps,
                    outcome.ledger.display()
                ),
            }
            Ok(())
        }
        OutcomeKind::Failed(message) => Err(Ended::with(
            outcome.exit(),
            format!(
                "the job failed after {} of {} steps: {message}",
                outcome.committed_steps, outcome.total_steps
            ),
        )),
        OutcomeKind::Cancelled(message) => Err(Ended::with(
            outcome.exit(),
            format!(
                "the job was stopped after {} of {} steps ({message}); committed steps are recorded in {}; \
                 start the coordinator again to resume it",
                outcome.committed_steps,
                outcome.total_steps,
                outcome.ledger.display()
            ),
        )),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `hsat status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The coordinator, `host:port` or `http://host:port`.
    #[arg(long)]
    pub coordinator: String,
    /// Print the status as JSON (with --watch: one object per line).
    #[arg(long)]
    pub json: bool,
    /// Refresh until the job ends or Ctrl-C: on a terminal the screen is redrawn,
    /// elsewhere each refresh is printed after the last. Ends with exit status 0
    /// when the job finished or its coordinator exited (it does when the job ends
    /// or is stopped; its output and ledger tell how), 1 when the job failed.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0, requires = "watch", value_parser = positive_seconds)]
    pub interval: f64,
    /// File holding the job token (also HSAT_TOKEN_FILE, HSAT_TOKEN); for a local
    /// job, `<out_dir>/coordinator/token`.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && (0.05..=3600.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "{text:?} is not a number of seconds in [0.05, 3600]"
        )),
    }
}

/// How long `--watch` keeps trying a coordinator that stopped answering before it
/// decides the coordinator has exited (a restarted coordinator answers again
/// within this, and the watch goes on).
const WATCH_UNREACHABLE_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Prints the job's status (once, or refreshed with `--watch`).
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    if !args.watch {
        let status = runtime.block_on(async {
            let client = status_client(&args).await?;
            anyhow::Ok(client.status().await?)
        })?;
        print!("{}", render_status(&status, args.json, true)?);
        return Ok(());
    }
    runtime.block_on(watch_status(&args))
}

/// The client both `hsat status` forms use (one place for how it connects).
async fn status_client(args: &StatusArgs) -> anyhow::Result<hsat_proto::client::CoordinatorClient> {
    // No config file: `[security]` comes from HSAT__SECURITY__* variables (token
    // file, TLS CA and client certificate).
    let cfg = config::load(&ConfigSources::from_process_env(None, Vec::new()))?;
    let token = hsat_coordinator::cli::client_token(args.token_file.as_deref(), &cfg)?;
    let tls = hsat_coordinator::cli::client_tls(&cfg)?;
    Ok(
        hsat_proto::client::CoordinatorClient::connect_tls(&args.coordinator, tls.as_ref())
            .await?
            .with_token(token.as_ref()),
    )
}

/// `hsat status --watch`: fetch, show, sleep, until the job ends or Ctrl-C.
async fn watch_status(args: &StatusArgs) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};

    use hsat_proto::domain::JobState;

    let interval = std::time::Duration::from_secs_f64(args.interval);
    let redraw = std::io::stdout().is_terminal();
    let client = status_client(args).await?;
    let mut last: Option<hsat_proto::domain::JobStatus> = None;
    let mut unreachable_since: Option<std::time::Instant> = None;
    loop {
        match client.status().await {
            Ok(status) => {
                unreachable_since = None;
                let text = render_status(&status, args.json, redraw)?;
                if redraw {
                    // Clear the screen and home the cursor, then the status.
                    print!("\x1b[2J\x1b[H{text}");
                    println!("\n(every {} s; Ctrl-C to stop)", args.interval);
                } else {
                    print!("{text}");
                    if !args.json {
                        println!();
                    }
                }
                std::io::stdout().flush()?;
                match status.state {
                    JobState::Finished => return Ok(()),
                    JobState::Failed => bail!("the job failed: {}", status.message),
                    _ => {}
                }
                last = Some(status);
            }
            // A refusal (no or a wrong token, ...) will not change: say it now.
            Err(err) if !err.is_retryable() => return Err(err.into()),
            Err(err) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= WATCH_UNREACHABLE_FOR {
                    // The coordinator exits as soon as its workers have left after the
                    // last commit, often between two refreshes: a coordinator that is
                    // gone is the normal end of a watch, not an error of it.
                    let Some(seen) = last else {
                        return Err(err.into());
                    };
                    println!(
                        "hsat status: the coordinator at {} has exited (last seen: {} at step {}/{}); \
                         it exits when its job ends or is stopped: its output and its ledger \
                         (<out_dir>/coordinator/ledger.jsonl) say how",
                        args.coordinator,
                        seen.state.describe(),
                        seen.step,
                        seen.total_steps
                    );
                    return Ok(());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The status as `hsat status` prints it: text, or JSON (pretty, or one line when
/// `pretty` is false).
fn render_status(
    status: &hsat_proto::domain::JobStatus,
    json: bool,
    pretty: bool,
) -> anyhow::Result<String> {
    use std::fmt::Write;

    if json {
        let workers: Vec<serde_json::Value> = status
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.worker_id.0,
                    "name": w.name,
                    "rank": w.rank,
                    "last_heartbeat_ms": w.last_heartbeat_age.as_millis() as u64,
                    "state": w.state,
                })
            })
            .collect();
        let value = serde_json::json!({
            "state": status.state.describe(),
            "message": status.message,
            "step": status.step,
            "total_steps": status.total_steps,
            "epoch": status.epoch,
            "generation": status.generation,
            "steps_per_second": status.steps_per_second,
            "patients_per_second": status.patients_per_second,
            "workers": workers,
        });
        let text = if pretty {
            serde_json::to_string_pretty(&value)?
        } else {
            serde_json::to_string(&value)?
        };
        return Ok(format!("{text}\n"));
    }
    let message = if status.message.is_empty() {
        String::new()
    } else {
        format!(" ({})", status.message)
    };
    let mut out = String::new();
    writeln!(
        out,
        "job {}{message}: step {}/{} epoch {} generation {}, {:.2} steps/s, {:.1} patients/s",
        status.state.describe(),
        status.step,
        status.total_steps,
        status.epoch,
        status.generation,
        status.steps_per_second,
        status.patients_per_second
    )?;
    for w in &status.workers {
        writeln!(
            out,
            "  {:<6} {:<24} rank {:<4} {:<10} last heartbeat {:.1} s ago",
            w.worker_id.to_string(),
            w.name,
            w.rank.map_or("-".to_owned(), |r| r.to_string()),
            w.state,
            w.last_heartbeat_age.as_secs_f64()
        )?;
    }
    Ok(out)
}
