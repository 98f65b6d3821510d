//! `hsat-coordinator`: the coordinator alone (no libtorch), for the Kubernetes
//! coordinator image. Same flags as `hsat coordinator` ([`hsat_coordinator::cli`]).

use clap::Parser;
use hsat_coordinator::cli::{CoordinatorArgs, run_coordinator};
use hsat_coordinator::logging::{self, LogArgs};

/// Coordinates a distributed hsat training job: waits for --workers workers, hands
/// out steps, commits them to <out_dir>/coordinator/ledger.jsonl.
#[derive(Debug, Parser)]
#[command(name = "hsat-coordinator", version, about)]
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
        return std::process::ExitCode::FAILURE;
    }
    match run_coordinator("hsat-coordinator", cli.args) {
        Ok(outcome) => {
            println!(
                "hsat-coordinator: {:?}; {}/{} steps committed; ledger {}",
                outcome.kind,
                outcome.committed_steps,
                outcome.total_steps,
                outcome.ledger.display()
            );
            if outcome.is_success() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(err) => {
            // anyhow prints the whole chain of causes.
            eprintln!("error: {:#}", anyhow::Error::from(err));
            std::process::ExitCode::FAILURE
        }
    }
}
