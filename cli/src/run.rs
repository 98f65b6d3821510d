//! `hsat run`: load and validate the config, then train on this machine.

use std::path::PathBuf;

use hsat_core::config::{self, AttackKind, ConfigSources, DataSource};
use hsat_worker::data::synthetic::{SyntheticSource, SyntheticSpec};
use hsat_worker::train::trainer::{StepReport, Trainer};
use tch::Device;

/// Runs a training job described by `file` and `overrides`.
pub fn run(file: Option<PathBuf>, overrides: Vec<String>) -> anyhow::Result<()> {
    let sources = ConfigSources::from_process_env(file, overrides);
    let cfg = config::load(&sources)?;
    let DataSource::Synthetic = cfg.data.source;
    let spec = SyntheticSpec {
        num_patients: cfg.data.synthetic.num_patients,
        num_classes: cfg.data.synthetic.num_classes,
        batch_size: cfg.training.batch_size,
        slides: cfg.data.hidisc.num_slide_samples,
        patches: cfg.data.hidisc.num_patch_samples,
        views: cfg.data.hidisc.num_transforms,
        image_size: cfg.data.image_size,
        seed: cfg.infra.seed,
    };
    let device = Device::cuda_if_available();
    let mut source = SyntheticSource::new(spec, device)?;
    let log_every = cfg.infra.log_every.max(1) as u64;
    println!(
        "hsat: training {} ({} attack, loss levels patient/slide/patch) on {:?}, {} patients per step, out_dir {}",
        cfg.model.backbone,
        match cfg.training.attack.kind {
            AttackKind::None => "no",
            AttackKind::Pgd => "PGD",
        },
        device,
        cfg.training.batch_size,
        cfg.infra.out_dir.display()
    );
    let mut trainer = Trainer::new(cfg, device)?;
    println!(
        "hsat: model has {} trainable parameters",
        trainer.model().num_parameters()
    );
    let last = trainer.fit(&mut source, |report| {
        if report.step % log_every == 0
            || report.step + 1 == report.total_steps
            || report.checkpoint.is_some()
        {
            println!("{}", progress_line(report));
        }
    })?;
    match last {
        Some(dir) => println!("hsat: done; final checkpoint {}", dir.display()),
        None => println!("hsat: done; nothing to train (0 steps)"),
    }
    Ok(())
}

/// `step 3/12 epoch 1 lr 1.00e-3 eps 4.50/255 | loss 5.1234 (adv: patient 2.1 slide 1.9 patch 1.1) | 1.23 s`
fn progress_line(r: &StepReport) -> String {
    let levels = |name: &str, v: &hsat_worker::train::loss::LevelValues| {
        format!(
            "{name}: patient {:.4} slide {:.4} patch {:.4}",
            v.patient, v.slide, v.patch
        )
    };
    let mut parts = Vec::new();
    if let Some(adv) = &r.losses.adv {
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
