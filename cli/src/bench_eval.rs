//! `hsat bench eval`: parse the flags, run [`hsat_worker::bench::eval::bench_eval`]
//! (the kNN of `hsat eval`, exact f64 CPU path against the device path, same
//! seeded features, one run) and print both times, the ratio and their agreement.

use std::cell::RefCell;

use hsat_worker::bench::eval::{EvalBenchOptions, bench_eval};

use crate::progress::Progress;

/// Options of `hsat bench eval`.
#[derive(Debug, clap::Args)]
pub struct EvalBenchArgs {
    /// Bank (train) rows.
    #[arg(long, default_value_t = 100_000)]
    bank: usize,
    /// Query (val) rows.
    #[arg(long, default_value_t = 20_000)]
    queries: usize,
    /// Feature dimensions (ResNet-50: 2048).
    #[arg(long, default_value_t = 2048)]
    dim: usize,
    /// Classes of the generated features (OpenSRH: 7).
    #[arg(long, default_value_t = 7)]
    classes: usize,
    /// Neighbours (as eval.knn_k).
    #[arg(long, default_value_t = 200)]
    k: usize,
    /// Seed of the generated features.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Memory of the device path's chunks in MiB (as eval.knn_memory_mb).
    #[arg(long, default_value_t = 512)]
    memory_mb: usize,
    /// CPU threads of both paths.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Queries the exact path runs (the first ones; 0 = all). At the default size the
    /// exact path takes most of an hour on 2 cores: --exact-queries 500 times it on 500 and
    /// scales its time to all queries (each query costs the same), comparing the
    /// two paths on those 500.
    #[arg(long, default_value_t = 0)]
    exact_queries: usize,
    /// Device of the device path: auto, cpu, cuda or cuda:N (also HSAT_DEVICE).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

/// Runs the benchmark and prints what it measured.
pub fn eval(args: EvalBenchArgs) -> anyhow::Result<()> {
    let device = hsat_worker::cluster::device::device_from_process(args.device.as_deref())?.device;
    let options = EvalBenchOptions {
        bank: args.bank,
        queries: args.queries,
        dim: args.dim,
        classes: args.classes,
        k: args.k,
        t: 0.07,
        seed: args.seed,
        device,
        memory_mb: args.memory_mb,
        threads: args.threads,
        exact_queries: args.exact_queries,
    };
    println!(
        "hsat bench eval: kNN of {} queries against a {}-row bank, {} dims, {} classes, k = {}, T = 0.07; \
         device path on {:?} ({} MiB chunks), {} threads",
        options.queries,
        options.bank,
        options.dim,
        options.classes,
        options.k,
        options.device,
        options.memory_mb,
        options.threads
    );
    // Both callbacks touch the progress line: the device path's queries update it,
    // the next phase closes it.
    let progress: RefCell<Option<Progress>> = RefCell::new(None);
    let report = bench_eval(
        &options,
        &mut |phase| {
            if let Some(mut p) = progress.borrow_mut().take() {
                p.finish();
            }
            eprintln!("  {phase}...");
        },
        &mut |done, total| {
            progress
                .borrow_mut()
                .get_or_insert_with(|| Progress::new("device path queries"))
                .update(done, total);
        },
    )?;
    if report.exact_queries == options.queries {
        println!(
            "exact f64 CPU path (cpu_exact): {:>10.3} s",
            report.exact_seconds
        );
    } else {
        println!(
            "exact f64 CPU path (cpu_exact): {:>10.3} s for all {} queries, scaled from {:.3} s measured on the first {}",
            report.exact_seconds_all, options.queries, report.exact_seconds, report.exact_queries
        );
    }
    println!(
        "device path (auto):             {:>10.3} s",
        report.device_seconds
    );
    println!(
        "speedup: {:.1}x; max class-score difference {:.3e} and predictions agree on {:.4}% of the {} queries both paths ran; \
         {} selection round(s), {} queries widened",
        report.exact_seconds_all / report.device_seconds,
        report.max_score_difference,
        100.0 * report.prediction_agreement,
        report.exact_queries,
        report.stats.rounds,
        report.stats.widened
    );
    Ok(())
}
