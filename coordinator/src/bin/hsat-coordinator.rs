//! `hsat-coordinator`: the coordinator alone (no libtorch), for the Kubernetes
//! coordinator image. Same flags as `hsat coordinator`.
//!
//! Thin main: parse flags, start tracing, load config and dataset, bind, then
//! `hsat_coordinator::serve` until the job ends or SIGTERM / Ctrl-C.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hsat_coordinator::{ClusterSettings, load_job, serve};
use hsat_core::config::{self, ConfigSources};

/// Coordinates a distributed hsat training job: waits for --workers workers, hands
/// out steps, commits them to <out_dir>/coordinator/ledger.jsonl.
#[derive(Debug, Parser)]
#[command(name = "hsat-coordinator", version, about)]
struct Args {
    /// TOML config file of the job (workers must use the same one).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set training.num_epochs=2`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: String,
    /// Workers to wait for before training starts.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Fewest workers training may continue with after a loss.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Heartbeat interval the workers are told to keep, in ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// A worker silent this long is dropped, in ms.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Seconds to wait for workers to get their stop at the end (and on SIGTERM).
    #[arg(long, default_value_t = 30)]
    grace_s: u64,
}

/// The settings the flags describe.
fn settings(args: &Args) -> ClusterSettings {
    let mut settings = ClusterSettings::new(args.workers);
    settings.min_workers = args.min_workers;
    settings.heartbeat = Duration::from_millis(args.heartbeat_ms);
    settings.lease = Duration::from_millis(args.lease_ms);
    settings.regroup_wait = settings.lease;
    settings.shutdown_grace = Duration::from_secs(args.grace_s);
    settings
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let settings = settings(&args);
    settings
        .validate()
        .map_err(|message| anyhow::anyhow!("invalid flags: {message}"))?;
    let config = config::load(&ConfigSources::from_process_env(
        args.config.clone(),
        args.set.clone(),
    ))?;
    let job = load_job(config)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port in use?)", args.listen))?;
    let address = listener.local_addr()?;
    println!("hsat-coordinator: listening on {address}");
    std::io::stdout().flush()?;
    let outcome = serve(job, settings, listener, shutdown_signal()).await?;
    println!(
        "hsat-coordinator: {:?}; {}/{} steps committed; ledger {}",
        outcome.kind,
        outcome.committed_steps,
        outcome.total_steps,
        outcome.ledger.display()
    );
    Ok(outcome.is_success())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
