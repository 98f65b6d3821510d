//! Distributed jobs: `hsat worker` (one worker process), `hsat coordinator` (the job's
//! coordinator) and `hsat run --workers N` (both on this machine: the coordinator
//! in this process and N worker processes).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use clap::Args;
use hsat_coordinator::cli::{CoordinatorArgs, MembershipArgs, run_coordinator, shutdown_signal};
use hsat_coordinator::local::{self, LocalClusterOptions, LocalEvent};
use hsat_coordinator::{JobOutcome, OutcomeKind};
use hsat_core::config::{self, ConfigSources};
use hsat_worker::cluster::{WorkerOptions, run_worker};
use tch::Device;

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
    /// File holding the job token (also HSAT_TOKEN_FILE, HSAT_TOKEN,
    /// security.token_file); the coordinator's, unless it runs with --insecure.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
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
        sets
    }
}

/// Runs one worker until the job ends; SIGINT/SIGTERM make it leave after the
/// current step (reported) or at once when it is not in one.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let overrides = args.overrides();
    let cfg = config::load(&ConfigSources::from_process_env(args.config, overrides))?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown))
            .context("cannot install the signal handler")?;
    }
    let name = args
        .name
        .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()));
    let cluster = cfg.cluster.clone();
    let token = hsat_coordinator::cli::client_token(args.token_file.as_deref(), &cfg)?;
    let tls = hsat_coordinator::cli::client_tls(&cfg)?;
    let options = WorkerOptions {
        token,
        tls,
        coordinator: args.coordinator,
        config: cfg,
        name: name.clone(),
        advertise_host: args.advertise_host,
        device: Device::cuda_if_available(),
        collective_timeout: cluster.collective_timeout,
        bucket_bytes: cluster.bucket_bytes(),
        connect_deadline: cluster.connect_timeout,
        rpc_retry_deadline: cluster.rpc_retry_deadline,
    };
    let summary = run_worker(options, shutdown).with_context(|| format!("worker {name}"))?;
    eprintln!(
        "hsat worker {name}: {} ({} step shards trained in {} generation(s))",
        summary.reason, summary.steps_trained, summary.generations
    );
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
    let options = LocalClusterOptions {
        worker_program: std::env::current_exe().context("cannot find the hsat executable")?,
        sources: ConfigSources::from_process_env(file, overrides),
        workers,
        start_mode,
        insecure,
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
        OutcomeKind::Failed(message) => bail!(
            "the job failed after {} of {} steps: {message}",
            outcome.committed_steps,
            outcome.total_steps
        ),
        OutcomeKind::Cancelled(message) => bail!(
            "the job was stopped after {} of {} steps ({message}); committed steps are recorded in {}",
            outcome.committed_steps,
            outcome.total_steps,
            outcome.ledger.display()
        ),
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
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    /// File holding the job token (also HSAT_TOKEN_FILE, HSAT_TOKEN); for a local
    /// job, `<out_dir>/coordinator/token`.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// Prints the job's status.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let status = runtime.block_on(async {
        // No config file: `[security]` comes from HSAT__SECURITY__* variables
        // (token file, TLS CA and client certificate).
        let cfg = config::load(&ConfigSources::from_process_env(None, Vec::new()))?;
        let token = hsat_coordinator::cli::client_token(args.token_file.as_deref(), &cfg)?;
        let tls = hsat_coordinator::cli::client_tls(&cfg)?;
        let client =
            hsat_proto::client::CoordinatorClient::connect_tls(&args.coordinator, tls.as_ref())
                .await?
                .with_token(token.as_ref());
        anyhow::Ok(client.status().await?)
    })?;
    if args.json {
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
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let message = if status.message.is_empty() {
        String::new()
    } else {
        format!(" ({})", status.message)
    };
    println!(
        "job {}{message}: step {}/{} epoch {} generation {}, {:.2} steps/s, {:.1} patients/s",
        status.state.describe(),
        status.step,
        status.total_steps,
        status.epoch,
        status.generation,
        status.steps_per_second,
        status.patients_per_second
    );
    for w in &status.workers {
        println!(
            "  {:<6} {:<24} rank {:<4} {:<10} last heartbeat {:.1} s ago",
            w.worker_id.to_string(),
            w.name,
            w.rank.map_or("-".to_owned(), |r| r.to_string()),
            w.state,
            w.last_heartbeat_age.as_secs_f64()
        );
    }
    Ok(())
}
