//! `hsat bench sync`: parses the flags, runs [`hsat_worker::bench::sync`] (or, with
//! the hidden `--as-rank`, one hsat rank of it) and prints its table; with `--step`,
//! [`hsat_worker::bench::distributed`] instead (the cost of `training.loss_scope`
//! and `training.sync_bn` in a 2-process step).

use std::path::PathBuf;

use hsat_worker::bench::default_python;
use hsat_worker::bench::distributed::{StepBenchOptions, bench_distributed_step, step_rank};
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
    /// Time a whole distributed step (2 processes) with `training.loss_scope` local
    /// and global and `training.sync_bn` off and on, instead of the gradient sync.
    #[arg(long)]
    step: bool,
    /// With --step: the backbone.
    #[arg(long, default_value = "resnet18")]
    backbone: String,
    /// With --step: the image side in pixels.
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// With --step: patients of the whole step (2 slides x 2 patches x 2 views each),
    /// split between the two ranks.
    #[arg(long, default_value_t = 4)]
    patients: usize,
    /// With --step: PGD iterations.
    #[arg(long, default_value_t = 5)]
    attack_iters: usize,
    /// Internal: run as this rank of the hsat pair.
    #[arg(long, hide = true)]
    as_rank: Option<usize>,
    /// Internal: port of the driver's store.
    #[arg(long, hide = true)]
    store_port: Option<u16>,
}

/// Runs the benchmark (or, with `--as-rank`, one hsat rank of it).
pub fn sync(args: SyncArgs) -> anyhow::Result<()> {
    if args.step {
        return distributed_step(args);
    }
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

/// `--step`: the distributed step's variants against local scope without sync BN.
fn distributed_step(args: SyncArgs) -> anyhow::Result<()> {
    let options = StepBenchOptions {
        backbone: args.backbone.clone(),
        image_size: args.image_size,
        patients: args.patients,
        attack_iters: args.attack_iters,
        rounds: args.rounds,
        threads: args.threads,
        rank_program: std::env::current_exe()?,
    };
    if let (Some(rank), Some(port)) = (args.as_rank, args.store_port) {
        return Ok(step_rank(rank, port, &options)?);
    }
    println!(
        "hsat bench sync --step: one HSAT step (PGD {} iterations, clean + adversarial passes), {} at {} px, {} patients x 2 slides x 2 patches x 2 views split over 2 local processes, gloo over loopback, {} thread(s) per rank, {} rounds",
        options.attack_iters,
        options.backbone,
        options.image_size,
        options.patients,
        options.threads,
        options.rounds
    );
    let variants = bench_distributed_step(&options)?;
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>8}",
        "", "median s", "min s", "max s", "ratio"
    );
    let reference = variants.first().map_or(f64::NAN, |v| v.median);
    for v in &variants {
        let name = format!("loss_scope={} sync_bn={}", v.loss_scope, v.sync_bn);
        println!(
            "{:<32} {:>10.4} {:>10.4} {:>10.4} {:>7.3}x",
            name,
            v.median,
            v.seconds.first().copied().unwrap_or(f64::NAN),
            v.seconds.last().copied().unwrap_or(f64::NAN),
            v.median / reference
        );
    }
    println!("ratio: median step time against loss_scope=local sync_bn=false in the same run");
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
