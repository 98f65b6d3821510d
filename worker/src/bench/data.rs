//! Patches per second per core for decode + base processing + the full
//! augmentation set against torchvision's pipeline (`bench/augment_reference.py`)
//! on the same generated files in the same run; then the share of step time a
//! training run spends waiting for data.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use hsat_core::config::{AttackKind, Backbone, Config, DataSource};
use hsat_core::dataset::{DatasetIndex, Split};
use hsat_core::rng::{SplitMix64, derive_seed};
use hsat_core::sampler::balanced_patients;
use hsat_data::image::{AugmentConfig, augment, base_process, decode_file};
use hsat_data::loader::LoaderSpec;
use hsat_data::synth::{SynthFormat, SynthSpec, synthesize};
use tch::Device;

use super::{BenchError, median, script};
use crate::data::FileSource;
use crate::train::trainer::Trainer;

/// What to measure.
#[derive(Debug, Clone)]
pub struct DataBenchOptions {
    /// Patch side of the generated dataset, in pixels.
    pub size: usize,
    /// Timed passes over the files per implementation.
    pub rounds: usize,
    /// Patches per slide of the generated dataset (3 classes x 3 patients x 2 slides).
    pub patches: usize,
    /// Optimiser steps of the training run that measures data wait (0 skips it).
    pub train_steps: usize,
    /// Python interpreter with torch 2.13.
    pub python: PathBuf,
}

/// What the benchmark reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum DataBenchEvent {
    /// The dataset is generated; timing starts.
    Generated {
        /// Patch files timed per pass.
        files: usize,
    },
    /// Median throughput of both pipelines, patches per second on one core.
    Throughput {
        /// This crate's pipeline (hsat-data).
        hsat: f64,
        /// torchvision's.
        torchvision: f64,
    },
    /// The training run's wait for data (only with `train_steps > 0`).
    DataWait {
        /// Training image side in pixels.
        image_size: usize,
        /// Steps counted (all but the first, which includes start-up).
        steps: usize,
        /// Seconds the loop waited for batches.
        waiting: f64,
        /// Seconds of step time in all (computing + waiting).
        total: f64,
    },
}

/// Runs the data benchmark in a scratch folder; `on_event` gets each result as soon
/// as it is measured.
pub fn bench_data(
    options: &DataBenchOptions,
    mut on_event: impl FnMut(&DataBenchEvent),
) -> Result<(), BenchError> {
    let dir = tempfile::tempdir().map_err(BenchError::io("creating a scratch directory"))?;
    let root = dir.path().join("srh");
    let spec = SynthSpec {
        out: root.clone(),
        format: SynthFormat::OpenSrh,
        classes: 3,
        patients_per_class: 3,
        val_patients_per_class: 1,
        slides_per_patient: 2,
        patches_per_slide: options.patches,
        size: options.size,
        seed: 0,
        stain_spread: 1.0,
    };
    synthesize(&spec, &mut |_, _| {})?;
    let mut files = Vec::new();
    collect_files(&root.join("studies"), "tif", &mut files)?;
    files.sort();
    on_event(&DataBenchEvent::Generated { files: files.len() });

    let cfg = AugmentConfig {
        rand_aug_prob: 0.3,
        dynamic: false,
        strength: 1.0,
        out_size: options.size,
    };
    let ours = |round: u64| -> Result<f64, BenchError> {
        let started = Instant::now();
        for (i, path) in files.iter().enumerate() {
            let base = base_process(&decode_file(path)?);
            let mut rng = SplitMix64::new(derive_seed(round, &[i as u64]));
            let view = augment(&base, &cfg, &mut rng);
            if view.width != options.size {
                return Err(BenchError::Reference(format!(
                    "augmentation returned {} px",
                    view.width
                )));
            }
        }
        Ok(files.len() as f64 / started.elapsed().as_secs_f64())
    };
    let script = script("augment_reference.py");
    let theirs = || -> Result<f64, BenchError> {
        let out = Command::new(&options.python)
            .arg(&script)
            .args(["--size", &options.size.to_string()])
            .args(&files)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .map_err(|source| BenchError::StartReference {
                script: script.clone(),
                python: options.python.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(BenchError::Reference(format!(
                "the torchvision reference failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .split_once('/')
            .and_then(|(n, secs)| Some(n.parse::<f64>().ok()? / secs.parse::<f64>().ok()?))
            .ok_or_else(|| {
                BenchError::Reference(format!("unexpected reference output {:?}", text.trim()))
            })
    };
    let (mut ours_rates, mut their_rates) = (Vec::new(), Vec::new());
    ours(u64::MAX)?; // warm-up: page cache, allocator
    for round in 0..options.rounds {
        ours_rates.push(ours(round as u64)?);
        their_rates.push(theirs()?);
    }
    on_event(&DataBenchEvent::Throughput {
        hsat: median(&mut ours_rates),
        torchvision: median(&mut their_rates),
    });

    if options.train_steps > 0 {
        on_event(&data_wait(&root, options.size, options.train_steps)?);
    }
    Ok(())
}

/// Trains ResNet-18 with PGD-5 from the generated files and measures the share of
/// time the training loop waited for the loader (after the first step, which
/// includes start-up).
fn data_wait(root: &Path, size: usize, steps: usize) -> Result<DataBenchEvent, BenchError> {
    let train_size = size.min(96);
    let mut cfg = Config::default();
    cfg.data.source = DataSource::OpenSrh;
    cfg.data.db_root = root.to_path_buf();
    cfg.data.image_size = train_size;
    cfg.model.backbone = Backbone::ResNet18;
    cfg.training.batch_size = 3;
    cfg.training.attack.kind = AttackKind::Pgd;
    cfg.training.only_adv = true;
    cfg.training.save_checkpoint_interval = 0;
    let scratch = tempfile::tempdir().map_err(BenchError::io("creating a scratch directory"))?;
    cfg.infra.out_dir = scratch.path().to_path_buf();
    let index = DatasetIndex::load(&cfg.data)?;
    let balanced = balanced_patients(&index, Split::Train, cfg.infra.seed, true);
    let steps_per_epoch =
        hsat_core::sampler::steps_per_epoch(balanced.len(), cfg.training.batch_size) as usize;
    cfg.training.num_epochs = steps.div_ceil(steps_per_epoch).max(1);
    let spec = LoaderSpec {
        seed: cfg.infra.seed,
        batch_size: cfg.training.batch_size,
        sampling: cfg.data.hidisc,
        image_size: train_size,
        rand_aug_prob: cfg.data.rand_aug_prob,
        dynamic_aug: true,
        num_epochs: cfg.training.num_epochs,
        threads: hsat_core::config::available_cores(),
        prefetch: 2,
    };
    let mut source = FileSource::start(Arc::new(index), Arc::new(balanced), spec, 0)?;
    let mut trainer = Trainer::new(cfg, Device::Cpu)?;
    let (mut busy, mut waiting, mut counted) = (0.0, 0.0, 0);
    trainer.fit(&mut source, |r| {
        if r.step > 0 {
            busy += r.step_seconds;
            waiting += r.data_seconds;
            counted += 1;
        }
    })?;
    Ok(DataBenchEvent::DataWait {
        image_size: train_size,
        steps: counted,
        waiting,
        total: busy + waiting,
    })
}

fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<(), BenchError> {
    let listing = || format!("listing {}", dir.display());
    for entry in std::fs::read_dir(dir).map_err(BenchError::io(listing()))? {
        let path = entry.map_err(BenchError::io(listing()))?.path();
        if path.is_dir() {
            collect_files(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}
