//! `report.md` of `hsat repro`: the verdict, the sizes and settings the numbers
//! depend on, the run time, and one table per level (mean +- sd per method, the
//! difference with both intervals).

use std::fmt::Write as _;

use hsat_core::config::Config;
use hsat_core::eval::report::attack_title;
use hsat_core::eval::repro::{
    EvaluationSummary, IntervalOut, ReproSummary, SeedRun, evaluation_title,
};
use hsat_data::synth::{CLASS_NAMES, SynthSpec};

use super::BASELINE_OVERRIDES;

/// Per seed, the seconds its training and evaluation took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedTimes {
    /// The seed.
    pub seed: u64,
    /// Both training runs.
    pub train_seconds: f64,
    /// The evaluation.
    pub eval_seconds: f64,
}

/// The Markdown report.
pub fn markdown(
    summary: &ReproSummary,
    dataset: &SynthSpec,
    cfg: &Config,
    runs: &[SeedRun],
    times: &[SeedTimes],
) -> String {
    let (baseline, method) = (&summary.methods[0], &summary.methods[1]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# hsat repro: {method} against {baseline}, {} seeds\n",
        summary.seeds.len()
    );
    verdict(&mut out, summary);
    sizes(&mut out, summary, dataset, cfg, runs, times);
    for level in &summary.levels {
        let _ = writeln!(
            out,
            "\n## {} level ({} val samples of {} patients)\n",
            capitalise(&level.level),
            level.samples,
            level.patients
        );
        let _ = writeln!(
            out,
            "Accuracy %, mean +- sd over seeds; {method} - {baseline} in points with its 95 % intervals.\n"
        );
        let _ = writeln!(
            out,
            "| Evaluation | {baseline} | {method} | {method} - {baseline} | t interval (seeds) | bootstrap interval (seeds x patients) | per seed |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
        for e in &level.evaluations {
            let cell = |m: usize| pct_sd(e.methods[m].mean, e.methods[m].sd);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                evaluation_title(&e.run),
                cell(0),
                cell(1),
                signed(e.difference.mean),
                e.difference
                    .t_interval
                    .map_or("n/a (one seed)".to_owned(), interval),
                interval(e.difference.bootstrap),
                e.difference
                    .per_seed
                    .iter()
                    .map(|d| signed(*d))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    out
}

fn verdict(out: &mut String, summary: &ReproSummary) {
    let (baseline, method) = (&summary.methods[0], &summary.methods[1]);
    let v = &summary.verdict;
    let _ = writeln!(
        out,
        "**The paper's pattern {}.** It holds when {method}'s robust accuracy (the worst case over every attack, per sample) is clearly higher than {baseline}'s at every level and budget (both 95 % intervals of the difference, over seeds and over seeds x patients, lie above zero) and its clean accuracy is at most {:.0} points lower at every level.\n",
        if v.holds { "holds" } else { "does not hold" },
        100.0 * v.clean_margin
    );
    let worst: Vec<(&str, &EvaluationSummary)> = summary
        .levels
        .iter()
        .flat_map(|l| {
            l.evaluations
                .iter()
                .filter(|e| e.run.starts_with("worst_case@"))
                .map(move |e| (l.level.as_str(), e))
        })
        .collect();
    let _ = writeln!(
        out,
        "- Robust accuracy clearly higher: **{}**. {}",
        yes_no(v.robust_clearly_higher),
        worst
            .iter()
            .map(|(level, e)| format!(
                "{level} {}: {} t {} bootstrap {}",
                evaluation_title(&e.run).trim_start_matches("Worst case "),
                signed(e.difference.mean),
                e.difference.t_interval.map_or("n/a".to_owned(), interval),
                interval(e.difference.bootstrap)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let clean: Vec<String> = summary
        .levels
        .iter()
        .flat_map(|l| {
            l.evaluations
                .iter()
                .filter(|e| e.run == "clean")
                .map(move |e| {
                    format!(
                        "{} {} {}",
                        l.level,
                        signed(e.difference.mean),
                        interval(e.difference.bootstrap)
                    )
                })
        })
        .collect();
    let _ = writeln!(
        out,
        "- Clean accuracy within {:.0} points: **{}**. {}\n",
        100.0 * v.clean_margin,
        yes_no(v.clean_within_margin),
        clean.join("; ")
    );
}

fn sizes(
    out: &mut String,
    summary: &ReproSummary,
    dataset: &SynthSpec,
    cfg: &Config,
    runs: &[SeedRun],
    times: &[SeedTimes],
) {
    let train_patients = dataset.patients_per_class - dataset.val_patients_per_class;
    let t = &cfg.training;
    let e = &cfg.eval;
    let steps = runs
        .first()
        .map(|r| {
            r.methods
                .iter()
                .map(|m| {
                    format!(
                        "{} {}",
                        m.name,
                        m.steps.map_or("?".to_owned(), |s| s.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let _ = writeln!(out, "## Sizes and settings\n");
    let _ = writeln!(
        out,
        "- **Dataset** (`hsat synth --format {} --seed {} --stain-spread {}`): {} classes ({}), {} train and {} val patients per class ({} train, {} val patients), {} slides per patient, {} patches per slide, {} px.",
        dataset.format,
        dataset.seed,
        dataset.stain_spread,
        dataset.classes,
        CLASS_NAMES[..dataset.classes.min(CLASS_NAMES.len())].join(", "),
        train_patients,
        dataset.val_patients_per_class,
        train_patients * dataset.classes,
        dataset.val_patients_per_class * dataset.classes,
        dataset.slides_per_patient,
        dataset.patches_per_slide,
        dataset.size
    );
    let _ = writeln!(
        out,
        "- **Training**, the same budget for both: {} at {} px, {} epochs of {} patients per step (steps per run: {steps}); {}: PGD eps {}/255, alpha {}/255, {} iterations, loss {}, only_adv {}; {}: the same config with `{}`. Seeds: {}.",
        cfg.model.backbone,
        cfg.data.image_size,
        t.num_epochs,
        t.batch_size,
        summary.methods[1],
        t.attack.eps_255,
        t.attack.alpha_255,
        t.attack.iters,
        t.attack.loss_type,
        t.only_adv,
        summary.methods[0],
        BASELINE_OVERRIDES.join(" "),
        summary
            .seeds
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "- **Evaluation** (`hsat eval`, white-box, on the backbone): kNN k = {}, T = {}; {} at eps {}/255 (PGD {} steps of {}/255, APGD {} steps x {} restart(s)); worst case per sample over the clean images and every attack at that eps.",
        e.knn_k,
        e.knn_temperature,
        e.attacks
            .iter()
            .map(|a| attack_title(a.name()))
            .collect::<Vec<_>>()
            .join(", "),
        e.eps_255
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        e.steps,
        e.alpha_255,
        e.apgd_steps,
        e.apgd_restarts
    );
    let _ = writeln!(
        out,
        "- **Statistics**: mean and sample sd over seeds; the difference per seed (paired: both methods share the seed and the val set); a 95 % Student-t interval over seeds; a 95 % percentile bootstrap ({} resamples) that draws seeds and then val patients with replacement (a patient's patches and slides are not independent, so patients are the unit).",
        summary.resamples
    );
    let train: f64 = times.iter().map(|t| t.train_seconds).sum();
    let eval: f64 = times.iter().map(|t| t.eval_seconds).sum();
    let _ = writeln!(
        out,
        "- **Run time** on {} (intra-op threads {}): training {:.1} min, evaluation {:.1} min, {:.1} min in all ({}).",
        std::thread::available_parallelism()
            .map_or("this machine".to_owned(), |n| format!("{n} cores")),
        cfg.infra.torch_threads(),
        train / 60.0,
        eval / 60.0,
        (train + eval) / 60.0,
        times
            .iter()
            .map(|t| format!(
                "seed {}: {:.0} s + {:.0} s",
                t.seed, t.train_seconds, t.eval_seconds
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

fn pct_sd(mean: f64, sd: f64) -> String {
    format!("{:.1} +- {:.1}", 100.0 * mean, 100.0 * sd)
}

fn signed(value: f64) -> String {
    format!("{:+.1}", 100.0 * value)
}

fn interval(i: IntervalOut) -> String {
    format!("[{:+.1}, {:+.1}]", 100.0 * i.low, 100.0 * i.high)
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}
