//! `hsat plot`: PNG curves of a training run from its `<out_dir>/metrics.jsonl`,
//! drawn by the same plotting code as `hsat eval` ([`hsat_data::plot`]).

use std::path::PathBuf;

use hsat_data::metrics_log::{METRICS_FILE, MetricsLog};
use hsat_data::plot::training_curves;

/// Options of `hsat plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run's folder (its infra.out_dir), holding metrics.jsonl.
    #[arg(long, value_name = "DIR")]
    run: PathBuf,
    /// Folder for the PNG files [default: DIR/plots].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Reads the run's metrics and writes the plots.
pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let log = MetricsLog::read_run(&args.run)?;
    if !log.skipped_lines.is_empty() {
        // A crash mid-write leaves a torn line; the rest of the file is still good.
        println!(
            "hsat plot: note: skipped {} line(s) of {} that are not complete records (line {})",
            log.skipped_lines.len(),
            log.path.display(),
            log.skipped_lines
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let out = args.out.unwrap_or_else(|| args.run.join("plots"));
    let written = training_curves(&log, &out)?;
    let (first, last) = (
        log.steps.first().map_or(0, |r| r.step),
        log.steps.last().map_or(0, |r| r.step),
    );
    println!(
        "hsat plot: {} steps ({first} to {last}) from {}; wrote {}",
        log.steps.len(),
        args.run.join(METRICS_FILE).display(),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
