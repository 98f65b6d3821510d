//! `hsat eval` as one call ([`run_eval`]): the paper's evaluation (method.md §7) of
//! one or more models.
//!
//! Indexes and checks the dataset of the config, embeds every train patch (the kNN
//! bank) and every val patch with each model's backbone, crafts every configured
//! white-box attack against each model, evaluates the crafted images on the model
//! itself (white-box) and on every other model (transfer), and writes
//! `results.json`, `table.md`, `table.csv` and two PNG plots into the output folder.
//! What happens along the way is reported through [`EvalEvent`]s; the caller prints.

use std::path::{Path, PathBuf};

use hsat_core::config::{Backbone, Config, DataSource, EvalAttack, KnnDevice};
use hsat_core::dataset::Split;
use hsat_core::eval::report::{
    self, AttackResult, Bank, DatasetSummary, EvalReport, EvalSettings, LevelScores, ModelResult,
    SampleIndex, SampleOutcomes, TransferResult, ValGroups, WorstCaseResult, level_scores,
    outcome_bits, outcome_name, score_levels, survived_all, transfer_levels, worst_case,
};
use hsat_data::check::open_dataset;
use hsat_data::plot;
use tch::Device;

use super::features::clean_features_to_file;
use super::{
    BankRows, BatchSpec, DeviceKnn, EvalRunError, FeatureAttack, FeatureFile, LoadedModel, Rows,
    clean_features, device_knn_scores, load_checkpoint, patches_of, val_features,
};

/// The names of the files [`run_eval`] writes into [`EvalRequest::out`], in order.
pub const OUTPUT_FILES: [&str; 5] = [
    "results.json",
    "table.md",
    "table.csv",
    "accuracy_vs_eps.png",
    "clean_vs_robust.png",
];

/// A model to evaluate: a row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The row label (unique within a request).
    pub name: String,
    /// A checkpoint directory, a run's `out_dir` or checkpoints folder (its newest
    /// checkpoint), or a backbone `.safetensors` file.
    pub path: PathBuf,
}

/// Everything one evaluation needs.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    /// The validated config: `[data]` names the dataset, `[eval]` sets kNN and
    /// attacks, `[model]` is the fallback for weights without `checkpoint.json`.
    pub config: Config,
    /// The models, in table order.
    pub models: Vec<ModelSpec>,
    /// Folder for the [`OUTPUT_FILES`] (created if absent).
    pub out: PathBuf,
    /// Evaluate every model's adversarial images on every other model too (needs at
    /// least two models).
    pub transfer: bool,
    /// Where the models run.
    pub device: Device,
}

/// The size of an evaluation, known once the dataset and the models are loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPlan {
    /// Train patches (the kNN bank).
    pub train_patches: usize,
    /// Val patches (the queries).
    pub val_patches: usize,
    /// Val slides.
    pub val_slides: usize,
    /// Val patients.
    pub val_patients: usize,
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN temperature.
    pub knn_temperature: f64,
    /// Attack kinds.
    pub attacks: usize,
    /// Budgets per attack kind.
    pub eps: usize,
    /// Iterations of PGD, BIM and MI-FGSM.
    pub steps: usize,
    /// APGD's iterations per restart and restarts, when APGD is among the attacks.
    pub apgd: Option<(usize, usize)>,
    /// libtorch intra-op threads.
    pub torch_threads: usize,
}

/// What [`run_eval`] reports as it goes, in this order: per model
/// [`OtherDataset`](Self::OtherDataset) (when it applies) and
/// [`ModelLoaded`](Self::ModelLoaded); [`Plan`](Self::Plan); then for each stage
/// [`Stage`](Self::Stage), [`Progress`](Self::Progress)... and
/// [`StageDone`](Self::StageDone).
#[derive(Debug)]
pub enum EvalEvent<'a> {
    /// The model's checkpoint records another dataset than the one evaluated on.
    OtherDataset {
        /// The model's name.
        model: &'a str,
        /// Fingerprint of the dataset it was trained on.
        trained_on: &'a str,
        /// Fingerprint of the dataset evaluated on.
        evaluating_on: &'a str,
    },
    /// A model is loaded.
    ModelLoaded {
        /// Its name.
        model: &'a str,
        /// The checkpoint directory (or the folder of the weights file).
        dir: &'a Path,
        /// Its backbone.
        backbone: Backbone,
        /// Its training step, when `checkpoint.json` says.
        step: Option<u64>,
    },
    /// The work ahead.
    Plan(&'a EvalPlan),
    /// A stage starts: `train features` (once per model), then `val features` or
    /// `val features + attacks`.
    Stage(&'static str),
    /// `done` of `total` patches of the current stage.
    Progress {
        /// Patches done.
        done: usize,
        /// Patches in the stage.
        total: usize,
    },
    /// The current stage is finished.
    StageDone,
}

/// Runs the evaluation of `request`, writes its [`OUTPUT_FILES`] into
/// [`EvalRequest::out`] and returns the report.
///
/// # Errors
///
/// [`EvalRunError`]: a synthetic or broken dataset, an empty split, a model that
/// cannot be loaded, two models with one name, libtorch, a patch that cannot be
/// decoded, or an output file that cannot be written.
pub fn run_eval(
    request: &EvalRequest,
    on_event: &mut dyn FnMut(EvalEvent<'_>),
) -> Result<EvalReport, EvalRunError> {
    let cfg = &request.config;
    if cfg.data.source == DataSource::Synthetic {
        return Err(EvalRunError::SyntheticData);
    }
    tch::set_num_threads(cfg.infra.torch_threads() as i32);

    let index = open_dataset(&cfg.data)?;
    let train = patches_of(&index, Split::Train);
    let val = patches_of(&index, Split::Val);
    if train.is_empty() || val.is_empty() {
        return Err(EvalRunError::EmptySplit {
            train: train.len(),
            val: val.len(),
        });
    }
    let groups = ValGroups {
        labels: val.iter().map(|p| p.label).collect(),
        slides: val.iter().map(|p| p.slide.clone()).collect(),
        patients: val.iter().map(|p| p.patient.clone()).collect(),
    };
    let train_labels: Vec<usize> = train.iter().map(|p| p.label).collect();
    let val_slides = distinct(&groups.slides);
    let val_patients = distinct(&groups.patients);

    let mut models: Vec<LoadedModel> = Vec::with_capacity(request.models.len());
    for spec in &request.models {
        let model = load_checkpoint(&spec.path, &cfg.model, request.device).map_err(|e| {
            EvalRunError::LoadModel {
                name: spec.name.clone(),
                path: spec.path.clone(),
                source: Box::new(e),
            }
        })?;
        if let Some(trained_on) = model
            .meta
            .as_ref()
            .and_then(|m| m.dataset_fingerprint.as_ref())
            && *trained_on != index.fingerprint
        {
            on_event(EvalEvent::OtherDataset {
                model: &spec.name,
                trained_on,
                evaluating_on: &index.fingerprint,
            });
        }
        on_event(EvalEvent::ModelLoaded {
            model: &spec.name,
            dir: &model.dir,
            backbone: model.encoder.kind(),
            step: model.meta.as_ref().map(|m| m.step),
        });
        models.push(model);
    }
    let names: Vec<String> = request.models.iter().map(|m| m.name.clone()).collect();
    if names
        .iter()
        .enumerate()
        .any(|(i, n)| names[..i].contains(n))
    {
        return Err(EvalRunError::DuplicateNames { names });
    }

    let e = &cfg.eval;
    let attacks = feature_attacks(cfg);
    let spec = BatchSpec {
        image_size: cfg.data.image_size,
        batch_size: e.batch_size,
        threads: e.decode_threads(),
    };
    on_event(EvalEvent::Plan(&EvalPlan {
        train_patches: train.len(),
        val_patches: val.len(),
        val_slides,
        val_patients,
        knn_k: e.knn_k,
        knn_temperature: e.knn_temperature,
        attacks: e.attacks.len(),
        eps: e.eps_255.len(),
        steps: e.steps,
        apgd: e
            .attacks
            .contains(&EvalAttack::Apgd)
            .then_some((e.apgd_steps, e.apgd_restarts)),
        torch_threads: cfg.infra.torch_threads(),
    }));

    // The auto kNN's banks are streamed to raw f32 files in a scratch folder of
    // `out` (removed when `scratch` drops, also on an error), so a bank larger than
    // memory works; the exact CPU path keeps them in memory as it always did.
    let scratch = match e.knn_device {
        KnnDevice::Auto => Some(scratch_dir(&request.out)?),
        KnnDevice::CpuExact => None,
    };
    let mut banks = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        on_event(EvalEvent::Stage("train features"));
        let mut progress = |done, total| on_event(EvalEvent::Progress { done, total });
        banks.push(match &scratch {
            Some(dir) => BankStore::File(clean_features_to_file(
                &model.encoder,
                &train,
                spec,
                &dir.path().join(format!("bank-{m}.f32")),
                &mut progress,
            )?),
            None => BankStore::Memory(clean_features(&model.encoder, &train, spec, &mut progress)?),
        });
        on_event(EvalEvent::StageDone);
    }
    let encoders: Vec<_> = models.iter().map(|m| &m.encoder).collect();
    let transfer = request.transfer && models.len() > 1;
    on_event(EvalEvent::Stage(if attacks.is_empty() {
        "val features"
    } else {
        "val features + attacks"
    }));
    let features = val_features(
        &encoders,
        &val,
        &attacks,
        transfer,
        cfg.infra.seed,
        spec,
        &mut |done, total| on_event(EvalEvent::Progress { done, total }),
    )?;
    on_event(EvalEvent::StageDone);

    let knn = Knn {
        banks: &banks,
        labels: &train_labels,
        groups: &groups,
        n_classes: index.classes.len(),
        k: e.knn_k,
        t: e.knn_temperature,
        threads: spec.threads,
        device: request.device,
        memory_bytes: e.knn_memory_mb.saturating_mul(1 << 20),
    };
    let query_sets = models.len() + features.adversarial.len();
    on_event(EvalEvent::Stage("kNN"));
    let mut knn_done = 0;
    let mut levels = |m: usize, rows: &[Vec<f32>]| -> Result<_, EvalRunError> {
        let offset = knn_done * val.len();
        let levels = knn.levels(m, rows, &mut |done, _| {
            on_event(EvalEvent::Progress {
                done: offset + done,
                total: query_sets * val.len(),
            });
        })?;
        knn_done += 1;
        Ok(levels)
    };
    let mut results = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        let clean_scores = levels(m, &features.clean[m])?;
        let clean = clean_scores.levels()?;
        let outcomes_of = |run: String, correct: &[Vec<bool>]| SampleOutcomes {
            run,
            correct: correct.iter().map(|level| outcome_bits(level)).collect(),
        };
        let mut outcomes = vec![outcomes_of("clean".to_owned(), &clean_scores.correct())];
        let mut attack_results = Vec::new();
        // (eps, attack, scores) of every white-box run, for the worst case.
        let mut attacked = Vec::new();
        for (a, attack) in attacks.iter().enumerate() {
            if let Some(rows) = features.adversarial.get(&(m, a, m)) {
                let scores = levels(m, rows)?;
                attack_results.push(AttackResult {
                    attack: attack.kind.name().to_owned(),
                    eps_255: attack.eps * 255.0,
                    levels: scores.levels()?,
                });
                outcomes.push(outcomes_of(
                    outcome_name(attack.kind.name(), attack.eps * 255.0),
                    &scores.correct(),
                ));
                attacked.push((attack.eps * 255.0, attack.kind.name(), scores));
            }
        }
        let mut budgets: Vec<f64> = attacked.iter().map(|(eps, _, _)| *eps).collect();
        budgets.sort_by(f64::total_cmp);
        budgets.dedup();
        let mut worst = Vec::with_capacity(budgets.len());
        for eps in budgets {
            let at_eps: Vec<_> = attacked.iter().filter(|(e, _, _)| *e == eps).collect();
            let mut runs = vec![&clean_scores];
            runs.extend(at_eps.iter().map(|(_, _, scores)| scores));
            worst.push(WorstCaseResult {
                eps_255: eps,
                attacks: at_eps
                    .iter()
                    .map(|(_, name, _)| (*name).to_owned())
                    .collect(),
                levels: worst_case(&runs)?,
            });
            outcomes.push(outcomes_of(
                outcome_name("worst_case", eps),
                &survived_all(&runs)?,
            ));
        }
        results.push(ModelResult {
            name: names[m].clone(),
            checkpoint: model.dir.display().to_string(),
            backbone: model.encoder.kind().name().to_owned(),
            step: model.meta.as_ref().map(|meta| meta.step),
            clean,
            attacks: attack_results,
            worst_case: worst,
            outcomes,
        });
    }
    let mut transfers = Vec::new();
    for (&(s, a, t), rows) in &features.adversarial {
        if s == t {
            continue;
        }
        let adversarial = levels(t, rows)?.levels()?;
        transfers.push(TransferResult {
            source: names[s].clone(),
            target: names[t].clone(),
            attack: attacks[a].kind.name().to_owned(),
            eps_255: attacks[a].eps * 255.0,
            levels: transfer_levels(&results[t].clean, adversarial),
        });
    }

    on_event(EvalEvent::StageDone);
    drop(scratch);

    let report = EvalReport {
        settings: EvalSettings {
            knn_k: e.knn_k,
            knn_temperature: e.knn_temperature,
            alpha_255: e.alpha_255,
            steps: e.steps,
            apgd_steps: e.apgd_steps,
            apgd_restarts: e.apgd_restarts,
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
            val_slides,
            val_patients,
            fingerprint: index.fingerprint.clone(),
        },
        models: results,
        transfer: transfers,
        samples: SampleIndex::new(
            &groups,
            &val.iter()
                .map(|p| p.path.display().to_string())
                .collect::<Vec<_>>(),
        ),
    };
    write_outputs(&report, &request.out)?;
    Ok(report)
}

/// A model's train bank: in memory (`eval.knn_device = "cpu_exact"`) or streamed to
/// a file (`"auto"`).
enum BankStore {
    Memory(Rows),
    File(FeatureFile),
}

/// The kNN of one evaluation: every model's bank and the settings.
struct Knn<'a> {
    banks: &'a [BankStore],
    labels: &'a [usize],
    groups: &'a ValGroups,
    n_classes: usize,
    k: usize,
    t: f64,
    threads: usize,
    device: Device,
    memory_bytes: usize,
}

impl Knn<'_> {
    /// The kNN scores of `queries` against model `m`'s bank at every level, on the
    /// path its bank was stored for.
    fn levels(
        &self,
        m: usize,
        queries: &[Vec<f32>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LevelScores, EvalRunError> {
        match &self.banks[m] {
            BankStore::Memory(rows) => {
                let bank = Bank {
                    features: rows,
                    labels: self.labels,
                    n_classes: self.n_classes,
                    k: self.k,
                    t: self.t,
                    threads: self.threads,
                };
                let levels = score_levels(bank, queries, self.groups)?;
                progress(queries.len(), queries.len());
                Ok(levels)
            }
            BankStore::File(file) => {
                let spec = DeviceKnn {
                    n_classes: self.n_classes,
                    k: self.k,
                    t: self.t,
                    device: self.device,
                    memory_bytes: self.memory_bytes,
                    threads: self.threads,
                };
                let (scores, _) =
                    device_knn_scores(BankRows::File(file), self.labels, queries, &spec, progress)?;
                Ok(level_scores(scores, self.groups, self.n_classes)?)
            }
        }
    }
}

/// A scratch folder inside `out` (created first) for the banks' feature files.
fn scratch_dir(out: &Path) -> Result<tempfile::TempDir, EvalRunError> {
    let write = |source| EvalRunError::Write {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(write)?;
    tempfile::Builder::new()
        .prefix(".knn-bank-")
        .tempdir_in(out)
        .map_err(write)
}

/// Every configured attack at every configured budget, attack-major (the column
/// order of the tables).
fn feature_attacks(cfg: &Config) -> Vec<FeatureAttack> {
    let e = &cfg.eval;
    e.attacks
        .iter()
        .flat_map(|&kind| {
            e.eps_255.iter().map(move |&eps| FeatureAttack {
                kind,
                eps: eps / 255.0,
                alpha: match kind {
                    EvalAttack::Fgsm => e.fgsm_alpha_255,
                    _ => e.alpha_255,
                } / 255.0,
                steps: match kind {
                    EvalAttack::Apgd => e.apgd_steps,
                    _ => e.steps,
                },
                decay: e.mifgsm_decay,
                restarts: match kind {
                    EvalAttack::Apgd => e.apgd_restarts,
                    _ => 1,
                },
                target: e.attack_target,
            })
        })
        .collect()
}

/// Number of distinct ids.
fn distinct(ids: &[String]) -> usize {
    let mut ids: Vec<&String> = ids.iter().collect();
    ids.sort();
    ids.dedup();
    ids.len()
}

/// Writes the [`OUTPUT_FILES`] of `report` into `out`.
///
/// # Errors
///
/// [`EvalRunError::Write`], [`EvalRunError::Serialise`] or [`EvalRunError::Plot`].
pub fn write_outputs(report: &EvalReport, out: &Path) -> Result<(), EvalRunError> {
    std::fs::create_dir_all(out).map_err(|source| EvalRunError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let json = serde_json::to_string_pretty(report).map_err(EvalRunError::Serialise)?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| EvalRunError::Write { path, source })
    };
    write(OUTPUT_FILES[0], &json)?;
    write(OUTPUT_FILES[1], &report::markdown_table(report))?;
    write(OUTPUT_FILES[2], &report::csv_table(report))?;
    plot::accuracy_vs_eps(report, &out.join(OUTPUT_FILES[3]))?;
    plot::clean_vs_robust(report, &out.join(OUTPUT_FILES[4]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_core::config::{ConfigSources, load};
    use hsat_data::synth::{SynthFormat, SynthSpec, synthesize};

    /// A request on a dataset written by the generator (`val_patients_per_class` val
    /// patients per class) for one model at `model`.
    fn request(root: &Path, val_patients_per_class: usize, model: &Path) -> EvalRequest {
        let spec = SynthSpec {
            out: root.join("data"),
            format: SynthFormat::OpenSrh,
            classes: 2,
            patients_per_class: 2,
            val_patients_per_class,
            slides_per_patient: 1,
            patches_per_slide: 2,
            size: 16,
            seed: 5,
            stain_spread: 1.0,
        };
        synthesize(&spec, &mut |_, _| {}).expect("synth");
        let sources = ConfigSources {
            overrides: vec![
                "data.source=opensrh".to_owned(),
                format!("data.db_root={}", spec.out.display()),
            ],
            ..ConfigSources::default()
        };
        EvalRequest {
            config: load(&sources).expect("config"),
            models: vec![ModelSpec {
                name: "hsat".to_owned(),
                path: model.to_path_buf(),
            }],
            out: root.join("eval"),
            transfer: true,
            device: Device::Cpu,
        }
    }

    #[test]
    fn the_in_memory_source_is_refused_before_any_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut request = request(dir.path(), 1, &dir.path().join("no-model"));
        request.config = load(&ConfigSources::default()).expect("defaults");
        assert_eq!(request.config.data.source, DataSource::Synthetic);
        let err = run_eval(&request, &mut |_| {}).expect_err("synthetic data");
        assert!(matches!(err, EvalRunError::SyntheticData), "{err:?}");
        assert!(!request.out.exists(), "nothing is written");
    }

    #[test]
    fn an_empty_val_split_is_refused_before_models_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The model path does not exist: were models loaded first, this would be a
        // LoadModel error instead.
        let request = request(dir.path(), 0, &dir.path().join("no-model"));
        let err = run_eval(&request, &mut |_| {}).expect_err("no val patches");
        assert!(
            matches!(err, EvalRunError::EmptySplit { train: 8, val: 0 }),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_model_is_named_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-model");
        let request = request(dir.path(), 1, &missing);
        let mut events = 0;
        let err = run_eval(&request, &mut |_| events += 1).expect_err("no model");
        match &err {
            EvalRunError::LoadModel { name, path, source } => {
                assert_eq!(name, "hsat");
                assert_eq!(path, &missing);
                assert!(
                    matches!(**source, EvalRunError::NoModel { ref path } if *path == missing),
                    "{source:?}"
                );
            }
            other => panic!("expected LoadModel, got {other:?}"),
        }
        assert_eq!(events, 0, "nothing was loaded or planned");
    }
}
