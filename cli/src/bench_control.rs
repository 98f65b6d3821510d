//! `hsat bench control-plane`: parses the flags, runs
//! [`hsat_coordinator::bench::control_plane`] (simulated workers against a separate
//! `hsat-coordinator` process) and prints its table.

use std::path::PathBuf;

use anyhow::Context;
use hsat_coordinator::bench::{
    ControlPlaneEvent, ControlPlaneOptions, ControlPlaneRun, control_plane as run_benchmark,
};

/// Options of `hsat bench control-plane`.
#[derive(Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Simulated worker counts to measure, one coordinator each.
    #[arg(long, value_delimiter = ',', default_values_t = vec![256usize, 1024])]
    workers: Vec<usize>,
    /// Training steps per second the workers drive.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Measured seconds per worker count (after start-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Fraction of the step period over which the workers' reports are spread (ranks
    /// finish at different times); 0 = all ranks report at the same instant.
    #[arg(long, default_value_t = 0.8)]
    spread: f64,
    /// gRPC connections the simulated workers share.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Heartbeat interval in ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// The coordinator binary (default: `hsat-coordinator` beside this executable).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Authentication: `both` (with, then without, per worker count, and the
    /// ratios), `on` or `off`.
    #[arg(long, default_value = "both", value_parser = ["both", "on", "off"])]
    auth: String,
}

/// Runs the benchmark for each worker count.
pub fn control_plane(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let coordinator = match args.coordinator {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("the executable has no folder")?
            .join("hsat-coordinator"),
    };
    let options = ControlPlaneOptions {
        workers: args.workers,
        rate: args.rate,
        seconds: args.seconds,
        spread: args.spread,
        channels: args.channels,
        heartbeat_ms: args.heartbeat_ms,
        coordinator,
        auth_modes: match args.auth.as_str() {
            "on" => vec![true],
            "off" => vec![false],
            _ => vec![true, false],
        },
    };
    let mut previous: Option<ControlPlaneRun> = None;
    run_benchmark(&options, |event| match event {
        ControlPlaneEvent::Started => {
            println!(
                "hsat bench control-plane: {} steps/s, reports spread over {:.0}% of a step, heartbeat {} ms, {} s measured, {} shared connections, coordinator {}",
                options.rate,
                options.spread * 100.0,
                options.heartbeat_ms,
                options.seconds,
                options.channels,
                options.coordinator.display()
            );
            println!(
                "{:>7} {:>5} {:>22} {:>10} {:>10} {:>9} {:>12}",
                "workers", "auth", "rpc", "p50 (ms)", "p99 (ms)", "calls", "coord cpu %"
            );
        }
        ControlPlaneEvent::Run(run) => {
            print_run(run);
            if let Some(on) = previous
                .take()
                .filter(|p| p.workers == run.workers && p.authenticated && !run.authenticated)
            {
                print_ratios(&on, run);
            }
            previous = Some(run.clone());
        }
    })?;
    Ok(())
}

/// Authentication on / off, same worker count, same invocation.
fn print_ratios(on: &ControlPlaneRun, off: &ControlPlaneRun) {
    let workers = on.workers;
    for (a, b) in on.rpcs.iter().zip(&off.rpcs) {
        println!(
            "{workers:>7} {:>5} {:>22} {:>9.2}x {:>9.2}x",
            "on/off",
            a.name,
            a.p50_ms / b.p50_ms,
            a.p99_ms / b.p99_ms
        );
    }
    println!(
        "{workers:>7} {:>5} coordinator cpu {:.1}% with authentication vs {:.1}% without: {:.2}x",
        "on/off",
        on.coordinator_cpu_percent,
        off.coordinator_cpu_percent,
        on.coordinator_cpu_percent / off.coordinator_cpu_percent
    );
}

fn print_run(run: &ControlPlaneRun) {
    let workers = run.workers;
    let auth = if run.authenticated { "on" } else { "off" };
    if let Some(err) = &run.failure {
        println!("{workers:>7} a simulated worker failed: {err}");
    }
    if run.stopped_early > 0 {
        println!(
            "{workers:>7} {} simulated workers stopped early",
            run.stopped_early
        );
    }
    for rpc in &run.rpcs {
        println!(
            "{:>7} {:>5} {:>22} {:>10.3} {:>10.3} {:>9} {:>12.1}",
            workers, auth, rpc.name, rpc.p50_ms, rpc.p99_ms, rpc.calls, run.coordinator_cpu_percent
        );
    }
    println!(
        "{:>7} {:>5} committed {} steps, {:.1} steps/s over the last commits; {} NextAssignment calls answered Wait; Register p99 {:.1} ms",
        workers, auth, run.committed_steps, run.steps_per_second, run.waits, run.register_p99_ms
    );
}
