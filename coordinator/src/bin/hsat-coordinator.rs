//! `hsat-coordinator`: the coordinator alone (no libtorch), for the Kubernetes
//! coordinator image. Same flags as `hsat coordinator` ([`hsat_coordinator::cli`]).

use clap::Parser;
use hsat_coordinator::cli::{CoordinatorArgs, run_coordinator};
use hsat_coordinator::logging::{self, LogArgs};
use hsat_core::exit::{Exit, ExitClass};

/// Coordinates a distributed hsat training job: waits for --workers workers, hands
/// out steps, commits them to <out_dir>/coordinator/ledger.jsonl.
#[derive(Debug, Parser)]
#[command(
    name = "hsat-coordinator",
    version,
    about,
    after_help = hsat_core::exit::EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(err) = logging::init(cli.log.log_format) {
        eprintln!("error: {err}");
        return Exit::Usage.into();
    }
    match run_coordinator("hsat-coordinator", cli.args) {
        Ok(outcome) => {
            let exit = outcome.exit();
            println!(
                "hsat-coordinator: {:?}; {}/{} steps committed; ledger {} [exit {}: {}]",
                outcome.kind,
                outcome.committed_steps,
                outcome.total_steps,
                outcome.ledger.display(),
                exit.code(),
                exit.name()
            );
            exit.into()
        }
        Err(err) => {
            let exit = err.exit();
            // anyhow prints the whole chain of causes.
            eprintln!(
                "error: {:#} [exit {}: {}]",
                anyhow::Error::from(err),
                exit.code(),
                exit.name()
            );
            exit.into()
        }
    }
}
