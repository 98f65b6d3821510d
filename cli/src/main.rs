//! `hsat`: the one user-facing command.
//!
//! `main` parses the command line, starts tracing and hands over to one module per
//! subcommand:
//!
//! - [`run`]: `hsat run`, a training job.
//! - [`data`]: `hsat synth` and `hsat data check`.
//! - [`bench`]: `hsat bench step|data`, benchmarks against PyTorch.
//! - [`eval`] (+ [`report`]): `hsat eval`, the paper's kNN and robustness tables.

mod bench;
mod data;
mod eval;
mod report;
mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Hierarchical Self-Supervised Adversarial Training for histopathology encoders.
#[derive(Debug, Parser)]
#[command(name = "hsat", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an encoder with HSAT (or plain HiDisc when the attack is off).
    ///
    /// Loads the config (defaults < FILE < HSAT__SECTION__KEY environment variables <
    /// --set), trains on one worker, prints one progress line per step and writes
    /// checkpoints under <infra.out_dir>/checkpoints.
    ///
    /// Example:
    ///   hsat run --config examples/quickstart.toml --set training.num_epochs=1
    #[command(verbatim_doc_comment)]
    Run(ConfigArgs),

    /// Write a synthetic dataset with patient -> slide -> patch structure to disk.
    ///
    /// OpenSRH layout (2-channel 16-bit TIFF patches, meta/opensrh.json,
    /// meta/train_val_split.json) or a manifest (RGB PNG tiles, manifest.csv).
    /// Classes differ in texture, patients in stain, slides in brightness and blur.
    ///
    /// Example:
    ///   hsat synth --out data/synth --format opensrh --classes 3 --size 64
    #[command(verbatim_doc_comment)]
    Synth(data::SynthArgs),

    /// Evaluate checkpoints as the paper does: kNN accuracy at patch, slide and patient
    /// level, clean and under white-box attacks (PGD, BIM, MI-FGSM, FGSM), plus transfer
    /// between models. Writes results.json, table.md, table.csv and PNG plots into --out.
    ///
    /// Example:
    ///   hsat eval --config examples/quickstart.toml --checkpoint hsat=runs/quickstart --out runs/eval
    #[command(verbatim_doc_comment)]
    Eval(eval::EvalArgs),

    /// Datasets on disk.
    #[command(subcommand)]
    Data(DataCommand),

    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Index the dataset of a config, decode every patch, print a summary table
    /// (patients, slides, patches per class and split) and every problem with advice.
    /// Exits non-zero when the dataset has errors.
    ///
    /// Example:
    ///   hsat data check --config examples/hsat_paper.toml --set data.db_root=/data/opensrh
    #[command(verbatim_doc_comment)]
    Check(data::CheckArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time one full HSAT step (PGD-5, batch 2x2x2x2 views, eps 8/255) against the
    /// PyTorch reference step, alternating in one run; prints medians and ratios.
    ///
    /// Example:
    ///   hsat bench step --backbone resnet18 --image-size 64 --rounds 10
    #[command(verbatim_doc_comment)]
    Step(bench::StepArgs),

    /// Patches per second per core for decode + base processing + the full
    /// augmentation set, against torchvision's pipeline on the same files in the same
    /// run; then the share of step time a training run spends waiting for data.
    ///
    /// Example:
    ///   hsat bench data --size 300 --rounds 3
    #[command(verbatim_doc_comment)]
    Data(bench::DataArgs),
}

/// Where the config comes from.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML config file (see docs/config.md); without it the paper's defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set training.attack.eps=4`; repeatable, applied last.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run::run(args.config, args.set),
        Command::Synth(args) => data::synth(args),
        Command::Eval(args) => eval::eval(args),
        Command::Data(DataCommand::Check(args)) => data::check_dataset(args),
        Command::Bench(BenchCommand::Step(args)) => bench::step(args),
        Command::Bench(BenchCommand::Data(args)) => bench::data(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
