//! The summary of `hsat repro`: two methods (a baseline and the method compared
//! with it), each trained with the same seeds and evaluated on the same val patients,
//! reduced to mean and sd per level and evaluation, the per-seed differences with a
//! t interval and a cluster bootstrap interval ([`super::stats`]), and a verdict on
//! the paper's pattern.
//!
//! Pure: the worker trains, evaluates and stores each seed's per-sample outcomes
//! ([`SeedRun`]); this turns them into numbers, and `hsat_data::plot` draws them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::EvalInputError;
use super::report::{LEVELS, SampleIndex, SampleOutcomes, attack_title};
use super::stats::{Interval, PairedTallies, Tally, bootstrap_difference, mean_sd, t_interval};

/// One seed of the experiment: both methods' per-sample outcomes on one val set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedRun {
    /// The training seed (`infra.seed`) both methods used.
    pub seed: u64,
    /// The val samples the outcomes refer to.
    pub samples: SampleIndex,
    /// Baseline first, then the method.
    pub methods: Vec<MethodRun>,
}

/// One method's outcomes in one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodRun {
    /// `HiDisc`, `HSAT`.
    pub name: String,
    /// Its training step count.
    pub steps: Option<u64>,
    /// Per evaluation (`clean`, `pgd@8`, `worst_case@8`, ...).
    pub outcomes: Vec<SampleOutcomes>,
}

/// Mean and sd of one method's accuracy over seeds (fractions in [0, 1]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodCell {
    /// Method name.
    pub method: String,
    /// Mean over seeds.
    pub mean: f64,
    /// Sample sd over seeds (0 for one seed).
    pub sd: f64,
    /// Per seed, in seed order.
    pub per_seed: Vec<f64>,
}

/// `method - baseline` for one evaluation at one level (fractions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// Mean over seeds.
    pub mean: f64,
    /// Per seed.
    pub per_seed: Vec<f64>,
    /// 95 % Student-t interval over seeds (none with one seed).
    pub t_interval: Option<IntervalOut>,
    /// 95 % two-stage (seeds, then val patients) cluster bootstrap interval.
    pub bootstrap: IntervalOut,
}

impl Difference {
    /// Clearly positive: both 95 % intervals lie above zero. Both are needed because
    /// with a handful of seeds the bootstrap's seed stage under-covers (resampling 3
    /// values shrinks their spread and uses normal-like quantiles where Student's t
    /// with 2 degrees of freedom needs 4.30), while the t interval ignores which
    /// patients the val set happened to hold.
    pub fn clearly_positive(&self) -> bool {
        self.bootstrap.low > 0.0 && self.t_interval.is_none_or(|t| t.low > 0.0)
    }
}

/// An [`Interval`] as it is written to `report.json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IntervalOut {
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

impl From<Interval> for IntervalOut {
    fn from(interval: Interval) -> Self {
        IntervalOut {
            low: interval.low,
            high: interval.high,
        }
    }
}

/// One evaluation (a column of the paper's table) at one level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationSummary {
    /// `clean`, `pgd@8`, `apgd@4`, `worst_case@8`, ...
    pub run: String,
    /// Baseline, then method.
    pub methods: Vec<MethodCell>,
    /// Method minus baseline.
    pub difference: Difference,
}

/// Every evaluation at one level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelSummary {
    /// `patch`, `slide` or `patient`.
    pub level: String,
    /// Val samples at this level.
    pub samples: usize,
    /// Val patients they belong to (the bootstrap's clusters).
    pub patients: usize,
    /// In the order of the evaluations.
    pub evaluations: Vec<EvaluationSummary>,
}

/// Whether the paper's pattern holds: the method's robust (worst-case) accuracy is
/// clearly higher at every level and budget, its clean accuracy within a few points.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Every `worst_case@eps` difference is [clearly
    /// positive](Difference::clearly_positive), at every level.
    pub robust_clearly_higher: bool,
    /// Every level's mean clean difference is at least `-clean_margin` (the method
    /// loses at most that much clean accuracy).
    pub clean_within_margin: bool,
    /// The margin, in accuracy points (fraction).
    pub clean_margin: f64,
    /// Both.
    pub holds: bool,
}

/// The whole summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReproSummary {
    /// Baseline, then method.
    pub methods: Vec<String>,
    /// Training seeds, in order.
    pub seeds: Vec<u64>,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Patch, slide, patient.
    pub levels: Vec<LevelSummary>,
    /// The paper's pattern.
    pub verdict: Verdict,
}

/// Summarises `runs` (at least one seed, each with the same two methods and the same
/// val patients): accuracy per level and evaluation, differences with intervals
/// (`resamples` bootstrap draws seeded with `bootstrap_seed`), and the verdict with
/// `clean_margin`.
///
/// # Errors
///
/// [`EvalInputError::BadInput`] when the seeds do not fit together: no seed, not two
/// methods, other samples, a missing evaluation or outcome strings of the wrong
/// length.
pub fn summarise(
    runs: &[SeedRun],
    resamples: usize,
    bootstrap_seed: u64,
    clean_margin: f64,
) -> Result<ReproSummary, EvalInputError> {
    let bad = |what: String| EvalInputError::BadInput(what);
    let first = runs
        .first()
        .ok_or_else(|| bad("the experiment has no finished seed".to_owned()))?;
    let methods: Vec<String> = first.methods.iter().map(|m| m.name.clone()).collect();
    if methods.len() != 2 {
        return Err(bad(format!(
            "the experiment compares two methods, seed {} has {}",
            first.seed,
            methods.len()
        )));
    }
    let evaluations: Vec<String> = first.methods[0]
        .outcomes
        .iter()
        .map(|o| o.run.clone())
        .collect();
    for run in runs {
        let names: Vec<&String> = run.methods.iter().map(|m| &m.name).collect();
        if names != methods.iter().collect::<Vec<_>>() {
            return Err(bad(format!(
                "seed {} has the methods {names:?}, not {methods:?}",
                run.seed
            )));
        }
        if run.samples != first.samples {
            return Err(bad(format!(
                "seed {} was evaluated on other val samples than seed {}",
                run.seed, first.seed
            )));
        }
    }
    let seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    let mut levels = Vec::with_capacity(LEVELS.len());
    for (l, level) in first.samples.levels.iter().enumerate() {
        let patient_ids: BTreeMap<&str, usize> = {
            let mut ids: Vec<&str> = level.patients.iter().map(String::as_str).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect()
        };
        let cluster: Vec<usize> = level
            .patients
            .iter()
            .map(|p| patient_ids[p.as_str()])
            .collect();
        let mut summaries = Vec::with_capacity(evaluations.len());
        for evaluation in &evaluations {
            // [seed][patient] tallies of each method.
            let mut paired = PairedTallies {
                baseline: Vec::with_capacity(runs.len()),
                method: Vec::with_capacity(runs.len()),
            };
            for run in runs {
                for (m, method) in run.methods.iter().enumerate() {
                    let outcome = method
                        .outcomes
                        .iter()
                        .find(|o| &o.run == evaluation)
                        .ok_or_else(|| {
                            bad(format!(
                                "seed {}: {} has no evaluation {evaluation}",
                                run.seed, method.name
                            ))
                        })?;
                    let bits = outcome
                        .correct
                        .get(l)
                        .map(String::as_bytes)
                        .unwrap_or_default();
                    if bits.len() != cluster.len() {
                        return Err(bad(format!(
                            "seed {}: {} {evaluation} has {} {} outcomes for {} samples",
                            run.seed,
                            method.name,
                            bits.len(),
                            level.level,
                            cluster.len()
                        )));
                    }
                    let mut per_patient = vec![Tally::default(); patient_ids.len()];
                    for (&bit, &p) in bits.iter().zip(&cluster) {
                        per_patient[p].total += 1;
                        per_patient[p].correct += u32::from(bit == b'1');
                    }
                    if m == 0 {
                        paired.baseline.push(per_patient);
                    } else {
                        paired.method.push(per_patient);
                    }
                }
            }
            let accuracies = |per_seed: &[Vec<Tally>]| -> Vec<f64> {
                per_seed
                    .iter()
                    .map(|patients| {
                        let (c, t) = patients.iter().fold((0_u64, 0_u64), |(c, t), x| {
                            (c + u64::from(x.correct), t + u64::from(x.total))
                        });
                        c as f64 / t as f64
                    })
                    .collect()
            };
            let cells: Vec<MethodCell> = [&paired.baseline, &paired.method]
                .into_iter()
                .zip(&methods)
                .map(|(per_seed, name)| {
                    let per_seed = accuracies(per_seed);
                    let stats = mean_sd(&per_seed);
                    MethodCell {
                        method: name.clone(),
                        mean: stats.mean,
                        sd: stats.sd,
                        per_seed,
                    }
                })
                .collect();
            let per_seed = paired.seed_differences();
            summaries.push(EvaluationSummary {
                run: evaluation.clone(),
                methods: cells,
                difference: Difference {
                    mean: mean_sd(&per_seed).mean,
                    t_interval: t_interval(&per_seed).map(IntervalOut::from),
                    per_seed,
                    bootstrap: bootstrap_difference(&paired, resamples, bootstrap_seed).into(),
                },
            });
        }
        levels.push(LevelSummary {
            level: level.level.clone(),
            samples: cluster.len(),
            patients: patient_ids.len(),
            evaluations: summaries,
        });
    }
    let robust_clearly_higher = levels.iter().all(|level| {
        let worst: Vec<&EvaluationSummary> = level
            .evaluations
            .iter()
            .filter(|e| e.run.starts_with("worst_case@"))
            .collect();
        !worst.is_empty() && worst.iter().all(|e| e.difference.clearly_positive())
    });
    let clean_within_margin = levels.iter().all(|level| {
        level
            .evaluations
            .iter()
            .filter(|e| e.run == "clean")
            .all(|e| e.difference.mean >= -clean_margin)
    });
    Ok(ReproSummary {
        methods,
        seeds,
        resamples,
        levels,
        verdict: Verdict {
            robust_clearly_higher,
            clean_within_margin,
            clean_margin,
            holds: robust_clearly_higher && clean_within_margin,
        },
    })
}

/// `clean` -> `Clean`, `pgd@8` -> `PGD 8/255`, `worst_case@4` -> `Worst case 4/255`.
pub fn evaluation_title(run: &str) -> String {
    match run.split_once('@') {
        Some((attack, eps)) => format!("{} {eps}/255", attack_title(attack)),
        None => {
            let mut chars = run.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_uppercase().chain(chars).collect()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::SampleLevel;

    /// 4 patients of 2 patches each: patch level 8 samples, patient level 4.
    fn samples() -> SampleIndex {
        let patients: Vec<String> = ["a", "a", "b", "b", "c", "c", "d", "d"]
            .map(String::from)
            .to_vec();
        let ids = ["a", "b", "c", "d"].map(String::from).to_vec();
        SampleIndex {
            levels: vec![
                SampleLevel {
                    level: "patch".into(),
                    ids: (0..8).map(|i| format!("p{i}")).collect(),
                    patients,
                },
                SampleLevel {
                    level: "patient".into(),
                    ids: ids.clone(),
                    patients: ids,
                },
            ],
        }
    }

    fn method(name: &str, clean: [&str; 2], worst: [&str; 2]) -> MethodRun {
        let outcome = |run: &str, bits: [&str; 2]| SampleOutcomes {
            run: run.into(),
            correct: bits.map(String::from).to_vec(),
        };
        MethodRun {
            name: name.into(),
            steps: Some(3),
            outcomes: vec![outcome("clean", clean), outcome("worst_case@8", worst)],
        }
    }

    fn seed(seed: u64, baseline_worst: [&str; 2], method_worst: [&str; 2]) -> SeedRun {
        SeedRun {
            seed,
            samples: samples(),
            methods: vec![
                method("HiDisc", ["11111111", "1111"], baseline_worst),
                method("HSAT", ["11111110", "1111"], method_worst),
            ],
        }
    }

    #[test]
    fn a_method_robust_on_every_patient_holds_the_pattern() {
        let runs = [
            seed(1, ["00000000", "0000"], ["11111100", "1110"]),
            seed(2, ["10000000", "0000"], ["11111111", "1111"]),
            seed(3, ["00000000", "0000"], ["11110111", "1111"]),
        ];
        let summary = summarise(&runs, 1000, 5, 0.05).unwrap();
        assert_eq!(summary.seeds, [1, 2, 3]);
        let patch = &summary.levels[0];
        assert_eq!((patch.samples, patch.patients), (8, 4));
        assert_eq!(evaluation_title("worst_case@8"), "Worst case 8/255");
        assert_eq!(evaluation_title("clean"), "Clean");
        let clean = &patch.evaluations[0];
        assert_eq!(clean.methods[0].per_seed, [1.0; 3]);
        assert_eq!(clean.methods[1].per_seed, [0.875; 3]);
        assert!((clean.difference.mean + 0.125).abs() < 1e-12);
        let worst = &patch.evaluations[1];
        assert_eq!(worst.methods[1].per_seed, [0.75, 1.0, 0.875]);
        assert_eq!(worst.methods[0].per_seed, [0.0, 0.125, 0.0]);
        assert!((worst.methods[1].mean - 0.875).abs() < 1e-12);
        assert!((worst.methods[1].sd - 0.125).abs() < 1e-12);
        assert_eq!(worst.difference.per_seed, [0.75, 0.875, 0.875]);
        assert!(
            worst.difference.bootstrap.low > 0.5,
            "{:?}",
            worst.difference
        );
        let t = worst.difference.t_interval.unwrap();
        assert!(t.low < worst.difference.mean && worst.difference.mean < t.high);
        assert!(summary.verdict.robust_clearly_higher);
        // Clean: -12.5 points at the patch level, beyond a 5-point margin.
        assert!(!summary.verdict.clean_within_margin && !summary.verdict.holds);
        let lenient = summarise(&runs, 1000, 5, 0.2).unwrap();
        assert!(lenient.verdict.holds);
    }

    #[test]
    fn a_difference_is_clear_only_when_both_intervals_exclude_zero() {
        let interval = |low, high| IntervalOut { low, high };
        let difference = |bootstrap, t| Difference {
            mean: 0.1,
            per_seed: vec![0.1],
            t_interval: t,
            bootstrap,
        };
        assert!(difference(interval(0.05, 0.2), Some(interval(0.01, 0.3))).clearly_positive());
        assert!(difference(interval(0.05, 0.2), None).clearly_positive());
        // Seeds that disagree: the bootstrap alone would call it clear.
        assert!(!difference(interval(0.05, 0.2), Some(interval(-0.1, 0.3))).clearly_positive());
        assert!(!difference(interval(-0.01, 0.2), Some(interval(0.01, 0.3))).clearly_positive());
    }

    #[test]
    fn a_difference_carried_by_one_patient_is_not_clear() {
        // The method is better only on patient a; the bootstrap often draws no a.
        let runs = [
            seed(1, ["00000000", "0000"], ["11000000", "1000"]),
            seed(2, ["00000000", "0000"], ["11000000", "1000"]),
        ];
        let summary = summarise(&runs, 2000, 5, 0.2).unwrap();
        let patient = &summary.levels[1].evaluations[1];
        assert_eq!(patient.difference.per_seed, [0.25, 0.25]);
        assert_eq!(
            patient.difference.bootstrap.low, 0.0,
            "{:?}",
            patient.difference
        );
        assert!(!summary.verdict.robust_clearly_higher);
    }

    #[test]
    fn seeds_that_do_not_fit_are_refused_with_the_reason() {
        let good = seed(1, ["00000000", "0000"], ["11000000", "1000"]);
        let mut short = seed(2, ["00000000", "0000"], ["1100000", "1000"]);
        let err = summarise(&[good.clone(), short.clone()], 10, 1, 0.05).unwrap_err();
        assert!(
            err.to_string().contains("7 patch outcomes for 8 samples"),
            "{err}"
        );
        short.methods[1].outcomes.pop();
        let err = summarise(&[good.clone(), short], 10, 1, 0.05).unwrap_err();
        assert!(
            err.to_string().contains("has no evaluation worst_case@8"),
            "{err}"
        );
        let mut other = good.clone();
        other.samples.levels[1].ids[0] = "z".into();
        let err = summarise(&[good, other], 10, 1, 0.05).unwrap_err();
        assert!(err.to_string().contains("other val samples"), "{err}");
        assert!(summarise(&[], 10, 1, 0.05).is_err());
    }
}
