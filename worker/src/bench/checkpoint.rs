//! `hsat bench checkpoint`: the stall a checkpoint adds to a training step, written
//! synchronously and asynchronously, in the same run.
//!
//! The step is `hsat bench step`'s (PGD, batch 2x2x2x2 views of random images,
//! eps 8/255; ResNet-50 at 96 px by default), the checkpoint the complete training
//! state (model, AdamW moments and counter, metadata, manifest with SHA-256 of every
//! file), written into a scratch folder. Three phases:
//!
//! 1. `steps` steps without checkpoints: the median step time `t`;
//! 2. `rounds` synchronous checkpoints, each after a step: the stall is the time the
//!    checkpoint blocks training (copy, write, fsync, hash, rename);
//! 3. `rounds` asynchronous checkpoints, each after a step: the stall is the time the
//!    step boundary blocks (copy to host memory, hand-over) plus what the background
//!    write costs the steps it overlaps (their time beyond `t`: both compete for the
//!    same cores), summed until the write completed.
//!
//! On a machine shared with other work, step times vary by more than a write costs;
//! so the benchmark also measures the CPU time of one background write while
//! training is idle: on a machine whose cores training keeps busy, that is the most
//! a background write can take from training (`async_cpu_seconds`).

use std::time::Instant;

use hsat_core::config::Backbone;

use super::step::OurStep;
use super::{BenchError, median};
use crate::checkpoint::writer::WriterOptions;
use crate::checkpoint::{CheckpointMeta, CheckpointWriter, FORMAT_VERSION, Snapshot};

/// What to time.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointBenchOptions {
    /// Backbone, by config name.
    pub backbone: String,
    /// Image side in pixels.
    pub image_size: usize,
    /// Steps timed without checkpoints (after one warm-up step).
    pub steps: usize,
    /// Checkpoints per mode (synchronous, asynchronous).
    pub rounds: usize,
    /// Intra-op threads.
    pub threads: usize,
    /// PGD iterations.
    pub iters: usize,
}

/// What the benchmark measured (seconds are medians over the rounds).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointTiming {
    /// Median step without checkpoints.
    pub step_seconds: f64,
    /// Bytes of one checkpoint's files.
    pub checkpoint_bytes: u64,
    /// Stall of a synchronous checkpoint.
    pub sync_stall: f64,
    /// Stall of an asynchronous checkpoint: `async_blocking + async_overlap`.
    pub async_stall: f64,
    /// Time the step boundary blocks for an asynchronous checkpoint (host copy,
    /// hand-over to the writer thread).
    pub async_blocking: f64,
    /// Extra time of the steps the background write overlapped.
    pub async_overlap: f64,
    /// Steps the background write overlapped (median).
    pub overlapped_steps: f64,
    /// CPU seconds one background write uses (measured with training idle); `None`
    /// where `/proc/self/stat` cannot be read.
    pub async_cpu_seconds: Option<f64>,
}

/// What the benchmark reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointBenchEvent {
    /// The options are consistent; timing starts.
    Started,
    /// A phase finished (`baseline`, `synchronous`, `asynchronous`).
    Phase(&'static str),
    /// The result.
    Timing(CheckpointTiming),
}

/// Runs the benchmark; `on_event` hears about progress and gets the result.
pub fn bench_checkpoint(
    options: &CheckpointBenchOptions,
    mut on_event: impl FnMut(&CheckpointBenchEvent),
) -> Result<CheckpointTiming, BenchError> {
    if options.steps == 0 || options.rounds == 0 {
        return Err(BenchError::Options(format!(
            "--steps and --rounds must be at least 1 (got {} and {})",
            options.steps, options.rounds
        )));
    }
    let backbone: Backbone = options
        .backbone
        .parse()
        .map_err(|e| BenchError::Options(format!("--backbone {}: {e}", options.backbone)))?;
    tch::set_num_threads(options.threads as i32);
    let scratch = tempfile::tempdir().map_err(BenchError::io("creating a scratch folder"))?;
    let writer_for = |asynchronous| {
        CheckpointWriter::new(WriterOptions {
            root: scratch
                .path()
                .join(if asynchronous { "async" } else { "sync" }),
            asynchronous,
            // One checkpoint on disk at a time, as in a long run with retention.
            retention: Some(hsat_core::checkpoint::Retention {
                keep_last: 1,
                keep_every: 0,
            }),
        })
    };
    on_event(&CheckpointBenchEvent::Started);
    let mut step = OurStep::new(backbone, options.image_size, options.iters)?;
    let mut position = 0u64;
    step.run()?; // warm-up
    position += 1;

    let mut plain = Vec::with_capacity(options.steps);
    for _ in 0..options.steps {
        plain.push(step.run()?);
        position += 1;
    }
    let step_seconds = median(&mut plain);
    on_event(&CheckpointBenchEvent::Phase("baseline"));

    let mut sync = writer_for(false);
    let mut sync_stalls = Vec::with_capacity(options.rounds);
    let mut checkpoint_bytes = 0;
    for _ in 0..options.rounds {
        step.run()?;
        position += 1;
        let started = Instant::now();
        let written = sync.submit(snapshot(&step, &options.backbone, position)?)?;
        sync_stalls.push(started.elapsed().as_secs_f64());
        if let Some(dir) = written {
            checkpoint_bytes = folder_bytes(&dir)?;
        }
    }
    on_event(&CheckpointBenchEvent::Phase("synchronous"));

    let mut background = writer_for(true);
    let (mut blocking, mut overlap, mut stalls, mut overlapped) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        step.run()?;
        position += 1;
        let started = Instant::now();
        background.submit(snapshot(&step, &options.backbone, position)?)?;
        let blocked = started.elapsed().as_secs_f64();
        let (mut extra, mut steps) = (0.0, 0usize);
        while background.busy() {
            let seconds = step.run()?;
            position += 1;
            steps += 1;
            extra += (seconds - step_seconds).max(0.0);
            background.poll()?;
        }
        blocking.push(blocked);
        overlap.push(extra);
        stalls.push(blocked + extra);
        overlapped.push(steps as f64);
    }
    background.finish()?;
    // The write's own CPU cost: the process's CPU time while only the writer runs.
    let cpu_before = process_cpu_seconds();
    background.submit(snapshot(&step, &options.backbone, position + 1)?)?;
    let cpu_submitted = process_cpu_seconds();
    while background.busy() {
        std::thread::sleep(std::time::Duration::from_millis(5));
        background.poll()?;
    }
    let async_cpu_seconds = match (cpu_before, cpu_submitted, process_cpu_seconds()) {
        (Some(_), Some(submitted), Some(after)) => Some(after - submitted),
        _ => None,
    };
    on_event(&CheckpointBenchEvent::Phase("asynchronous"));

    let timing = CheckpointTiming {
        step_seconds,
        checkpoint_bytes,
        sync_stall: median(&mut sync_stalls),
        async_stall: median(&mut stalls),
        async_blocking: median(&mut blocking),
        async_overlap: median(&mut overlap),
        overlapped_steps: median(&mut overlapped),
        async_cpu_seconds,
    };
    on_event(&CheckpointBenchEvent::Timing(timing.clone()));
    Ok(timing)
}

/// The complete training state of the benchmark's step, as training takes it.
fn snapshot(step: &OurStep, backbone: &str, position: u64) -> Result<Snapshot, BenchError> {
    let model = step.model.state_snapshot()?;
    let config = hsat_core::config::Config::default().to_json_value();
    Ok(Snapshot {
        backbone: model.backbone,
        backbone_pgd: model.backbone_pgd,
        head: model.head,
        optimizer: step.optimizer.state_snapshot()?,
        meta: CheckpointMeta {
            format_version: FORMAT_VERSION,
            step: position,
            epoch: 0,
            hsat_version: hsat_proto::HSAT_VERSION.to_owned(),
            backbone: backbone.to_owned(),
            feature_dim: step.model.feature_dim(),
            config_fingerprint: hsat_core::checkpoint::config_fingerprint(&config),
            config,
            last_step: None,
            mean_total_loss: None,
            dataset_fingerprint: None,
        },
    })
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, clock ticks
/// of 1/100 s as Linux reports them to user space).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn folder_bytes(dir: &std::path::Path) -> Result<u64, BenchError> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(BenchError::io("listing a checkpoint"))? {
        let entry = entry.map_err(BenchError::io("listing a checkpoint"))?;
        total += entry
            .metadata()
            .map_err(BenchError::io("reading a checkpoint file's size"))?
            .len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(backbone: &str, steps: usize, rounds: usize) -> CheckpointBenchOptions {
        CheckpointBenchOptions {
            backbone: backbone.to_owned(),
            image_size: 16,
            steps,
            rounds,
            threads: 1,
            iters: 1,
        }
    }

    #[test]
    fn zero_steps_or_rounds_and_unknown_backbones_are_refused_before_timing() {
        for (opts, expected) in [
            (
                options("resnet50", 0, 1),
                "--steps and --rounds must be at least 1 (got 0 and 1)",
            ),
            (
                options("resnet50", 1, 0),
                "--steps and --rounds must be at least 1 (got 1 and 0)",
            ),
        ] {
            let mut events = Vec::new();
            let err = bench_checkpoint(&opts, |e| events.push(e.clone())).unwrap_err();
            assert!(
                matches!(&err, BenchError::Options(m) if m == expected),
                "{err:?}"
            );
            assert_eq!(events, []);
        }
        let err = bench_checkpoint(&options("resnet7", 1, 1), |_| {}).unwrap_err();
        assert!(
            matches!(&err, BenchError::Options(m) if m.starts_with("--backbone resnet7: ")),
            "{err:?}"
        );
    }

    /// A tiny model end to end: every phase runs and the numbers are consistent.
    #[test]
    fn a_small_run_reports_every_phase_and_consistent_numbers() -> Result<(), BenchError> {
        let mut events = Vec::new();
        let timing = bench_checkpoint(&options("small_cnn", 2, 2), |e| events.push(e.clone()))?;
        assert_eq!(
            events[..4],
            [
                CheckpointBenchEvent::Started,
                CheckpointBenchEvent::Phase("baseline"),
                CheckpointBenchEvent::Phase("synchronous"),
                CheckpointBenchEvent::Phase("asynchronous"),
            ]
        );
        assert!(timing.step_seconds > 0.0 && timing.sync_stall > 0.0);
        assert!(timing.checkpoint_bytes > 0);
        assert!(timing.async_blocking > 0.0 && timing.async_stall >= timing.async_blocking);
        Ok(())
    }
}
