//! `hsat run`: load and validate the config, index and check the dataset, then train
//! on this machine.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use hsat_core::config::{self, AttackKind, Config, ConfigSources, DataSource};
use hsat_core::dataset::{DatasetIndex, Split, check};
use hsat_core::losses::LevelLosses;
use hsat_core::sampler::balanced_patients;
use hsat_data::loader::LoaderSpec;
use hsat_worker::data::synthetic::{SyntheticSource, SyntheticSpec};
use hsat_worker::data::{BatchSource, FileSource};
use hsat_worker::train::trainer::{StepProgress, Trainer};
use tch::Device;

/// Runs a training job described by `file` and `overrides`.
pub fn run(file: Option<PathBuf>, overrides: Vec<String>) -> anyhow::Result<()> {
    let cfg = config::load(&ConfigSources::from_process_env(file, overrides))?;
    let device = Device::cuda_if_available();
    let (mut source, fingerprint) = batch_source(&cfg, device)?;
    let log_every = cfg.infra.log_every.max(1) as u64;
    println!(
        "hsat: training {} ({} attack) on {:?}, {} patients per step, {} steps per epoch, out_dir {}",
        cfg.model.backbone,
        match cfg.training.attack.kind {
            AttackKind::None => "no",
            AttackKind::Pgd => "PGD",
        },
        device,
        cfg.training.batch_size,
        source.steps_per_epoch(),
        cfg.infra.out_dir.display()
    );
    let mut trainer = Trainer::new(cfg, device)?;
    if let Some(fingerprint) = fingerprint {
        trainer.set_dataset_fingerprint(fingerprint);
    }
    println!(
        "hsat: model has {} trainable parameters",
        trainer.model().num_parameters()
    );
    let (mut busy, mut waiting) = (0.0f64, 0.0f64);
    let last = trainer.fit(source.as_mut(), |report| {
        // The first step includes start-up (thread pool, first batch): keep it out.
        if report.step > 0 {
            busy += report.step_seconds;
            waiting += report.data_seconds;
        }
        if report.step % log_every == 0
            || report.step + 1 == report.total_steps
            || report.checkpoint.is_some()
        {
            println!("{}", progress_line(report));
        }
    })?;
    if busy + waiting > 0.0 {
        println!(
            "hsat: waited for data {:.1}% of the time after the first step ({:.2} s of {:.2} s)",
            100.0 * waiting / (busy + waiting),
            waiting,
            busy + waiting
        );
    }
    match last {
        Some(dir) => println!("hsat: done; final checkpoint {}", dir.display()),
        None => println!("hsat: done; nothing to train (0 steps)"),
    }
    Ok(())
}

/// The configured source of training batches; file datasets are indexed and checked
/// for missing files before any training starts. Returns the index fingerprint too.
fn batch_source(
    cfg: &Config,
    device: Device,
) -> anyhow::Result<(Box<dyn BatchSource>, Option<String>)> {
    let sampling = cfg.data.hidisc;
    if let DataSource::Synthetic = cfg.data.source {
        let spec = SyntheticSpec {
            num_patients: cfg.data.synthetic.num_patients,
            num_classes: cfg.data.synthetic.num_classes,
            batch_size: cfg.training.batch_size,
            slides: sampling.num_slide_samples,
            patches: sampling.num_patch_samples,
            views: sampling.num_transforms,
            image_size: cfg.data.image_size,
            seed: cfg.infra.seed,
        };
        return Ok((Box::new(SyntheticSource::new(spec, device)?), None));
    }
    let index = DatasetIndex::load(&cfg.data).context("cannot index the dataset")?;
    let report = check::quick_check(&index);
    if !report.is_ok() {
        println!("{}", report.render());
        bail!("the dataset has errors (listed above); `hsat data check` gives the full report");
    }
    println!(
        "hsat: dataset {} patients ({} train), {} patches, fingerprint {}",
        index.patients.len(),
        index.patients_in(Split::Train).len(),
        index.num_patches(),
        &index.fingerprint[..12.min(index.fingerprint.len())]
    );
    let balanced = balanced_patients(
        &index,
        Split::Train,
        cfg.infra.seed,
        cfg.data.balance_study_per_class,
    );
    let spec = LoaderSpec::from_config(cfg);
    let fingerprint = index.fingerprint.clone();
    let source = FileSource::start(Arc::new(index), Arc::new(balanced), spec, 0)?;
    Ok((Box::new(source), Some(fingerprint)))
}

/// `step 3/12 epoch 1 lr 1.00e-3 eps 4.50/255 | loss 5.1234 (adv: patient 2.1 slide 1.9 patch 1.1) | step 1.23 s data 0.01 s`
fn progress_line(r: &StepProgress) -> String {
    let levels = |name: &str, v: &LevelLosses| {
        format!(
            "{name}: patient {:.4} slide {:.4} patch {:.4}",
            v.patient, v.slide, v.patch
        )
    };
    let mut parts = Vec::new();
    if let Some(adv) = &r.losses.adversarial {
        parts.push(levels("adv", adv));
    }
    if let Some(clean) = &r.losses.clean {
        parts.push(levels("clean", clean));
    }
    let mut line = format!(
        "step {}/{} epoch {} lr {:.2e} eps {:.2}/255 | loss {:.4} ({}) | step {:.3} s data {:.3} s",
        r.step + 1,
        r.total_steps,
        r.epoch,
        r.lr,
        r.eps * 255.0,
        r.losses.total,
        parts.join("; "),
        r.step_seconds,
        r.data_seconds
    );
    if let Some(dir) = &r.checkpoint {
        line.push_str(&format!(" | checkpoint {}", dir.display()));
    }
    line
}
