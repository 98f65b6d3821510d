//! `hsat bench sync`: parses the flags, runs [`hsat_worker::bench::sync`] (or, with
//! the hidden `--as-rank`, one hsat rank of it) and prints its table.

use std::path::PathBuf;

use hsat_worker::bench::default_python;
use hsat_worker::bench::sync::{SyncBenchEvent, SyncBenchOptions, bench_sync, sync_rank};

/// Options of `hsat bench sync`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Timed rounds per implementation (after two warm-up rounds each).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Bucket size in MiB for both implementations (DDP's default: 25).
    #[arg(long, default_value_t = 25)]
    bucket_mb: usize,
    /// Intra-op threads per rank process (two ranks share the machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Internal: run as this rank of the hsat pair.
    #[arg(long, hide = true)]
    as_rank: Option<usize>,
    /// Internal: port of the driver's store.
    #[arg(long, hide = true)]
    store_port: Option<u16>,
}

/// Runs the benchmark (or, with `--as-rank`, one hsat rank of it).
pub fn sync(args: SyncArgs) -> anyhow::Result<()> {
    if let (Some(rank), Some(port)) = (args.as_rank, args.store_port) {
        return Ok(sync_rank(rank, port, args.bucket_mb, args.threads)?);
    }
    let options = SyncBenchOptions {
        rounds: args.rounds,
        bucket_mb: args.bucket_mb,
        threads: args.threads,
        python: args.python.unwrap_or_else(default_python),
        rank_program: std::env::current_exe()?,
    };
    let times = bench_sync(&options, |event| match event {
        SyncBenchEvent::Started {
            tensors,
            parameters,
        } => println!(
            "hsat bench sync: ResNet-50 encoder gradients ({} tensors, {:.2}M parameters, {:.1} MB fp32), 2 local processes, gloo over loopback, {} MiB buckets, {} thread(s) per rank, {} rounds",
            tensors,
            *parameters as f64 / 1e6,
            *parameters as f64 * 4.0 / 1e6,
            options.bucket_mb,
            options.threads,
            options.rounds
        ),
        SyncBenchEvent::Ready { hsat, ddp } => println!("hsat: {hsat}; DDP: {ddp}"),
    })?;
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "", "median s", "min s", "max s"
    );
    print_row("hsat GradientSync::average", &times.hsat, times.hsat_median);
    print_row("PyTorch DDP (gloo)", &times.ddp, times.ddp_median);
    println!(
        "ratio hsat/DDP: {:.2}x (target <= 1.10x)",
        times.hsat_median / times.ddp_median
    );
    Ok(())
}

fn print_row(name: &str, sorted: &[f64], median: f64) {
    println!(
        "{:<28} {:>10.4} {:>10.4} {:>10.4}",
        name,
        median,
        sorted.first().copied().unwrap_or(f64::NAN),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
}
