//! `hsat repro`: the paper's comparison as an experiment. Parses the sizes, calls
//! [`hsat_worker::repro::run_repro`], prints its progress (with an ETA over the
//! seeds) and the report.

use std::path::PathBuf;
use std::time::Instant;

use hsat_core::config::{self, ConfigSources};
use hsat_data::synth::{SynthFormat, SynthSpec};
use hsat_worker::repro::{ReproEvent, ReproRequest, run_repro};
use hsat_worker::train::run::RunEvent;

use crate::progress::Progress;

/// Options of `hsat repro`.
#[derive(Debug, clap::Args)]
pub struct ReproArgs {
    /// The HSAT config both methods train from (HiDisc drops the attack); its
    /// `[eval]` section sets the evaluation. examples/repro.toml is sized for about
    /// 40 minutes on 2 CPU cores.
    #[arg(long, short)]
    config: PathBuf,
    /// Override one key of that config, e.g. `--set training.num_epochs=4`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Folder for the dataset, the runs, the evaluations and the report. Running
    /// again with the same settings completes an interrupted experiment.
    #[arg(long, default_value = "runs/repro")]
    out: PathBuf,
    /// Training seeds per method: infra.seed, infra.seed + 1, ...
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Classes of the generated dataset (OpenSRH has 7).
    #[arg(long, default_value_t = 7)]
    classes: usize,
    /// Train patients per class.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    train_patients_per_class: usize,
    /// Val patients per class (the patient-level estimate rests on them).
    #[arg(long, default_value_t = 6, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    val_patients_per_class: usize,
    /// Slides per patient.
    #[arg(long, default_value_t = 2)]
    slides: usize,
    /// Patches per slide.
    #[arg(long, default_value_t = 4)]
    patches: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seed of the generated dataset (the same for every training seed).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Stain spread of the generated patients (see `hsat synth --help`).
    #[arg(long, default_value_t = 0.1)]
    stain_spread: f64,
    /// Bootstrap resamples of the difference's interval.
    #[arg(long, default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    resamples: usize,
    /// The verdict's clean-accuracy margin: HSAT may lose at most this many points.
    #[arg(long, default_value_t = 5.0, value_parser = points)]
    clean_margin: f64,
    /// Where to run: auto, cpu, cuda or cuda:N (also HSAT_DEVICE).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

/// A margin in accuracy points: finite, 0 to 100.
fn points(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a number of points from 0 to 100"))
    }
}

/// Runs the experiment and prints the report.
pub fn repro(args: ReproArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let sources = ConfigSources::from_process_env(Some(args.config), args.set);
    let base_seed = config::load(&sources)?.infra.seed;
    let device = hsat_worker::cluster::device::device_from_process(args.device.as_deref())?.device;
    let request = ReproRequest {
        sources,
        dataset: SynthSpec {
            out: args.out.join("data"),
            format: SynthFormat::OpenSrh,
            classes: args.classes,
            patients_per_class: args.train_patients_per_class + args.val_patients_per_class,
            val_patients_per_class: args.val_patients_per_class,
            slides_per_patient: args.slides,
            patches_per_slide: args.patches,
            size: args.size,
            seed: args.data_seed,
            stain_spread: args.stain_spread,
        },
        seeds: (0..args.seeds)
            .map(|i| {
                base_seed.checked_add(i).ok_or_else(|| {
                    anyhow::anyhow!(
                        "infra.seed {base_seed} + {} seeds passes the largest seed: choose a smaller infra.seed",
                        args.seeds
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
        out: args.out,
        resamples: args.resamples,
        clean_margin: args.clean_margin / 100.0,
        device,
    };
    let mut progress: Option<Progress> = None;
    let mut seeds_done = 0_usize;
    let mut seconds_spent = 0.0;
    let mut seeds_run = 0_usize;
    let total = request.seeds.len();
    let outcome = run_repro(&request, &mut |event| match event {
        ReproEvent::Plan {
            seeds,
            runs_left,
            evals_left,
        } => println!(
            "hsat repro: {} seeds ({}), {runs_left} training runs and {evals_left} evaluations to do, in {}",
            seeds.len(),
            seeds
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            request.out.display()
        ),
        ReproEvent::Synth { done, total } => {
            progress
                .get_or_insert_with(|| Progress::new("writing the dataset"))
                .update(done, total);
            if done == total
                && let Some(mut p) = progress.take()
            {
                p.finish();
            }
        }
        ReproEvent::DatasetReused(dir) => {
            println!("hsat repro: the dataset in {} is reused", dir.display());
        }
        ReproEvent::Train {
            seed,
            method,
            event,
        } => match event {
            RunEvent::Start { backbone, .. } => {
                println!("hsat repro: seed {seed}: training {method} ({backbone})");
            }
            RunEvent::Resumed {
                step, total_steps, ..
            } => println!(
                "hsat repro: seed {seed}: {method} resumes at step {}/{total_steps}",
                step + 1
            ),
            RunEvent::Finished { .. } => {
                println!("hsat repro: seed {seed}: {method} is already trained");
            }
            RunEvent::Step(step) => {
                println!(
                    "  [seed {seed} {method}] {}",
                    crate::run::progress_line(step)
                );
            }
            _ => {}
        },
        ReproEvent::Eval { seed, event } => {
            if let hsat_worker::eval::EvalEvent::Plan(_) = event {
                println!("hsat repro: seed {seed}: evaluating both models");
            }
            crate::eval::print_event(event, &mut progress);
        }
        ReproEvent::SeedDone {
            seed,
            reused,
            train_seconds,
            eval_seconds,
        } => {
            seeds_done += 1;
            if !reused {
                seeds_run += 1;
                seconds_spent += train_seconds + eval_seconds;
            }
            let eta = if seeds_run > 0 && seeds_done < total {
                format!(
                    ", about {:.0} min left",
                    seconds_spent / seeds_run as f64 * (total - seeds_done) as f64 / 60.0
                )
            } else {
                String::new()
            };
            println!(
                "hsat repro: seed {seed} done{} (training {train_seconds:.0} s, evaluation {eval_seconds:.0} s); {seeds_done} of {total} seeds{eta}",
                if reused { ", stored earlier" } else { "" }
            );
        }
    })?;
    println!("\n{}", outcome.report);
    println!(
        "hsat repro: {} in {:.1} min; wrote {}",
        if outcome.summary.verdict.holds {
            "the paper's pattern holds"
        } else {
            "the paper's pattern does not hold"
        },
        started.elapsed().as_secs_f64() / 60.0,
        outcome
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
