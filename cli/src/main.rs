//! `hsat`: the one user-facing command.
//!
//! `main` parses the command line, starts tracing and hands over to one module per
//! subcommand:
//!
//! - [`run`]: `hsat run`, a training job on this machine (one process).
//! - [`cluster`]: `hsat run --workers N`, `hsat coordinator`, `hsat worker`,
//!   `hsat status`: distributed jobs.
//! - [`data`]: `hsat synth` and `hsat data check`.
//! - [`bench`](mod@bench): `hsat bench step|data`, benchmarks against PyTorch, and
//!   `hsat bench checkpoint`.
//! - [`bench_eval`]: `hsat bench eval`, the kNN of `hsat eval` on the CPU in f64
//!   against the device path.
//! - [`bench_recovery`]: `hsat bench recovery`, time to the next commit after a kill -9.
//! - [`bench_sync`]: `hsat bench sync`, gradient synchronisation against PyTorch DDP.
//! - [`eval`]: `hsat eval`, the paper's kNN and robustness tables.
//! - [`repro`]: `hsat repro`, HSAT against HiDisc over several seeds, with intervals.
//! - [`plot`](mod@plot): `hsat plot`, PNG curves of a run's `metrics.jsonl`.
//! - [`progress`]: the progress line of long stages.
//! - [`exit`]: the exit status of each way a command ends ([`hsat_core::exit`]).

mod bench;
mod bench_control;
mod bench_eval;
mod bench_recovery;
mod bench_sync;
mod cluster;
mod data;
mod eval;
mod exit;
mod plot;
mod progress;
mod repro;
mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Hierarchical Self-Supervised Adversarial Training for histopathology encoders.
#[derive(Debug, Parser)]
#[command(name = "hsat", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: hsat_coordinator::logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an encoder with HSAT (or plain HiDisc when the attack is off).
    ///
    /// Loads the config (defaults < FILE < HSAT__SECTION__KEY environment variables <
    /// --set), trains, prints one progress line per step and writes checkpoints under
    /// <infra.out_dir>/checkpoints. Without --workers it trains in this process; with
    /// --workers N it runs a coordinator here and N worker processes on this machine
    /// that split every step and average gradients (Gloo all-reduce); Ctrl-C stops all.
    /// A run in an out_dir that holds the same job resumes it (in one process from
    /// the newest complete checkpoint, exactly: same parameters as if never stopped;
    /// with --workers at the ledger's committed step); a finished job is not trained
    /// again; another job is refused, naming the differing keys, unless --new-job.
    ///
    /// Example:
    ///   hsat run --config examples/quickstart.toml --workers 2
    ///   hsat run --config examples/quickstart.toml --resume
    #[command(verbatim_doc_comment, after_help = hsat_core::exit::EXIT_CODES_HELP)]
    Run(RunArgs),

    /// Run the coordinator of a distributed job: it waits for --workers workers,
    /// hands out the steps, commits them in <infra.out_dir>/coordinator/ledger.jsonl
    /// and exits when the job is done. Serves gRPC (with grpc.health.v1).
    ///
    /// Example:
    ///   hsat coordinator --config job.toml --listen 0.0.0.0:50051 --workers 4
    #[command(verbatim_doc_comment, after_help = hsat_core::exit::EXIT_CODES_HELP)]
    Coordinator(hsat_coordinator::cli::CoordinatorArgs),

    /// Run one worker of a distributed job: joins the coordinator, trains the steps
    /// it is given, averages gradients with the other workers, exits when the job
    /// is done. SIGTERM makes it finish the current step and leave.
    ///
    /// Example:
    ///   hsat worker --coordinator http://coordinator:50051 --config job.toml
    ///   LOCAL_RANK=1 hsat worker --coordinator http://coordinator:50051   (trains on cuda:1)
    #[command(verbatim_doc_comment, after_help = hsat_core::exit::EXIT_CODES_HELP)]
    Worker(cluster::WorkerArgs),

    /// Show a running job: state, committed step, generation, workers, throughput.
    /// With --watch it refreshes until the job ends (exit 0 when it finished).
    ///
    /// Example:
    ///   hsat status --coordinator http://127.0.0.1:50051
    ///   hsat status --coordinator http://127.0.0.1:50051 --watch --interval 5
    #[command(verbatim_doc_comment)]
    Status(cluster::StatusArgs),

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

    /// The paper's comparison as an experiment: generate a dataset (7 classes), train
    /// HiDisc and HSAT with the same budget for several seeds, evaluate each pair
    /// (clean, every attack of [eval] and the worst case at each eps), and report
    /// mean +- sd per level, HSAT - HiDisc with a t interval over seeds and a cluster
    /// bootstrap interval over seeds and val patients, whether the paper's pattern
    /// holds, and two plots (report.md, report.json, repro_*.png in --out). Running it
    /// again with the same settings completes an interrupted experiment.
    ///
    /// Example:
    ///   hsat repro --config examples/repro.toml --out runs/repro
    ///   hsat repro --config examples/repro.toml --seeds 5 --val-patients-per-class 8
    #[command(verbatim_doc_comment)]
    Repro(repro::ReproArgs),

    /// Draw a run's training curves from DIR/metrics.jsonl (one record per committed
    /// step) as PNG files: loss per level on clean vs adversarial views, the attack's
    /// gain, learning rate and eps, step time and its parts. Works on a live run too
    /// (a half-written last line is skipped).
    ///
    /// Example:
    ///   hsat plot --run runs/quickstart
    ///   hsat plot --run runs/quickstart --out /tmp/quickstart-plots
    #[command(verbatim_doc_comment)]
    Plot(plot::PlotArgs),

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

    /// The stall a checkpoint adds to a training step: ResNet-50 @ 96 px steps
    /// (PGD-5, batch 2x2x2x2 views of random images, as `bench step`) without
    /// checkpoints, with synchronous and with asynchronous checkpoints of the
    /// complete training state, in one run; prints the stalls in seconds and as %
    /// of a step. About two minutes on 2 cores.
    ///
    /// Example:
    ///   hsat bench checkpoint --steps 3 --rounds 3
    #[command(verbatim_doc_comment)]
    Checkpoint(bench::CheckpointArgs),

    /// Gradient synchronisation of the ResNet-50 encoder's gradients between 2 local
    /// processes (GradientSync over c10d Gloo) against PyTorch DDP with Gloo, same
    /// shapes, alternating rounds; prints medians and the ratio.
    ///
    /// Example:
    ///   hsat bench sync --rounds 9
    #[command(verbatim_doc_comment)]
    Sync(bench_sync::SyncArgs),

    /// Control-plane load: N simulated workers (no libtorch) drive a separate
    /// `hsat-coordinator` process over gRPC at a step rate, with heartbeats; prints
    /// p50/p99 latency per RPC, coordinator CPU, and a no-op RPC as reference.
    ///
    /// Example:
    ///   hsat bench control-plane --workers 256,1024 --rate 10
    #[command(verbatim_doc_comment)]
    ControlPlane(bench_control::ControlPlaneArgs),

    /// Recovery time of a real job (coordinator + 3 workers, small_cnn): kill -9 a
    /// worker, or the coordinator (restarted at once), and time until the next step
    /// commits; prints every trial, the medians and the targets (< 5 s, < 10 s).
    ///
    /// Example:
    ///   hsat bench recovery --trials 5
    #[command(verbatim_doc_comment)]
    Recovery(bench_recovery::RecoveryArgs),

    /// The kNN of `hsat eval` at a real dataset's scale: today's exact f64 CPU path
    /// (eval.knn_device = "cpu_exact") against the device path ("auto": f32 top-k in
    /// chunks, exact f64 rescoring) on the same seeded features, in one run; prints
    /// both times, the ratio and their agreement. At the default size (100k x 20k x
    /// 2048) the exact path takes most of an hour on 2 cores: --exact-queries N times
    /// it on the first N queries and scales its time to all of them.
    ///
    /// Example:
    ///   hsat bench eval --exact-queries 500
    ///   hsat bench eval --bank 20000 --queries 2000 --dim 512
    #[command(verbatim_doc_comment)]
    Eval(bench_eval::EvalBenchArgs),
}

/// `hsat run` arguments.
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Worker processes to train with (coordinator in this process); without it,
    /// one process trains alone.
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    membership: hsat_coordinator::cli::MembershipArgs,
    /// Resume the job in <infra.out_dir> (from its newest complete checkpoint, or
    /// with --workers its ledger); fail if there is none. (Without it, a run
    /// resumes when there is one.)
    #[arg(long, conflicts_with = "new_job")]
    resume: bool,
    /// Start a new job even if <infra.out_dir> holds another (or the same) job: its
    /// checkpoints (and with --workers its ledger) move to <infra.out_dir>/archive/.
    #[arg(long)]
    new_job: bool,
    /// With --workers: serve without authentication (by default each run makes a
    /// job token, <out_dir>/coordinator/token, and hands it to its workers).
    #[arg(long, requires = "workers")]
    insecure: bool,
    /// Without --workers: where to train, auto, cpu, cuda or cuda:N (also
    /// HSAT_DEVICE; auto: cuda:$LOCAL_RANK, else cuda:0 with a GPU, else the CPU).
    /// With --workers each local worker gets cuda:(i mod GPUs) when there are GPUs.
    #[arg(long, value_name = "DEVICE", conflicts_with = "workers")]
    device: Option<String>,
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
    // A bad command line exits 2 (clap's own code, `hsat_core::exit::Exit::Usage`).
    let cli = Cli::parse();
    if let Err(err) = hsat_coordinator::logging::init(cli.log.log_format) {
        eprintln!("error: {err}");
        return hsat_core::exit::Exit::Usage.into();
    }
    let outcome = match cli.command {
        Command::Run(RunArgs {
            config,
            workers: Some(workers),
            membership,
            resume,
            new_job,
            insecure,
            device: _,
        }) => cluster::run_local(
            config.config,
            config.set,
            workers,
            &membership,
            match (resume, new_job) {
                (true, _) => hsat_coordinator::StartMode::Resume,
                (_, true) => hsat_coordinator::StartMode::NewJob,
                _ => hsat_coordinator::StartMode::Auto,
            },
            insecure,
        ),
        Command::Run(args) => run::run(
            args.config.config,
            args.config.set,
            args.device.as_deref(),
            hsat_worker::train::run::RunOptions {
                resume: args.resume,
                new_job: args.new_job,
            },
        ),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Status(args) => cluster::status(args),
        Command::Synth(args) => data::synth(args),
        Command::Eval(args) => eval::eval(args),
        Command::Repro(args) => repro::repro(args),
        Command::Plot(args) => plot::plot(args),
        Command::Data(DataCommand::Check(args)) => data::check_dataset(args),
        Command::Bench(BenchCommand::Step(args)) => bench::step(args),
        Command::Bench(BenchCommand::Data(args)) => bench::data(args),
        Command::Bench(BenchCommand::Checkpoint(args)) => bench::checkpoint(args),
        Command::Bench(BenchCommand::Sync(args)) => bench_sync::sync(args),
        Command::Bench(BenchCommand::ControlPlane(args)) => bench_control::control_plane(args),
        Command::Bench(BenchCommand::Recovery(args)) => bench_recovery::recovery(args),
        Command::Bench(BenchCommand::Eval(args)) => bench_eval::eval(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let status = exit::classify(&err);
            match err.downcast_ref::<exit::Ended>() {
                // Not an error of hsat: how the job (or this worker's part) ended.
                Some(ended) => {
                    eprintln!("hsat: {ended} [exit {}: {}]", status.code(), status.name())
                }
                None => eprintln!("error: {err:#} [exit {}: {}]", status.code(), status.name()),
            }
            status.into()
        }
    }
}
