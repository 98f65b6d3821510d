//! The results of `hsat eval` and their tables: the report types (serialised as
//! `results.json`), the per-level evaluation of one set of val features against a
//! train bank, and Markdown and CSV tables laid out like the paper's Table 1.
//!
//! Everything here is plain data and pure functions over the math of this module's
//! parent; the features come from the worker, the PNG plots are drawn by
//! `hsat_data::plot` (which keeps the plotting and font crates out of this crate).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{EvalInputError, Metrics, aggregate, knn_scores, metrics, ranked_classes};

/// The three levels of the paper's tables, in table order.
pub const LEVELS: [&str; 3] = ["patch", "slide", "patient"];

/// The metrics of one level, as fractions in [0, 1] (`null` in JSON when undefined).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelResult {
    /// `patch`, `slide` or `patient`.
    pub level: String,
    /// Number of samples at this level.
    pub n: usize,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Top-2 accuracy.
    pub top2: f64,
    /// Top-3 accuracy.
    pub top3: f64,
    /// Mean class accuracy (macro recall).
    pub mean_class_accuracy: f64,
    /// Mean average precision (one-vs-rest, macro over present classes).
    pub mean_average_precision: f64,
    /// `[true class][predicted class]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// The three levels of one evaluation (clean or one attack).
pub type Levels = Vec<LevelResult>;

/// One attack's result on one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttackResult {
    /// `pgd`, `bim`, `mifgsm`, `fgsm` or `apgd`.
    pub attack: String,
    /// Budget in units of 1/255.
    pub eps_255: f64,
    /// Patch, slide and patient metrics.
    pub levels: Levels,
}

/// One evaluated model (a row of the table).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelResult {
    /// The row label.
    pub name: String,
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// Backbone name.
    pub backbone: String,
    /// Training step of the checkpoint, when known.
    pub step: Option<u64>,
    /// Clean metrics.
    pub clean: Levels,
    /// White-box results, in attack then eps order.
    pub attacks: Vec<AttackResult>,
    /// Per eps (ascending), the worst case over the clean images and every attack
    /// run at that eps; empty without attacks.
    pub worst_case: Vec<WorstCaseResult>,
    /// Per evaluation (clean, every attack, every worst case), which samples were
    /// classified correctly: what intervals over val patients are computed from
    /// (`hsat repro`'s bootstrap), in the sample order of [`EvalReport::samples`].
    pub outcomes: Vec<SampleOutcomes>,
}

/// Which samples one evaluation of one model classified correctly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleOutcomes {
    /// `clean`, `<attack>@<eps>` (e.g. `pgd@8`) or `worst_case@<eps>`; see
    /// [`outcome_name`].
    pub run: String,
    /// Per level in [`LEVELS`] order, one character per sample: `1` correct, `0`
    /// wrong (a string rather than an array keeps `results.json` readable).
    pub correct: Vec<String>,
}

/// The [`SampleOutcomes::run`] name of an attack (or `worst_case`) at `eps_255`.
pub fn outcome_name(attack: &str, eps_255: f64) -> String {
    format!("{attack}@{eps_255}")
}

/// `1`/`0` per sample.
pub fn outcome_bits(correct: &[bool]) -> String {
    correct.iter().map(|&c| if c { '1' } else { '0' }).collect()
}

/// The val samples of every level, in the order of [`LevelScores`] and of
/// [`SampleOutcomes::correct`], with the patient each belongs to: a level's samples
/// are not independent (a patient's patches share its stain), so intervals resample
/// patients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleIndex {
    /// Patch, slide and patient, in [`LEVELS`] order.
    pub levels: Vec<SampleLevel>,
}

/// The samples of one level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleLevel {
    /// `patch`, `slide` or `patient`.
    pub level: String,
    /// Sample ids: patch paths, `patient/slide` ids, patient ids.
    pub ids: Vec<String>,
    /// The patient of each sample.
    pub patients: Vec<String>,
}

impl SampleIndex {
    /// The index of the val set `groups` whose patches are `patch_ids`; slides and
    /// patients in sorted id order, as [`level_scores`] aggregates them.
    pub fn new(groups: &ValGroups, patch_ids: &[String]) -> SampleIndex {
        let mut slides: Vec<(String, String)> = groups
            .slides
            .iter()
            .zip(&groups.patients)
            .map(|(slide, patient)| (slide.clone(), patient.clone()))
            .collect();
        slides.sort();
        slides.dedup_by(|a, b| a.0 == b.0);
        let mut patients = groups.patients.clone();
        patients.sort();
        patients.dedup();
        SampleIndex {
            levels: vec![
                SampleLevel {
                    level: LEVELS[0].to_owned(),
                    ids: patch_ids.to_vec(),
                    patients: groups.patients.clone(),
                },
                SampleLevel {
                    level: LEVELS[1].to_owned(),
                    ids: slides.iter().map(|(s, _)| s.clone()).collect(),
                    patients: slides.into_iter().map(|(_, p)| p).collect(),
                },
                SampleLevel {
                    level: LEVELS[2].to_owned(),
                    ids: patients.clone(),
                    patients,
                },
            ],
        }
    }
}

/// The worst case at one budget: per sample (patch, slide or patient), the prediction
/// counts as correct only if it is correct on the clean images and under every attack
/// at this eps. The clean image is in every eps ball (delta = 0), so, as AutoAttack's
/// robust accuracy, the worst case never exceeds the clean accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstCaseResult {
    /// Budget in units of 1/255.
    pub eps_255: f64,
    /// The attacks combined (besides the clean images), in run order.
    pub attacks: Vec<String>,
    /// Patch, slide and patient.
    pub levels: Vec<WorstCaseLevel>,
}

/// One level of a [`WorstCaseResult`]: rates in [0, 1] (`null` when undefined).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstCaseLevel {
    /// `patch`, `slide` or `patient`.
    pub level: String,
    /// Number of samples at this level.
    pub n: usize,
    /// Fraction of samples correct under every attack (and clean).
    pub accuracy: f64,
    /// Mean over the classes present of that fraction within the class.
    pub mean_class_accuracy: f64,
}

/// One level of a transfer result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferLevel {
    /// `patch`, `slide` or `patient`.
    pub level: String,
    /// The target's clean accuracy.
    pub clean_accuracy: f64,
    /// The target's accuracy on the source's adversarial images.
    pub accuracy: f64,
    /// `clean_accuracy - accuracy`.
    pub drop: f64,
    /// The full metrics on the adversarial images.
    pub metrics: LevelResult,
}

/// Images crafted on one model, evaluated on another (black-box).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferResult {
    /// The model the attack saw.
    pub source: String,
    /// The model evaluated.
    pub target: String,
    /// Attack name.
    pub attack: String,
    /// Budget in units of 1/255.
    pub eps_255: f64,
    /// Patch, slide and patient.
    pub levels: Vec<TransferLevel>,
}

/// Settings the numbers depend on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSettings {
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN temperature.
    pub knn_temperature: f64,
    /// Attack step of PGD, BIM and MI-FGSM (units of 1/255).
    pub alpha_255: f64,
    /// Iterations of PGD, BIM and MI-FGSM.
    pub steps: usize,
    /// APGD iterations per restart.
    pub apgd_steps: usize,
    /// APGD random starts.
    pub apgd_restarts: usize,
    /// FGSM step (units of 1/255).
    pub fgsm_alpha_255: f64,
    /// MI-FGSM decay.
    pub mifgsm_decay: f64,
    /// `backbone` or `projection`.
    pub attack_target: String,
    /// Seed of the random starts.
    pub seed: u64,
    /// Side of the model input in pixels.
    pub image_size: usize,
}

/// The dataset evaluated on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSummary {
    /// Class names, index order.
    pub classes: Vec<String>,
    /// Train (bank) patches.
    pub train_patches: usize,
    /// Val (query) patches.
    pub val_patches: usize,
    /// Val slides.
    pub val_slides: usize,
    /// Val patients.
    pub val_patients: usize,
    /// Fingerprint of the dataset index.
    pub fingerprint: String,
}

/// Everything `hsat eval` measured (`results.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Settings.
    pub settings: EvalSettings,
    /// Dataset.
    pub dataset: DatasetSummary,
    /// One entry per model, in command-line order.
    pub models: Vec<ModelResult>,
    /// Every (source, target) pair of distinct models, per attack and eps.
    pub transfer: Vec<TransferResult>,
    /// The val samples the models' [`ModelResult::outcomes`] refer to.
    pub samples: SampleIndex,
}

/// Per-patch labels and group ids of the val set.
#[derive(Debug, Clone)]
pub struct ValGroups {
    /// Label per patch.
    pub labels: Vec<usize>,
    /// Slide id per patch.
    pub slides: Vec<String>,
    /// Patient id per patch.
    pub patients: Vec<String>,
}

/// The kNN inputs fixed for one model: its clean train bank.
#[derive(Debug, Clone, Copy)]
pub struct Bank<'a> {
    /// Train features.
    pub features: &'a [Vec<f32>],
    /// Train labels.
    pub labels: &'a [usize],
    /// Number of classes.
    pub n_classes: usize,
    /// kNN neighbours.
    pub k: usize,
    /// kNN temperature.
    pub t: f64,
    /// Threads the queries are spread over.
    pub threads: usize,
}

/// The class scores of one evaluation at each level, in [`LEVELS`] order: what the
/// metrics and the worst case are computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelScores {
    /// Number of classes.
    pub n_classes: usize,
    /// Per level, `(scores [n][n_classes], labels [n])`; slides and patients in
    /// sorted id order (the same for every evaluation of one val set).
    pub levels: Vec<(Vec<Vec<f64>>, Vec<usize>)>,
}

impl LevelScores {
    /// Per level, per sample: is the top-scoring class the label?
    pub fn correct(&self) -> Vec<Vec<bool>> {
        self.levels
            .iter()
            .map(|(scores, labels)| {
                scores
                    .iter()
                    .zip(labels)
                    .map(|(row, &label)| ranked_classes(row).first() == Some(&label))
                    .collect()
            })
            .collect()
    }

    /// The metrics of each level (method.md §7.4).
    pub fn levels(&self) -> Result<Levels, EvalInputError> {
        LEVELS
            .iter()
            .zip(&self.levels)
            .map(|(name, (scores, labels))| {
                Ok(level_result(
                    name,
                    scores.len(),
                    metrics(scores, labels, self.n_classes)?,
                ))
            })
            .collect()
    }
}

/// kNN and patch -> slide -> patient aggregation (method.md §7.2-7.3) of `queries`
/// (one row per val patch) against `bank`.
pub fn score_levels(
    bank: Bank<'_>,
    queries: &[Vec<f32>],
    groups: &ValGroups,
) -> Result<LevelScores, EvalInputError> {
    level_scores(parallel_knn(bank, queries)?, groups, bank.n_classes)
}

/// Patch -> slide -> patient aggregation of kNN patch `scores` (one row per val
/// patch), however they were computed (here on the CPU, or on the model's device by
/// the worker).
pub fn level_scores(
    scores: Vec<Vec<f64>>,
    groups: &ValGroups,
    n_classes: usize,
) -> Result<LevelScores, EvalInputError> {
    let slides = aggregate(&scores, &groups.slides, &groups.labels)?;
    let patients = aggregate(&scores, &groups.patients, &groups.labels)?;
    Ok(LevelScores {
        n_classes,
        levels: vec![
            (scores, groups.labels.clone()),
            (slides.scores, slides.labels),
            (patients.scores, patients.labels),
        ],
    })
}

/// kNN, patch -> slide -> patient aggregation and metrics (method.md §7.2-7.4) of
/// `queries` (one row per val patch) against `bank`.
pub fn evaluate_levels(
    bank: Bank<'_>,
    queries: &[Vec<f32>],
    groups: &ValGroups,
) -> Result<Levels, EvalInputError> {
    score_levels(bank, queries, groups)?.levels()
}

/// The worst case over `runs` (the clean evaluation and every attack at one eps):
/// per level and sample, correct only if correct in every run (module docs of
/// [`WorstCaseResult`]). Accuracy and mean class accuracy per level.
///
/// # Errors
///
/// [`EvalInputError::BadInput`] if `runs` is empty or the runs do not share their
/// levels, sample counts and labels (they must be evaluations of one val set).
pub fn worst_case(runs: &[&LevelScores]) -> Result<Vec<WorstCaseLevel>, EvalInputError> {
    let survived = survived_all(runs)?;
    let first = runs[0];
    Ok(LEVELS
        .iter()
        .zip(&first.levels)
        .zip(&survived)
        .map(|((name, (_, labels)), survived)| {
            let rate = |keep: &dyn Fn(usize) -> bool| {
                let (hits, total) = (0..labels.len())
                    .filter(|&i| keep(i))
                    .fold((0_usize, 0_usize), |(h, t), i| {
                        (h + usize::from(survived[i]), t + 1)
                    });
                hits as f64 / total as f64
            };
            let present: Vec<usize> = (0..first.n_classes)
                .filter(|class| labels.contains(class))
                .collect();
            let class_rates: Vec<f64> = present
                .iter()
                .map(|&class| rate(&|i| labels[i] == class))
                .collect();
            WorstCaseLevel {
                level: (*name).to_owned(),
                n: labels.len(),
                accuracy: rate(&|_| true),
                mean_class_accuracy: class_rates.iter().sum::<f64>() / class_rates.len() as f64,
            }
        })
        .collect())
}

/// Per level and sample: correct in every one of `runs` (the per-sample worst case
/// that [`worst_case`] summarises).
///
/// # Errors
///
/// As [`worst_case`].
pub fn survived_all(runs: &[&LevelScores]) -> Result<Vec<Vec<bool>>, EvalInputError> {
    let Some(first) = runs.first() else {
        return Err(EvalInputError::BadInput(
            "the worst case needs at least one evaluation".to_owned(),
        ));
    };
    for run in runs {
        let same = run.levels.len() == first.levels.len()
            && run
                .levels
                .iter()
                .zip(&first.levels)
                .all(|((_, labels), (_, first_labels))| labels == first_labels);
        if !same {
            return Err(EvalInputError::BadInput(
                "the worst case combines evaluations of different val sets (levels or labels differ)"
                    .to_owned(),
            ));
        }
    }
    let correct: Vec<Vec<Vec<bool>>> = runs.iter().map(|run| run.correct()).collect();
    Ok(first
        .levels
        .iter()
        .enumerate()
        .map(|(l, (_, labels))| {
            (0..labels.len())
                .map(|i| correct.iter().all(|run| run[l][i]))
                .collect()
        })
        .collect())
}

/// [`knn_scores`] with the queries split over `bank.threads` threads (each query is
/// independent, so the result is the same as one call): today's exact f64 CPU path
/// (`eval.knn_device = "cpu_exact"`).
///
/// # Errors
///
/// As [`knn_scores`].
pub fn parallel_knn(bank: Bank<'_>, queries: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, EvalInputError> {
    let threads = bank.threads.clamp(1, queries.len().max(1));
    let per_thread = queries.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<Vec<f64>>, EvalInputError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queries
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    knn_scores(
                        bank.features,
                        bank.labels,
                        part,
                        bank.n_classes,
                        bank.k,
                        bank.t,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EvalInputError::BadInput("a kNN thread panicked".to_owned()))
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(queries.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

fn level_result(level: &str, n: usize, m: Metrics) -> LevelResult {
    LevelResult {
        level: level.to_owned(),
        n,
        accuracy: m.accuracy,
        top2: m.top2,
        top3: m.top3,
        mean_class_accuracy: m.mean_class_accuracy,
        mean_average_precision: m.mean_average_precision,
        confusion: m.confusion,
    }
}

/// The transfer entry of a target's clean and adversarial levels.
pub fn transfer_levels(clean: &Levels, adversarial: Levels) -> Vec<TransferLevel> {
    clean
        .iter()
        .zip(adversarial)
        .map(|(clean, adv)| TransferLevel {
            level: adv.level.clone(),
            clean_accuracy: clean.accuracy,
            accuracy: adv.accuracy,
            drop: clean.accuracy - adv.accuracy,
            metrics: adv,
        })
        .collect()
}

/// Display name of an attack, as in the paper.
pub fn attack_title(name: &str) -> &str {
    match name {
        "pgd" => "PGD",
        "bim" => "BIM",
        "mifgsm" => "MI-FGSM",
        "fgsm" => "FGSM",
        "apgd" => "APGD",
        "worst_case" => "Worst case",
        other => other,
    }
}

/// `8/255`, `4.5/255`.
fn eps_title(eps_255: f64) -> String {
    format!("{eps_255}/255")
}

/// A percentage with two decimals; `n/a` when undefined.
fn pct(value: f64) -> String {
    if value.is_finite() {
        format!("{:.2}", 100.0 * value)
    } else {
        "n/a".to_owned()
    }
}

/// The attack columns of the table: `(attack, eps)` in the order of the first
/// model's results.
fn columns(report: &EvalReport) -> Vec<(String, f64)> {
    report.models.first().map_or_else(Vec::new, |m| {
        m.attacks
            .iter()
            .map(|a| (a.attack.clone(), a.eps_255))
            .collect()
    })
}

/// The worst-case columns: the eps of the first model's worst cases.
fn worst_columns(report: &EvalReport) -> Vec<f64> {
    report.models.first().map_or_else(Vec::new, |m| {
        m.worst_case.iter().map(|w| w.eps_255).collect()
    })
}

/// The worst case of `model` at `eps` (units of 1/255), if attacks ran at it.
pub fn find_worst_case(model: &ModelResult, eps: f64) -> Option<&WorstCaseResult> {
    model.worst_case.iter().find(|w| w.eps_255 == eps)
}

/// The worst-case level called `name` of `worst`.
fn worst_level<'a>(worst: &'a WorstCaseResult, name: &str) -> Option<&'a WorstCaseLevel> {
    worst.levels.iter().find(|l| l.level == name)
}

/// How `attack` was run, for the line under the table title: iterations, step size,
/// restarts, as [`EvalSettings`] records them.
pub fn attack_settings(attack: &str, settings: &EvalSettings) -> String {
    let steps = |n: usize| format!("{n} step{}", if n == 1 { "" } else { "s" });
    let detail = match attack {
        "pgd" | "bim" => format!(
            "{}, alpha {}",
            steps(settings.steps),
            eps_title(settings.alpha_255)
        ),
        "mifgsm" => format!(
            "{}, alpha {}, decay {}",
            steps(settings.steps),
            eps_title(settings.alpha_255),
            settings.mifgsm_decay
        ),
        "fgsm" => format!("1 step, alpha {}", eps_title(settings.fgsm_alpha_255)),
        "apgd" => format!(
            "{} x {} restart{}, step 2 eps halved when progress stalls, momentum 0.75",
            steps(settings.apgd_steps),
            settings.apgd_restarts,
            if settings.apgd_restarts == 1 { "" } else { "s" }
        ),
        _ => String::new(),
    };
    format!("{} ({detail})", attack_title(attack))
}

/// The paragraph above the level tables: what every attack did and what the worst
/// case means.
fn attack_legend(report: &EvalReport) -> String {
    let cols = columns(report);
    if cols.is_empty() {
        return String::new();
    }
    let mut attacks: Vec<&str> = Vec::new();
    let mut eps: Vec<f64> = Vec::new();
    for (attack, e) in &cols {
        if !attacks.contains(&attack.as_str()) {
            attacks.push(attack);
        }
        if !eps.contains(e) {
            eps.push(*e);
        }
    }
    let s = &report.settings;
    let listed: Vec<String> = attacks.iter().map(|a| attack_settings(a, s)).collect();
    let budgets: Vec<String> = eps.iter().map(|e| eps_title(*e)).collect();
    format!(
        "Attacks: white-box, L-infinity, maximising -cosine(f(x_adv), f(x)) of the {} from a \
         random start in the eps ball (seed {}): {}; eps {}. Worst case: per sample, correct \
         only if correct on the clean images and under every attack at that eps.\n\n",
        s.attack_target,
        s.seed,
        listed.join("; "),
        budgets.join(", ")
    )
}

/// The result of `attack` at `eps` (units of 1/255) of `model`, if it was run.
pub fn find_attack<'a>(model: &'a ModelResult, attack: &str, eps: f64) -> Option<&'a AttackResult> {
    model
        .attacks
        .iter()
        .find(|a| a.attack == attack && a.eps_255 == eps)
}

/// The level called `name` (`patch`, `slide` or `patient`) of `levels`.
pub fn level<'a>(levels: &'a Levels, name: &str) -> Option<&'a LevelResult> {
    levels.iter().find(|l| l.level == name)
}

/// One Markdown table per level: rows models; columns clean, then each attack at
/// each eps; Acc and MCA in percent (the paper's Table 1 layout).
pub fn markdown_table(report: &EvalReport) -> String {
    let cols = columns(report);
    let worst = worst_columns(report);
    let mut out = attack_legend(report);
    for name in LEVELS {
        let _ = writeln!(
            out,
            "**{} level** (accuracy and mean class accuracy, %)\n",
            capitalise(name)
        );
        let mut header = "| Model | Clean Acc | Clean MCA |".to_owned();
        let mut rule = "|---|---:|---:|".to_owned();
        for (attack, eps) in &cols {
            let title = format!("{} {}", attack_title(attack), eps_title(*eps));
            let _ = write!(header, " {title} Acc | {title} MCA |");
            rule.push_str("---:|---:|");
        }
        for eps in &worst {
            let title = format!("Worst case {}", eps_title(*eps));
            let _ = write!(header, " {title} Acc | {title} MCA |");
            rule.push_str("---:|---:|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for model in &report.models {
            let mut row = format!("| {} |", model.name);
            let clean = level(&model.clean, name);
            let _ = write!(
                row,
                " {} | {} |",
                clean.map_or("n/a".into(), |l| pct(l.accuracy)),
                clean.map_or("n/a".into(), |l| pct(l.mean_class_accuracy))
            );
            for (attack, eps) in &cols {
                let result = find_attack(model, attack, *eps).and_then(|a| level(&a.levels, name));
                let _ = write!(
                    row,
                    " {} | {} |",
                    result.map_or("n/a".into(), |l| pct(l.accuracy)),
                    result.map_or("n/a".into(), |l| pct(l.mean_class_accuracy))
                );
            }
            for eps in &worst {
                let result = find_worst_case(model, *eps).and_then(|w| worst_level(w, name));
                let _ = write!(
                    row,
                    " {} | {} |",
                    result.map_or("n/a".into(), |l| pct(l.accuracy)),
                    result.map_or("n/a".into(), |l| pct(l.mean_class_accuracy))
                );
            }
            let _ = writeln!(out, "{row}");
        }
        if let Some(line) = interval_line(report, name) {
            let _ = writeln!(out, "\n{line}");
        }
        out.push('\n');
    }
    if !report.transfer.is_empty() {
        out.push_str("**Transfer (black-box)**: crafted on the source, evaluated on the target; accuracy %, drop from the target's clean accuracy in points\n\n");
        out.push_str("| Source -> Target | Attack | Patch Acc (drop) | Slide Acc (drop) | Patient Acc (drop) |\n|---|---|---:|---:|---:|\n");
        for t in &report.transfer {
            let mut row = format!(
                "| {} -> {} | {} {} |",
                t.source,
                t.target,
                attack_title(&t.attack),
                eps_title(t.eps_255)
            );
            for l in &t.levels {
                let _ = write!(row, " {} ({}) |", pct(l.accuracy), pct(l.drop));
            }
            let _ = writeln!(out, "{row}");
        }
        out.push('\n');
    }
    out
}

/// Bootstrap draws of the intervals under each table.
pub const TABLE_RESAMPLES: usize = 2000;

/// How uncertain a level's accuracies are: each model's 95 % interval of the clean
/// and the worst-case accuracy, resampling val patients ([`patient_interval`]);
/// `None` without per-sample outcomes.
fn interval_line(report: &EvalReport, level_name: &str) -> Option<String> {
    let samples = report
        .samples
        .levels
        .iter()
        .find(|l| l.level == level_name)?;
    let patients = {
        let mut ids: Vec<&String> = samples.patients.iter().collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    let l = LEVELS.iter().position(|n| *n == level_name)?;
    let mut parts = Vec::new();
    for model in &report.models {
        let mut cells = Vec::new();
        for outcome in &model.outcomes {
            if outcome.run != "clean" && !outcome.run.starts_with("worst_case@") {
                continue;
            }
            // An outcome that does not fit the index is left out, not the whole line.
            let Some(interval) = outcome
                .correct
                .get(l)
                .and_then(|correct| patient_interval(samples, correct, TABLE_RESAMPLES, 0))
            else {
                continue;
            };
            let title = match outcome.run.split_once('@') {
                Some((_, eps)) => format!("worst case {eps}/255"),
                None => "clean".to_owned(),
            };
            cells.push(format!(
                "{title} {:.0}-{:.0}",
                100.0 * interval.low,
                100.0 * interval.high
            ));
        }
        if !cells.is_empty() {
            parts.push(format!("{} {}", model.name, cells.join(", ")));
        }
    }
    (!parts.is_empty()).then(|| {
        format!(
            "95 % intervals of Acc (%), resampling the {patients} val patients ({TABLE_RESAMPLES} bootstrap draws): {}",
            parts.join("; ")
        )
    })
}

/// The 95 % interval of an accuracy whose per-sample outcomes are `correct` (`1`/`0`
/// per sample of `samples`), by resampling patients with all their samples
/// ([`super::stats::bootstrap_accuracy`]); `None` when the lengths differ or there
/// are no samples.
pub fn patient_interval(
    samples: &SampleLevel,
    correct: &str,
    resamples: usize,
    seed: u64,
) -> Option<super::stats::Interval> {
    if correct.len() != samples.patients.len() || correct.is_empty() {
        return None;
    }
    let mut ids: Vec<&String> = samples.patients.iter().collect();
    ids.sort();
    ids.dedup();
    let mut tallies = vec![super::stats::Tally::default(); ids.len()];
    for (bit, patient) in correct.bytes().zip(&samples.patients) {
        let p = ids.binary_search(&patient).ok()?;
        tallies[p].total += 1;
        tallies[p].correct += u32::from(bit == b'1');
    }
    Some(super::stats::bootstrap_accuracy(&tallies, resamples, seed))
}

/// The same numbers as CSV, one line per (model, level): `model,level,clean_acc,
/// clean_mca,<attack>_<eps>_acc,<attack>_<eps>_mca,...,worst_<eps>_acc,
/// worst_<eps>_mca,...`, in percent.
pub fn csv_table(report: &EvalReport) -> String {
    let cols = columns(report);
    let worst = worst_columns(report);
    let mut out = "model,level,clean_acc,clean_mca".to_owned();
    for (attack, eps) in &cols {
        let _ = write!(out, ",{attack}_{eps}_acc,{attack}_{eps}_mca");
    }
    for eps in &worst {
        let _ = write!(out, ",worst_{eps}_acc,worst_{eps}_mca");
    }
    out.push('\n');
    for model in &report.models {
        for name in LEVELS {
            let mut cells = vec![csv_cell(&model.name), name.to_owned()];
            let clean = level(&model.clean, name);
            cells.push(clean.map_or(String::new(), |l| csv_pct(l.accuracy)));
            cells.push(clean.map_or(String::new(), |l| csv_pct(l.mean_class_accuracy)));
            for (attack, eps) in &cols {
                let result = find_attack(model, attack, *eps).and_then(|a| level(&a.levels, name));
                cells.push(result.map_or(String::new(), |l| csv_pct(l.accuracy)));
                cells.push(result.map_or(String::new(), |l| csv_pct(l.mean_class_accuracy)));
            }
            for eps in &worst {
                let result = find_worst_case(model, *eps).and_then(|w| worst_level(w, name));
                cells.push(result.map_or(String::new(), |l| csv_pct(l.accuracy)));
                cells.push(result.map_or(String::new(), |l| csv_pct(l.mean_class_accuracy)));
            }
            let _ = writeln!(out, "{}", cells.join(","));
        }
    }
    out
}

fn csv_pct(value: f64) -> String {
    if value.is_finite() {
        format!("{:.4}", 100.0 * value)
    } else {
        String::new()
    }
}

/// Quotes a CSV cell when it needs it.
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(acc: f64) -> Levels {
        LEVELS
            .iter()
            .map(|name| LevelResult {
                level: (*name).to_owned(),
                n: 4,
                accuracy: acc,
                top2: 1.0,
                top3: 1.0,
                mean_class_accuracy: acc / 2.0,
                mean_average_precision: f64::NAN,
                confusion: vec![vec![1, 0], vec![0, 1]],
            })
            .collect()
    }

    fn report() -> EvalReport {
        let model = |name: &str, clean: f64, robust: f64| ModelResult {
            name: name.to_owned(),
            checkpoint: "runs/x".to_owned(),
            backbone: "resnet18".to_owned(),
            step: Some(9),
            clean: levels(clean),
            attacks: vec![AttackResult {
                attack: "pgd".to_owned(),
                eps_255: 8.0,
                levels: levels(robust),
            }],
            worst_case: vec![WorstCaseResult {
                eps_255: 8.0,
                attacks: vec!["pgd".to_owned()],
                levels: LEVELS
                    .iter()
                    .map(|name| WorstCaseLevel {
                        level: (*name).to_owned(),
                        n: 4,
                        accuracy: robust / 2.0,
                        mean_class_accuracy: f64::NAN,
                    })
                    .collect(),
            }],
            outcomes: Vec::new(),
        };
        EvalReport {
            settings: EvalSettings {
                knn_k: 200,
                knn_temperature: 0.07,
                alpha_255: 2.0,
                steps: 10,
                apgd_steps: 100,
                apgd_restarts: 1,
                fgsm_alpha_255: 10.0,
                mifgsm_decay: 1.0,
                attack_target: "backbone".to_owned(),
                seed: 0,
                image_size: 64,
            },
            dataset: DatasetSummary {
                classes: vec!["a".into(), "b".into()],
                train_patches: 8,
                val_patches: 4,
                val_slides: 2,
                val_patients: 2,
                fingerprint: "f".into(),
            },
            models: vec![model("HiDisc", 0.9, 0.05), model("HSAT, adv", 0.7, 0.6)],
            transfer: Vec::new(),
            samples: SampleIndex { levels: Vec::new() },
        }
    }

    #[test]
    fn markdown_has_a_row_per_model_and_paper_columns() {
        let md = markdown_table(&report());
        assert!(
            md.contains(
                "| Model | Clean Acc | Clean MCA | PGD 8/255 Acc | PGD 8/255 MCA | \
                 Worst case 8/255 Acc | Worst case 8/255 MCA |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| HiDisc | 90.00 | 45.00 | 5.00 | 2.50 | 2.50 | n/a |"),
            "{md}"
        );
        // The line above the tables says how each attack ran.
        assert!(
            md.starts_with(
                "Attacks: white-box, L-infinity, maximising -cosine(f(x_adv), f(x)) of the backbone"
            ),
            "{md}"
        );
        assert!(
            md.contains("PGD (10 steps, alpha 2/255); eps 8/255."),
            "{md}"
        );
        assert_eq!(md.matches("**").count(), 6, "three level tables: {md}");
    }

    #[test]
    fn csv_quotes_names_and_leaves_undefined_cells_empty() {
        let csv = csv_table(&report());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "model,level,clean_acc,clean_mca,pgd_8_acc,pgd_8_mca,worst_8_acc,worst_8_mca"
        );
        assert_eq!(lines.len(), 1 + 2 * 3);
        assert_eq!(
            lines[4],
            "\"HSAT, adv\",patch,70.0000,35.0000,60.0000,30.0000,30.0000,"
        );
    }

    #[test]
    fn every_attack_names_its_settings() {
        let s = report().settings;
        let line = |a: &str| attack_settings(a, &s);
        assert_eq!(line("bim"), "BIM (10 steps, alpha 2/255)");
        assert_eq!(line("mifgsm"), "MI-FGSM (10 steps, alpha 2/255, decay 1)");
        assert_eq!(line("fgsm"), "FGSM (1 step, alpha 10/255)");
        assert_eq!(
            line("apgd"),
            "APGD (100 steps x 1 restart, step 2 eps halved when progress stalls, momentum 0.75)"
        );
    }

    /// Scores of one evaluation whose predictions at every level are `predicted`
    /// (one-hot rows of 3 classes), labels `labels`.
    fn scored(predicted: &[usize], labels: &[usize]) -> LevelScores {
        let rows: Vec<Vec<f64>> = predicted
            .iter()
            .map(|&p| (0..3).map(|c| if c == p { 0.8 } else { 0.1 }).collect())
            .collect();
        LevelScores {
            n_classes: 3,
            levels: vec![(rows, labels.to_vec()); 3],
        }
    }

    #[test]
    fn worst_case_counts_a_sample_that_fails_one_attack_as_wrong() {
        let labels = [0, 0, 1, 1, 2];
        let clean = scored(&[0, 0, 1, 1, 0], &labels); // sample 4 wrong already
        let pgd = scored(&[0, 1, 1, 1, 2], &labels); // fails sample 1 only (4 right here)
        let apgd = scored(&[0, 0, 1, 0, 2], &labels); // fails sample 3 only
        // Each attack alone keeps 4 of 5; each sample fails at most one attack.
        for run in [&pgd, &apgd] {
            assert_eq!(run.levels().unwrap()[0].accuracy, 0.8);
        }
        let worst = worst_case(&[&clean, &pgd, &apgd]).unwrap();
        assert_eq!(worst.len(), 3);
        for level in &worst {
            // Only samples 0 and 2 survive everything (4 is wrong on the clean image).
            assert_eq!(level.n, 5);
            assert_eq!(level.accuracy, 2.0 / 5.0, "{level:?}");
            // Class 0: 1 of 2; class 1: 1 of 2; class 2: 0 of 1.
            assert!((level.mean_class_accuracy - (0.5 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        }
        assert_eq!(
            worst.iter().map(|l| l.level.as_str()).collect::<Vec<_>>(),
            LEVELS
        );
        // The worst case of one run is that run's accuracy; order does not matter.
        assert_eq!(worst_case(&[&pgd]).unwrap()[0].accuracy, 0.8);
        assert_eq!(worst_case(&[&apgd, &pgd, &clean]).unwrap(), worst);
        let survived = survived_all(&[&clean, &pgd, &apgd]).unwrap();
        assert_eq!(outcome_bits(&survived[0]), "10100");
        assert_eq!(survived, vec![survived[0].clone(); 3]);
    }

    #[test]
    fn the_sample_index_follows_the_aggregation_order_and_names_each_patient() {
        // Patches of two patients, listed out of id order; slides `patient/slide`.
        let groups = ValGroups {
            labels: vec![1, 1, 0, 0, 1],
            slides: ["p9/b", "p9/a", "p1/a", "p1/a", "p9/b"]
                .map(String::from)
                .to_vec(),
            patients: ["p9", "p9", "p1", "p1", "p9"].map(String::from).to_vec(),
        };
        let ids: Vec<String> = (0..5).map(|i| format!("x{i}.tif")).collect();
        let index = SampleIndex::new(&groups, &ids);
        let levels: Vec<_> = index.levels.iter().map(|l| l.level.as_str()).collect();
        assert_eq!(levels, LEVELS);
        assert_eq!(index.levels[0].ids, ids);
        assert_eq!(index.levels[0].patients, groups.patients);
        assert_eq!(index.levels[1].ids, ["p1/a", "p9/a", "p9/b"]);
        assert_eq!(index.levels[1].patients, ["p1", "p9", "p9"]);
        assert_eq!(index.levels[2].ids, ["p1", "p9"]);
        // The same order as the aggregation the scores come from: patches of p9/a are
        // classified right, those of p9/b wrong, those of p1/a right, so the slide
        // outcomes in index order (p1/a, p9/a, p9/b) are 1, 1, 0, and the patients'
        // (p1, p9: two of p9's three patches vote for the wrong class) 1, 0.
        let class = |c: usize| {
            if c == 0 {
                vec![0.9, 0.1]
            } else {
                vec![0.1, 0.9]
            }
        };
        let scores = vec![class(0), class(1), class(0), class(0), class(0)];
        let aggregated = level_scores(scores, &groups, 2).unwrap();
        assert_eq!(aggregated.levels[1].1, [0, 1, 1]);
        assert_eq!(aggregated.levels[2].1, [0, 1]);
        let correct = aggregated.correct();
        assert_eq!(outcome_bits(&correct[0]), "01110");
        assert_eq!(
            outcome_bits(&correct[1]),
            "110",
            "slides in the index's order"
        );
        assert_eq!(outcome_bits(&correct[2]), "10");
        assert_eq!(outcome_name("worst_case", 8.0), "worst_case@8");
        assert_eq!(outcome_name("apgd", 0.5), "apgd@0.5");
    }

    #[test]
    fn worst_case_refuses_runs_of_different_val_sets() {
        let a = scored(&[0, 1], &[0, 1]);
        let b = scored(&[0, 1], &[1, 1]);
        assert!(matches!(
            worst_case(&[&a, &b]),
            Err(EvalInputError::BadInput(_))
        ));
        assert!(worst_case(&[]).is_err());
    }

    #[test]
    fn tables_state_each_accuracy_interval_over_val_patients() {
        let mut report = report();
        // 4 patches in 2 slides of 2 patients, as SampleIndex::new builds it.
        let groups = ValGroups {
            labels: vec![0, 0, 1, 1],
            slides: ["a/x", "a/x", "b/x", "b/x"].map(String::from).to_vec(),
            patients: ["a", "a", "b", "b"].map(String::from).to_vec(),
        };
        let ids: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
        report.samples = SampleIndex::new(&groups, &ids);
        let outcome = |run: &str, bits: [&str; 3]| SampleOutcomes {
            run: run.into(),
            correct: bits.map(String::from).to_vec(),
        };
        report.models[0].outcomes = vec![
            outcome("clean", ["1111", "11", "11"]),
            outcome("pgd@8", ["1010", "10", "10"]),
            outcome("worst_case@8", ["1100", "10", "10"]),
        ];
        // An outcome of the wrong length is left out; the others still print.
        report.models[1].outcomes = vec![
            outcome("clean", ["111", "11", "11"]),
            outcome("worst_case@8", ["0000", "00", "00"]),
        ];
        let md = markdown_table(&report);
        let lines: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("95 % intervals"))
            .collect();
        assert_eq!(lines.len(), 3, "one line per level:\n{md}");
        for line in &lines {
            assert!(line.contains("resampling the 2 val patients"), "{line}");
            // Clean: every patient all right. Worst case: patient a right, b wrong, so
            // a resample holds 0, 1 or 2 copies of a: 0 .. 100.
            assert!(
                line.contains("HiDisc clean 100-100, worst case 8/255 0-100"),
                "{line}"
            );
        }
        // The patch level's HSAT clean outcome has 3 bits for 4 patches.
        assert!(
            lines[0].contains("HSAT, adv worst case 8/255 0-0"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("HSAT, adv clean"), "{}", lines[0]);
        assert!(lines[1].contains("HSAT, adv clean 100-100"), "{}", lines[1]);
        let samples = &report.samples.levels[0];
        assert!(
            patient_interval(samples, "101", 10, 0).is_none(),
            "length mismatch"
        );
    }

    #[test]
    fn json_writes_undefined_metrics_as_null() {
        let text = serde_json::to_string(&report()).unwrap();
        assert!(text.contains("\"mean_average_precision\":null"));
    }
}
