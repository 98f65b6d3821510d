//! `hsat eval`: the paper's evaluation (method.md §7) of one or more checkpoints.
//!
//! Loads the dataset of the config, embeds every train patch (the kNN bank) and every
//! val patch with each model's backbone, crafts every configured white-box attack
//! against each model, evaluates the crafted images on the model itself (white-box)
//! and on every other model (transfer), and writes `results.json`, `table.md`,
//! `table.csv` and two PNG plots into `--out`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hsat_core::config::{self, ConfigSources, DataSource, EvalAttack};
use hsat_core::dataset::{DatasetIndex, Split, check};
use hsat_worker::eval::{
    BatchSpec, FeatureAttack, LoadedModel, clean_features, load_checkpoint, patches_of,
    val_features,
};
use tch::Device;

use crate::data::Progress;
use crate::report::{
    self, AttackResult, Bank, DatasetSummary, EvalReport, EvalSettings, ModelResult,
    TransferResult, ValGroups, evaluate_levels, transfer_levels,
};

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
}

/// Runs the evaluation and prints the table.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let cfg = config::load(&ConfigSources::from_process_env(args.config, args.set))?;
    if cfg.data.source == DataSource::Synthetic {
        bail!(
            "hsat eval needs a dataset on disk with a train/val split, but data.source = \"synthetic\" \
             (generated in memory); write one with `hsat synth --out DIR` and set data.source = \"opensrh\", \
             data.db_root = DIR"
        );
    }
    tch::set_num_threads(cfg.infra.torch_threads() as i32);
    let device = Device::cuda_if_available();

    let index = DatasetIndex::load(&cfg.data).context("cannot index the dataset")?;
    let quick = check::quick_check(&index);
    if !quick.is_ok() {
        println!("{}", quick.render());
        bail!("the dataset has errors (listed above); `hsat data check` gives the full report");
    }
    let train = patches_of(&index, Split::Train);
    let val = patches_of(&index, Split::Val);
    if train.is_empty() || val.is_empty() {
        bail!(
            "the dataset has {} train and {} val patches: the kNN evaluation needs both \
             (check the split file)",
            train.len(),
            val.len()
        );
    }
    let groups = ValGroups {
        labels: val.iter().map(|p| p.label).collect(),
        slides: val.iter().map(|p| p.slide.clone()).collect(),
        patients: val.iter().map(|p| p.patient.clone()).collect(),
    };
    let train_labels: Vec<usize> = train.iter().map(|p| p.label).collect();
    let mut val_slides = groups.slides.clone();
    val_slides.sort();
    val_slides.dedup();
    let mut val_patients = groups.patients.clone();
    val_patients.sort();
    val_patients.dedup();

    let mut names = Vec::new();
    let mut models: Vec<LoadedModel> = Vec::new();
    for (i, spec) in args.checkpoints.iter().enumerate() {
        let (name, path) = split_name(spec, i);
        let model = load_checkpoint(Path::new(&path), &cfg.model, device)
            .with_context(|| format!("cannot load the model {name:?} from {path}"))?;
        if let Some(trained_on) = model
            .meta
            .as_ref()
            .and_then(|m| m.dataset_fingerprint.as_ref())
            && *trained_on != index.fingerprint
        {
            println!(
                "hsat eval: note: {name} was trained on another dataset (fingerprint {}), evaluating on {}",
                &trained_on[..12.min(trained_on.len())],
                &index.fingerprint[..12.min(index.fingerprint.len())]
            );
        }
        println!(
            "hsat eval: model {name}: {} ({}), step {}",
            model.dir.display(),
            model.encoder.kind(),
            model
                .meta
                .as_ref()
                .map_or("unknown".to_owned(), |m| m.step.to_string())
        );
        names.push(name);
        models.push(model);
    }
    if names
        .iter()
        .enumerate()
        .any(|(i, n)| names[..i].contains(n))
    {
        bail!("two models are named alike ({names:?}): name them with --checkpoint NAME=PATH");
    }

    let e = &cfg.eval;
    let attacks: Vec<FeatureAttack> = e
        .attacks
        .iter()
        .flat_map(|&kind| {
            e.eps_255.iter().map(move |&eps| FeatureAttack {
                kind,
                eps: eps / 255.0,
                alpha: match kind {
                    EvalAttack::Fgsm => e.fgsm_alpha_255,
                    _ => e.alpha_255,
                } / 255.0,
                steps: e.steps,
                decay: e.mifgsm_decay,
                target: e.attack_target,
            })
        })
        .collect();
    let spec = BatchSpec {
        image_size: cfg.data.image_size,
        batch_size: e.batch_size,
        threads: e.decode_threads(),
    };
    println!(
        "hsat eval: {} train patches (kNN bank), {} val patches in {} slides of {} patients; \
         k = {}, T = {}; {} attacks x {} eps, {} steps; {} torch threads",
        train.len(),
        val.len(),
        val_slides.len(),
        val_patients.len(),
        e.knn_k,
        e.knn_temperature,
        e.attacks.len(),
        e.eps_255.len(),
        e.steps,
        cfg.infra.torch_threads()
    );

    let mut banks = Vec::with_capacity(models.len());
    for model in &models {
        let mut progress = Progress::new("train features");
        banks.push(clean_features(
            &model.encoder,
            &train,
            spec,
            &mut |d, t| progress.update(d, t),
        )?);
        progress.finish();
    }
    let encoders: Vec<_> = models.iter().map(|m| &m.encoder).collect();
    let transfer = !args.no_transfer && models.len() > 1;
    let mut progress = Progress::new(if attacks.is_empty() {
        "val features"
    } else {
        "val features + attacks"
    });
    let features = val_features(
        &encoders,
        &val,
        &attacks,
        transfer,
        cfg.infra.seed,
        spec,
        &mut |d, t| progress.update(d, t),
    )?;
    progress.finish();

    let bank = |m: usize| Bank {
        features: &banks[m],
        labels: &train_labels,
        n_classes: index.classes.len(),
        k: e.knn_k,
        t: e.knn_temperature,
        threads: spec.threads,
    };
    let mut results = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        let clean = evaluate_levels(bank(m), &features.clean[m], &groups)?;
        let mut attack_results = Vec::new();
        for (a, attack) in attacks.iter().enumerate() {
            if let Some(rows) = features.adversarial.get(&(m, a, m)) {
                attack_results.push(AttackResult {
                    attack: attack.kind.name().to_owned(),
                    eps_255: attack.eps * 255.0,
                    levels: evaluate_levels(bank(m), rows, &groups)?,
                });
            }
        }
        results.push(ModelResult {
            name: names[m].clone(),
            checkpoint: model.dir.display().to_string(),
            backbone: model.encoder.kind().name().to_owned(),
            step: model.meta.as_ref().map(|meta| meta.step),
            clean,
            attacks: attack_results,
        });
    }
    let mut transfers = Vec::new();
    for (&(s, a, t), rows) in &features.adversarial {
        if s == t {
            continue;
        }
        let adversarial = evaluate_levels(bank(t), rows, &groups)?;
        transfers.push(TransferResult {
            source: names[s].clone(),
            target: names[t].clone(),
            attack: attacks[a].kind.name().to_owned(),
            eps_255: attacks[a].eps * 255.0,
            levels: transfer_levels(&results[t].clean, adversarial),
        });
    }

    let report = EvalReport {
        settings: EvalSettings {
            knn_k: e.knn_k,
            knn_temperature: e.knn_temperature,
            alpha_255: e.alpha_255,
            steps: e.steps,
            fgsm_alpha_255: e.fgsm_alpha_255,
            mifgsm_decay: e.mifgsm_decay,
            attack_target: e.attack_target.name().to_owned(),
            seed: cfg.infra.seed,
            image_size: cfg.data.image_size,
        },
        dataset: DatasetSummary {
            classes: index.classes.clone(),
            train_patches: train.len(),
            val_patches: val.len(),
            val_slides: val_slides.len(),
            val_patients: val_patients.len(),
            fingerprint: index.fingerprint.clone(),
        },
        models: results,
        transfer: transfers,
    };
    write_outputs(&report, &args.out)?;
    println!("\n{}", report::markdown_table(&report));
    println!(
        "hsat eval: wrote {0}/results.json, {0}/table.md, {0}/table.csv, {0}/accuracy_vs_eps.png, {0}/clean_vs_robust.png",
        args.out.display()
    );
    Ok(())
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

fn write_outputs(report: &EvalReport, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report).context("serialising the results")?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("results.json", &json)?;
    write("table.md", &report::markdown_table(report))?;
    write("table.csv", &report::csv_table(report))?;
    report::plot::accuracy_vs_eps(report, &out.join("accuracy_vs_eps.png"))?;
    report::plot::clean_vs_robust(report, &out.join("clean_vs_robust.png"))?;
    Ok(())
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
