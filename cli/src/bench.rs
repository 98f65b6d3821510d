//! `hsat bench step` and `hsat bench data`: parse the flags, run
//! [`hsat_worker::bench::step`] / [`hsat_worker::bench::data`] and print their
//! tables.

use std::path::PathBuf;

use hsat_worker::bench::data::{DataBenchEvent, DataBenchOptions, bench_data};
use hsat_worker::bench::default_python;
use hsat_worker::bench::step::{StepBenchEvent, StepBenchOptions, bench_step};

/// Options of `hsat bench step`.
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Backbones to time (comma separated); each with its image size from --image-size.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["resnet18".to_string(), "resnet50".to_string()])]
    backbone: Vec<String>,
    /// Image side per backbone, in the same order (the targets: 64 and 96).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 96])]
    image_size: Vec<usize>,
    /// Timed steps per implementation (after one warm-up step each).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Intra-op threads for both implementations.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// PGD iterations.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Runs the benchmark and prints one line per backbone.
pub fn step(args: StepArgs) -> anyhow::Result<()> {
    let options = StepBenchOptions {
        backbones: args.backbone,
        image_sizes: args.image_size,
        rounds: args.rounds,
        threads: args.threads,
        iters: args.iters,
        python: args.python.unwrap_or_else(default_python),
    };
    bench_step(&options, |event| match event {
        StepBenchEvent::Started => {
            println!(
                "hsat bench step: full HSAT step (PGD-{}, batch 2x2x2x2 views, eps 8/255), {} threads, {} rounds",
                options.iters, options.threads, options.rounds
            );
            println!(
                "{:<10} {:>6} {:>12} {:>12} {:>8}",
                "backbone", "px", "hsat (s)", "torch (s)", "speedup"
            );
        }
        StepBenchEvent::Timing(timing) => println!(
            "{:<10} {:>6} {:>12.4} {:>12.4} {:>7.2}x",
            timing.backbone,
            timing.image_size,
            timing.hsat_seconds,
            timing.torch_seconds,
            timing.torch_seconds / timing.hsat_seconds
        ),
    })?;
    Ok(())
}

/// Options of `hsat bench data`.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Patch side of the generated dataset, in pixels.
    #[arg(long, default_value_t = 300)]
    size: usize,
    /// Timed passes over the files per implementation.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Patches per slide of the generated dataset (3 classes x 3 patients x 2 slides).
    #[arg(long, default_value_t = 8)]
    patches: usize,
    /// Optimiser steps of the training run that measures data wait (0 skips it).
    #[arg(long, default_value_t = 6)]
    train_steps: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Runs the data benchmark.
pub fn data(args: DataArgs) -> anyhow::Result<()> {
    let options = DataBenchOptions {
        size: args.size,
        rounds: args.rounds,
        patches: args.patches,
        train_steps: args.train_steps,
        python: args.python.unwrap_or_else(default_python),
    };
    bench_data(&options, |event| match *event {
        DataBenchEvent::Generated { files } => println!(
            "hsat bench data: {} OpenSRH-style patches of {}x{} px, decode + base processing + full augmentation (p = 0.3), one thread each",
            files, options.size, options.size
        ),
        DataBenchEvent::Throughput { hsat, torchvision } => {
            println!("{:<28} {:>12}", "pipeline", "patches/s/core");
            println!("{:<28} {:>12.1}", "hsat (Rust)", hsat);
            println!("{:<28} {:>12.1}", "torchvision 0.28", torchvision);
            println!("speedup per core: {:.2}x", hsat / torchvision);
        }
        DataBenchEvent::DataWait {
            image_size,
            steps,
            waiting,
            total,
        } => println!(
            "training run (ResNet-18, PGD-5, 3 patients x 2 x 2 x 2 views at {image_size} px, {steps} steps after the first): waited for data {:.2}% of step time ({:.3} s of {:.2} s)",
            100.0 * waiting / total,
            waiting,
            total
        ),
    })?;
    Ok(())
}
