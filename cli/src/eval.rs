//! `hsat eval`: the paper's evaluation (method.md §7) of one or more checkpoints.
//!
//! Parses the models (`[NAME=]PATH`), calls [`hsat_worker::eval::run_eval`] (which
//! writes `results.json`, `table.md`, `table.csv` and two PNG plots into `--out`),
//! prints its progress and the table.

use std::path::{Path, PathBuf};

use hsat_core::config::{self, ConfigSources};
use hsat_core::eval::report::markdown_table;
use hsat_worker::eval::run::OUTPUT_FILES;
use hsat_worker::eval::{EvalEvent, EvalRequest, ModelSpec, run_eval};

use crate::progress::Progress;

/// Options of `hsat eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Config whose `[data]` section names the dataset and whose `[eval]` section sets
    /// kNN and attacks (see docs/config.md); without it the defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set eval.attacks=pgd --set eval.eps=[8]`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A model to evaluate, `[NAME=]PATH`: a checkpoint directory, a run's out_dir
    /// (its newest checkpoint) or a backbone .safetensors file. Repeat it for more rows
    /// of the table; with two or more, every model's adversarial images are also
    /// evaluated on every other model (transfer).
    #[arg(long = "checkpoint", value_name = "[NAME=]PATH", required = true)]
    checkpoints: Vec<String>,
    /// Directory for results.json, table.md, table.csv and the plots.
    #[arg(long)]
    out: PathBuf,
    /// Skip the transfer (black-box) evaluation between models.
    #[arg(long)]
    no_transfer: bool,
    /// Where to run: auto, cpu, cuda or cuda:N (also HSAT_DEVICE; auto:
    /// cuda:$LOCAL_RANK, else cuda:0 with a GPU, else the CPU).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

/// Runs the evaluation and prints the table.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let config = config::load(&ConfigSources::from_process_env(args.config, args.set))?;
    let device = hsat_worker::cluster::device::device_from_process(args.device.as_deref())?.device;
    let request = EvalRequest {
        config,
        models: args
            .checkpoints
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let (name, path) = split_name(spec, i);
                ModelSpec {
                    name,
                    path: PathBuf::from(path),
                }
            })
            .collect(),
        out: args.out,
        transfer: !args.no_transfer,
        device,
    };
    let mut progress: Option<Progress> = None;
    let report = run_eval(&request, &mut |event| print_event(event, &mut progress))?;
    println!("\n{}", markdown_table(&report));
    let out = request.out.display();
    println!(
        "hsat eval: wrote {}",
        OUTPUT_FILES.map(|file| format!("{out}/{file}")).join(", ")
    );
    Ok(())
}

/// Prints one event of an evaluation; `progress` is the current stage's progress line.
pub fn print_event(event: EvalEvent<'_>, progress: &mut Option<Progress>) {
    match event {
        EvalEvent::OtherDataset {
            model,
            trained_on,
            evaluating_on,
        } => println!(
            "hsat eval: note: {model} was trained on another dataset (fingerprint {}), evaluating on {}",
            &trained_on[..12.min(trained_on.len())],
            &evaluating_on[..12.min(evaluating_on.len())]
        ),
        EvalEvent::ModelLoaded {
            model,
            dir,
            backbone,
            step,
        } => println!(
            "hsat eval: model {model}: {} ({backbone}), step {}",
            dir.display(),
            step.map_or("unknown".to_owned(), |s| s.to_string())
        ),
        EvalEvent::Plan(plan) => println!(
            "hsat eval: {} train patches (kNN bank), {} val patches in {} slides of {} patients; \
             k = {}, T = {}; {} attacks x {} eps, {} steps{}; {} torch threads",
            plan.train_patches,
            plan.val_patches,
            plan.val_slides,
            plan.val_patients,
            plan.knn_k,
            plan.knn_temperature,
            plan.attacks,
            plan.eps,
            plan.steps,
            plan.apgd.map_or(String::new(), |(steps, restarts)| format!(
                " (APGD {steps} x {restarts} restart{})",
                if restarts == 1 { "" } else { "s" }
            )),
            plan.torch_threads
        ),
        EvalEvent::Stage(what) => *progress = Some(Progress::new(what)),
        EvalEvent::Progress { done, total } => {
            if let Some(progress) = progress.as_mut() {
                progress.update(done, total);
            }
        }
        EvalEvent::StageDone => {
            if let Some(mut progress) = progress.take() {
                progress.finish();
            }
        }
    }
}

/// `NAME=PATH` or `PATH` (named after its folder, else `model<i>`).
fn split_name(spec: &str, i: usize) -> (String, String) {
    if let Some((name, path)) = spec.split_once('=')
        && !name.is_empty()
        && !name.contains(['/', '\\'])
    {
        return (name.to_owned(), path.to_owned());
    }
    let name = Path::new(spec)
        .components()
        .rev()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| !c.starts_with("step-") && *c != "checkpoints" && !c.ends_with(".safetensors"))
        .map_or_else(|| format!("model{}", i + 1), str::to_owned);
    (name, spec.to_owned())
}

#[cfg(test)]
mod tests {
    use super::split_name;

    #[test]
    fn models_are_named_by_flag_or_folder() {
        assert_eq!(
            split_name("hsat=runs/a", 0),
            ("hsat".into(), "runs/a".into())
        );
        assert_eq!(
            split_name("runs/hidisc/checkpoints/step-00000009", 0).0,
            "hidisc"
        );
        assert_eq!(split_name("runs/x=y/model", 1).0, "model");
    }
}
