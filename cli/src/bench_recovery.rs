//! `hsat bench recovery`: parses the flags, runs
//! [`hsat_coordinator::recovery_bench::bench_recovery`] (a small real job, processes
//! killed with SIGKILL) and prints each trial, the medians and the targets.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use hsat_coordinator::recovery_bench::{
    RecoveryBenchOptions, RecoveryEvent, Victim, bench_recovery, default_scratch, median,
    remove_scratch,
};

/// Options of `hsat bench recovery`.
#[derive(Debug, clap::Args)]
pub struct RecoveryArgs {
    /// Workers of the job.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Trials per kind of failure (worker loss, coordinator loss).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds a trial may take before the benchmark gives up.
    #[arg(long, default_value_t = 120)]
    trial_limit: u64,
    /// Scratch directory for the dataset and the job (default: a new temporary one,
    /// removed after a successful run; kept on failure).
    #[arg(long)]
    scratch: Option<PathBuf>,
}

/// Worker loss target from the durable-jobs issue, seconds.
const WORKER_TARGET: f64 = 5.0;
/// Coordinator loss target, seconds.
const COORDINATOR_TARGET: f64 = 10.0;

/// Runs the trials and prints the medians against the targets.
pub fn recovery(args: RecoveryArgs) -> anyhow::Result<()> {
    let temporary = args.scratch.is_none();
    let scratch = args.scratch.unwrap_or_else(default_scratch);
    let options = RecoveryBenchOptions {
        program: std::env::current_exe().context("cannot find the hsat executable")?,
        workers: args.workers,
        trials: args.trials,
        trial_limit: Duration::from_secs(args.trial_limit.max(1)),
        scratch: scratch.clone(),
    };
    let report = bench_recovery(&options, &mut |event| match event {
        RecoveryEvent::Preparing { scratch } => println!(
            "hsat bench recovery: {} workers (small_cnn, 32 px), {} trials per failure, scratch {}",
            options.workers,
            options.trials,
            scratch.display()
        ),
        RecoveryEvent::Running { committed } => {
            println!("job running with every worker (steps committed so far: {committed})");
        }
        RecoveryEvent::Trial {
            victim,
            trial,
            seconds,
        } => println!(
            "  {:<48} trial {trial}: next committed step after {seconds:.2} s",
            victim.describe()
        ),
    })
    .with_context(|| format!("recovery benchmark (scratch kept: {})", scratch.display()))?;
    if temporary {
        remove_scratch(&scratch);
    }
    println!(
        "{:<48} {:>10} {:>8} {:>8} {:>8}",
        "failure", "median (s)", "min", "max", "target"
    );
    for (victim, values, target) in [
        (Victim::Worker, &report.worker, WORKER_TARGET),
        (Victim::Coordinator, &report.coordinator, COORDINATOR_TARGET),
    ] {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        let m = median(values);
        println!(
            "{:<48} {m:>10.2} {min:>8.2} {max:>8.2} {:>7}{}",
            victim.describe(),
            format!("< {target}"),
            if m < target { "  met" } else { "  MISSED" }
        );
    }
    Ok(())
}
