//! `hsat synth` and `hsat data check`: making and checking datasets on disk. The work
//! is in hsat-data ([`synthesize`], [`dataset_check::check_dataset`]); neither path touches libtorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use hsat_core::config::{self, ConfigSources};
use hsat_data::check::{self as dataset_check, CheckEvent};
use hsat_data::synth::{SynthFormat, SynthSpec, synthesize};

use crate::progress::Progress;

/// Options of `hsat synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Directory to create (must be empty or absent).
    #[arg(long)]
    out: PathBuf,
    /// `opensrh` (2-channel 16-bit TIFF + meta JSON) or `manifest` (RGB PNG + CSV).
    #[arg(long, default_value = "opensrh")]
    format: SynthFormat,
    /// Number of classes (2 to 7).
    #[arg(long, default_value_t = 3)]
    classes: usize,
    /// Patients per class.
    #[arg(long, default_value_t = 4)]
    patients_per_class: usize,
    /// Of those, patients per class in the validation split.
    #[arg(long, default_value_t = 1)]
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
    /// Seed: the same options and seed give byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction (0 to 1) of the stain ranges patients spread over; lower values make
    /// class morphology the strongest signal shared within a patient.
    #[arg(long, default_value_t = 1.0)]
    stain_spread: f64,
}

/// Writes a synthetic dataset and prints how to train on it.
pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let spec = SynthSpec {
        out: args.out.clone(),
        format: args.format,
        classes: args.classes,
        patients_per_class: args.patients_per_class,
        val_patients_per_class: args.val_patients_per_class,
        slides_per_patient: args.slides,
        patches_per_slide: args.patches,
        size: args.size,
        seed: args.seed,
        stain_spread: args.stain_spread,
    };
    let started = Instant::now();
    let mut progress = Progress::new("writing patches");
    let summary = synthesize(&spec, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    println!(
        "hsat synth: {} patients, {} slides, {} patches ({:.1} MB) in {} in {:.1} s",
        summary.patients,
        summary.slides,
        summary.patches,
        summary.bytes as f64 / 1e6,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "train on it with these config lines:\n{}",
        summary.config_hint
    );
    Ok(())
}

/// Options of `hsat data check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The training config whose `data` section names the dataset.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set data.db_root=/data/opensrh`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Indexes the dataset, decodes every patch, prints the summary table and the problems.
/// Fails (non-zero exit) when the dataset has errors.
pub fn check_dataset(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = config::load(&ConfigSources::from_process_env(args.config, args.set))?;
    // Started once the index is read, so the rate counts decoding only.
    let mut progress: Option<Progress> = None;
    let report = dataset_check::check_dataset(&cfg.data, &mut |event| match event {
        CheckEvent::Indexed(index) => {
            println!(
                "hsat data check: {} patients, {} patches, fingerprint {}",
                index.patients.len(),
                index.num_patches(),
                index.fingerprint
            );
            progress = Some(Progress::new("decoding patches"));
        }
        CheckEvent::Progress { done, total } => {
            if let Some(progress) = progress.as_mut() {
                progress.update(done, total);
            }
        }
    })?;
    if let Some(progress) = progress.as_mut() {
        progress.finish();
    }
    println!("{}", report.render());
    if !report.is_ok() {
        bail!("the dataset has errors (listed above); fix them before training");
    }
    println!("hsat data check: ok");
    Ok(())
}
