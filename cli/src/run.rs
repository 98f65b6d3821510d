//! `hsat run` (one process): load the config, call
//! [`hsat_worker::train::run::run_training`], print its progress lines and summary.

use std::path::PathBuf;

use hsat_core::config::{self, AttackKind, ConfigSources};
use hsat_core::losses::LevelLosses;
use hsat_worker::train::run::{RunEvent, RunOptions, run_training};
use hsat_worker::train::trainer::StepProgress;

/// Runs (or resumes) a training job described by `file` and `overrides`.
pub fn run(
    file: Option<PathBuf>,
    overrides: Vec<String>,
    device: Option<&str>,
    options: RunOptions,
) -> anyhow::Result<()> {
    let cfg = config::load(&ConfigSources::from_process_env(file, overrides))?;
    let device = hsat_worker::cluster::device::device_from_process(device)?.device;
    let summary = run_training(cfg, device, options, &mut print_event)?;
    if summary.already_finished {
        return Ok(());
    }
    if let Some(share) = summary.waiting_share() {
        println!(
            "hsat: waited for data {:.1}% of the time after the first step ({:.2} s of {:.2} s)",
            100.0 * share,
            summary.waiting_seconds,
            summary.busy_seconds + summary.waiting_seconds
        );
    }
    match summary.final_checkpoint {
        Some(dir) => println!("hsat: done; final checkpoint {}", dir.display()),
        None => println!("hsat: done; nothing to train (0 steps)"),
    }
    Ok(())
}

fn print_event(event: RunEvent<'_>) {
    match event {
        RunEvent::Dataset {
            patients,
            train_patients,
            patches,
            fingerprint,
        } => println!(
            "hsat: dataset {patients} patients ({train_patients} train), {patches} patches, fingerprint {}",
            &fingerprint[..12.min(fingerprint.len())]
        ),
        RunEvent::Start {
            backbone,
            attack,
            device,
            batch_size,
            steps_per_epoch,
            out_dir,
        } => println!(
            "hsat: training {backbone} ({} attack) on {device:?}, {batch_size} patients per step, {steps_per_epoch} steps per epoch, out_dir {}",
            match attack {
                AttackKind::None => "no",
                AttackKind::Pgd => "PGD",
                AttackKind::Pgd2 => "PGD (pgd_2)",
            },
            out_dir.display()
        ),
        RunEvent::Model { parameters } => {
            println!("hsat: model has {parameters} trainable parameters");
        }
        RunEvent::Archived { from, to } => println!(
            "hsat: new job: moved the previous job's checkpoints from {} to {}",
            from.display(),
            to.display()
        ),
        RunEvent::Resumed {
            step,
            total_steps,
            checkpoint,
        } => println!(
            "hsat: resuming the job at step {}/{total_steps} from checkpoint {}",
            step + 1,
            checkpoint.display()
        ),
        RunEvent::Finished {
            total_steps,
            checkpoint,
        } => println!(
            "hsat: the job is finished ({total_steps}/{total_steps} steps, final checkpoint {}); nothing to train (pass --new-job to train it again)",
            checkpoint.display()
        ),
        RunEvent::Step(progress) => println!("{}", progress_line(progress)),
    }
}
/// `step 3/12 epoch 1 lr 1.00e-3 eps 4.50/255 | loss 5.1234 (adv: patient 2.1 slide 1.9 patch 1.1) | step 1.23 s data 0.01 s`
pub fn progress_line(r: &StepProgress) -> String {
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
