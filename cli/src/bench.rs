//! `hsat bench step`, `hsat bench data` and `hsat bench checkpoint`: parse the
//! flags, run [`hsat_worker::bench::step`] / [`hsat_worker::bench::data`] /
//! [`hsat_worker::bench::checkpoint`] and print their tables.

use std::path::PathBuf;

use hsat_worker::bench::checkpoint::{
    CheckpointBenchEvent, CheckpointBenchOptions, bench_checkpoint,
};
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

/// Options of `hsat bench checkpoint`.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Backbone of the training step.
    #[arg(long, default_value = "resnet50")]
    backbone: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 96)]
    image_size: usize,
    /// Steps timed without checkpoints (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Checkpoints per mode (synchronous, then asynchronous).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// PGD iterations of the step.
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

/// Runs the checkpoint benchmark and prints the stalls.
pub fn checkpoint(args: CheckpointArgs) -> anyhow::Result<()> {
    let options = CheckpointBenchOptions {
        backbone: args.backbone,
        image_size: args.image_size,
        steps: args.steps,
        rounds: args.rounds,
        threads: args.threads,
        iters: args.iters,
    };
    bench_checkpoint(&options, |event| match event {
        CheckpointBenchEvent::Started => println!(
            "hsat bench checkpoint: {} @ {} px, PGD-{} step (batch 2x2x2x2 views), {} threads; {} steps plain, {} checkpoints per mode",
            options.backbone,
            options.image_size,
            options.iters,
            options.threads,
            options.steps,
            options.rounds
        ),
        CheckpointBenchEvent::Phase(phase) => println!("  {phase} phase done"),
        CheckpointBenchEvent::Timing(t) => {
            let share = |s: f64| 100.0 * s / t.step_seconds;
            println!(
                "step without checkpoint: {:.3} s; checkpoint {:.1} MB (model, AdamW moments, manifest)",
                t.step_seconds,
                t.checkpoint_bytes as f64 / 1e6
            );
            println!(
                "{:<14} {:>10} {:>12}",
                "checkpoint", "stall (s)", "% of a step"
            );
            println!(
                "{:<14} {:>10.3} {:>11.1}%",
                "synchronous",
                t.sync_stall,
                share(t.sync_stall)
            );
            println!(
                "{:<14} {:>10.3} {:>11.1}%   (blocking {:.3} s + overlapped steps slower by {:.3} s over {} steps)",
                "asynchronous",
                t.async_stall,
                share(t.async_stall),
                t.async_blocking,
                t.async_overlap,
                t.overlapped_steps
            );
            if let Some(cpu) = t.async_cpu_seconds {
                println!(
                    "a background write uses {cpu:.3} s of CPU: at most {:.3} s ({:.1}% of a step) taken from training on busy cores, plus the blocking {:.3} s",
                    cpu,
                    share(cpu),
                    t.async_blocking
                );
            }
            println!(
                "synchronous / asynchronous stall: {:.1}x (target: asynchronous < 5% of a step)",
                t.sync_stall / t.async_stall
            );
        }
    })?;
    Ok(())
}
