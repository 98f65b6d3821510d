//! Statistics of a repeated experiment (`hsat repro`): mean and standard deviation
//! over seeds, a Student-t interval over seeds, and a two-stage cluster bootstrap of
//! a paired difference between two methods.
//!
//! Why a cluster bootstrap: a patient's patches and slides share its stain and its
//! tissue, so they are not independent samples; resampling patches would make the
//! patch-level interval far too narrow. Resampling patients (with all their samples)
//! keeps that dependence, and resampling seeds as well adds the training noise that
//! a single val set cannot show. Both methods see the same resampled seeds and
//! patients, because they were trained with the same seeds and evaluated on the same
//! patients (a paired design).

use crate::rng::SplitMix64;

/// Mean and sample standard deviation (n - 1 in the denominator, as numpy's
/// `ddof=1`); `sd` is 0 for one value and both are NaN for none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanSd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Number of values.
    pub n: usize,
}

/// The [`MeanSd`] of `values`.
pub fn mean_sd(values: &[f64]) -> MeanSd {
    let n = values.len();
    if n == 0 {
        return MeanSd {
            mean: f64::NAN,
            sd: f64::NAN,
            n,
        };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    MeanSd { mean, sd, n }
}

/// A two-sided 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

impl Interval {
    /// The interval lies above zero.
    pub fn above_zero(&self) -> bool {
        self.low > 0.0
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1).
///
/// Exact to 1e-9 up to 30 degrees of freedom (scipy's `t.ppf(0.975, df)`; regenerate
/// with `python -c "from scipy.stats import t; print([t.ppf(0.975, d) for d in
/// range(1, 31)])"`), then the Cornish-Fisher expansion around the normal quantile,
/// within 2e-6 of scipy from df = 31 on.
pub fn t_quantile_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706204736,
        4.30265273,
        3.182446305,
        2.776445105,
        2.570581836,
        2.446911851,
        2.364624252,
        2.306004135,
        2.262157163,
        2.228138852,
        2.20098516,
        2.17881283,
        2.160368656,
        2.144786688,
        2.131449546,
        2.119905299,
        2.109815578,
        2.10092204,
        2.093024054,
        2.085963447,
        2.079613845,
        2.073873068,
        2.06865761,
        2.063898562,
        2.059538553,
        2.055529439,
        2.051830516,
        2.048407142,
        2.045229642,
        2.042272456,
    ];
    assert!(df >= 1, "Student's t needs at least one degree of freedom");
    if df <= TABLE.len() {
        return TABLE[df - 1];
    }
    let z: f64 = 1.959_963_984_540_054;
    let v = df as f64;
    z + (z.powi(3) + z) / (4.0 * v)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v.powi(3))
}

/// The 95 % Student-t interval of the mean of `values` (one value per seed); `None`
/// for fewer than two values.
pub fn t_interval(values: &[f64]) -> Option<Interval> {
    let stats = mean_sd(values);
    if stats.n < 2 {
        return None;
    }
    let half = t_quantile_975(stats.n - 1) * stats.sd / (stats.n as f64).sqrt();
    Some(Interval {
        low: stats.mean - half,
        high: stats.mean + half,
    })
}

/// The `q` quantile (0..=1) of `sorted` (ascending, not empty) with linear
/// interpolation between order statistics: numpy's default `percentile` method.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (position - below as f64) * (sorted[above] - sorted[below])
}

/// Correct and total sample counts of one patient in one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Samples classified correctly.
    pub correct: u32,
    /// Samples.
    pub total: u32,
}

/// One evaluation of two methods trained with the same seeds on the same patients:
/// `[seed][patient]` tallies of each (the patients in one order for every seed and
/// both methods).
#[derive(Debug, Clone, PartialEq)]
pub struct PairedTallies {
    /// The baseline (method A).
    pub baseline: Vec<Vec<Tally>>,
    /// The method compared with it (method B).
    pub method: Vec<Vec<Tally>>,
}

impl PairedTallies {
    /// Per seed, `method - baseline` accuracy over all patients.
    pub fn seed_differences(&self) -> Vec<f64> {
        self.baseline
            .iter()
            .zip(&self.method)
            .map(|(a, b)| accuracy(b, None) - accuracy(a, None))
            .collect()
    }
}

/// Accuracy over `tallies`, each patient counted as often as `draws` names it (all
/// once without `draws`).
fn accuracy(tallies: &[Tally], draws: Option<&[usize]>) -> f64 {
    let (correct, total) = match draws {
        Some(draws) => draws.iter().fold((0_u64, 0_u64), |(c, t), &p| {
            (
                c + u64::from(tallies[p].correct),
                t + u64::from(tallies[p].total),
            )
        }),
        None => tallies.iter().fold((0_u64, 0_u64), |(c, t), tally| {
            (c + u64::from(tally.correct), t + u64::from(tally.total))
        }),
    };
    correct as f64 / total as f64
}

/// The percentile 95 % interval of the seed-averaged `method - baseline` accuracy
/// under a two-stage bootstrap: each of `resamples` draws picks seeds with
/// replacement (as many as there are), then patients with replacement (as many as
/// there are, the same draw for every seed and both methods), and computes the mean
/// over the drawn seeds of the difference in accuracy over the drawn patients'
/// samples. Seeded, so the interval is reproducible.
///
/// # Panics
///
/// If there are no seeds, no patients, seeds of different patient counts, or no
/// resamples: the caller builds the tallies.
pub fn bootstrap_difference(tallies: &PairedTallies, resamples: usize, seed: u64) -> Interval {
    let seeds = tallies.baseline.len();
    assert!(
        seeds > 0 && seeds == tallies.method.len() && resamples > 0,
        "a bootstrap needs seeds and resamples"
    );
    let patients = tallies.baseline[0].len();
    assert!(
        patients > 0
            && tallies
                .baseline
                .iter()
                .chain(&tallies.method)
                .all(|per_seed| per_seed.len() == patients),
        "every seed of both methods needs the same patients"
    );
    let mut rng = SplitMix64::new(seed);
    let mut differences = Vec::with_capacity(resamples);
    let mut seed_draw = vec![0; seeds];
    let mut patient_draw = vec![0; patients];
    for _ in 0..resamples {
        for s in &mut seed_draw {
            *s = rng.below(seeds as u64) as usize;
        }
        for p in &mut patient_draw {
            *p = rng.below(patients as u64) as usize;
        }
        let mean = seed_draw
            .iter()
            .map(|&s| {
                accuracy(&tallies.method[s], Some(&patient_draw))
                    - accuracy(&tallies.baseline[s], Some(&patient_draw))
            })
            .sum::<f64>()
            / seeds as f64;
        differences.push(mean);
    }
    differences.sort_by(f64::total_cmp);
    Interval {
        low: quantile(&differences, 0.025),
        high: quantile(&differences, 0.975),
    }
}

/// The percentile 95 % interval of one accuracy over `tallies` (one per patient),
/// resampling patients with replacement `resamples` times (seeded).
///
/// # Panics
///
/// If `tallies` or `resamples` is empty.
pub fn bootstrap_accuracy(tallies: &[Tally], resamples: usize, seed: u64) -> Interval {
    assert!(
        !tallies.is_empty() && resamples > 0,
        "a bootstrap needs patients and resamples"
    );
    let mut rng = SplitMix64::new(seed);
    let mut draw = vec![0; tallies.len()];
    let mut accuracies: Vec<f64> = (0..resamples)
        .map(|_| {
            for p in &mut draw {
                *p = rng.below(tallies.len() as u64) as usize;
            }
            accuracy(tallies, Some(&draw))
        })
        .collect();
    accuracies.sort_by(f64::total_cmp);
    Interval {
        low: quantile(&accuracies, 0.025),
        high: quantile(&accuracies, 0.975),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd_match_numpy() {
        // numpy: np.mean([2, 4, 4, 5]) = 3.75, np.std([2, 4, 4, 5], ddof=1) = 1.2583057...
        let stats = mean_sd(&[2.0, 4.0, 4.0, 5.0]);
        assert_eq!(stats.mean, 3.75);
        assert!(
            (stats.sd - 1.258_305_739_211_791_5).abs() < 1e-12,
            "{stats:?}"
        );
        assert_eq!(mean_sd(&[7.0]).sd, 0.0);
        assert!(mean_sd(&[]).mean.is_nan());
    }

    #[test]
    fn t_quantiles_match_scipy_in_the_table_and_beyond() {
        assert_eq!(t_quantile_975(2), 4.30265273);
        // scipy.stats.t.ppf(0.975, df) for df past the table.
        for (df, scipy) in [
            (31, 2.039_513_446_396_408),
            (40, 2.021_075_390_306_273),
            (60, 2.000_297_822_014_260_4),
            (100, 1.983_971_518_523_551_8),
            (1000, 1.962_339_080_826_408_3),
        ] {
            let ours = t_quantile_975(df);
            assert!(
                (ours - scipy).abs() < 2e-6,
                "df {df}: {ours} vs scipy {scipy}"
            );
        }
        let interval = t_interval(&[0.1, 0.2, 0.3]).unwrap();
        // mean 0.2, sd 0.1, t(2) = 4.30265273: 0.2 +- 0.2484138...
        assert!((interval.low - (0.2 - 4.30265273 * 0.1 / 3f64.sqrt())).abs() < 1e-12);
        assert!((interval.high - (0.2 + 4.30265273 * 0.1 / 3f64.sqrt())).abs() < 1e-12);
        assert!(t_interval(&[0.5]).is_none());
    }

    #[test]
    fn quantiles_interpolate_as_numpy_does() {
        // np.percentile([3, 1, 4, 1.5, 9, 2.6], [2.5, 97.5]) = [1.0625, 8.375]
        let mut values = vec![3.0, 1.0, 4.0, 1.5, 9.0, 2.6];
        values.sort_by(f64::total_cmp);
        assert!((quantile(&values, 0.025) - 1.0625).abs() < 1e-12);
        assert!((quantile(&values, 0.975) - 8.375).abs() < 1e-12);
        assert_eq!(quantile(&values, 0.0), 1.0);
        assert_eq!(quantile(&values, 1.0), 9.0);
    }

    fn tallies(rows: &[&[(u32, u32)]]) -> Vec<Vec<Tally>> {
        rows.iter()
            .map(|row| {
                row.iter()
                    .map(|&(correct, total)| Tally { correct, total })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn equal_methods_give_a_zero_interval_and_a_constant_gap_its_own() {
        let a = tallies(&[&[(1, 4), (3, 4), (2, 4)], &[(0, 4), (4, 4), (2, 4)]]);
        let same = PairedTallies {
            baseline: a.clone(),
            method: a.clone(),
        };
        assert_eq!(
            bootstrap_difference(&same, 500, 1),
            Interval {
                low: 0.0,
                high: 0.0
            }
        );
        // Method B gets exactly one more patch of every patient right: +25 points on
        // every resample, whatever is drawn.
        let b = tallies(&[&[(2, 4), (4, 4), (3, 4)], &[(1, 4), (5, 4), (3, 4)]]);
        let shifted = PairedTallies {
            baseline: a,
            method: b,
        };
        assert_eq!(shifted.seed_differences(), [0.25, 0.25]);
        let interval = bootstrap_difference(&shifted, 500, 1);
        assert!((interval.low - 0.25).abs() < 1e-12 && (interval.high - 0.25).abs() < 1e-12);
    }

    #[test]
    fn the_interval_widens_with_disagreement_and_is_reproducible() {
        // B wins on half the patients and loses on the other half: mean 0, a wide
        // interval that contains it.
        let a = tallies(&[&[(0, 2), (2, 2), (0, 2), (2, 2), (0, 2), (2, 2)]]);
        let b = tallies(&[&[(2, 2), (0, 2), (2, 2), (0, 2), (2, 2), (0, 2)]]);
        let mixed = PairedTallies {
            baseline: a,
            method: b,
        };
        let interval = bootstrap_difference(&mixed, 2000, 7);
        assert!(interval.low < -0.3 && interval.high > 0.3, "{interval:?}");
        assert!(!interval.above_zero());
        assert_eq!(bootstrap_difference(&mixed, 2000, 7), interval, "seeded");
    }

    #[test]
    fn one_accuracy_has_an_interval_over_patients() {
        // Every patient 3 of 4: no spread. Half the patients all right, half all
        // wrong: 0.5 with an interval about +-2 sd of a binomial mean of 8.
        let steady = tallies(&[&[(3, 4); 8]]).remove(0);
        let i = bootstrap_accuracy(&steady, 500, 1);
        assert_eq!((i.low, i.high), (0.75, 0.75));
        let split = tallies(&[&[
            (4, 4),
            (0, 4),
            (4, 4),
            (0, 4),
            (4, 4),
            (0, 4),
            (4, 4),
            (0, 4),
        ]])
        .remove(0);
        let i = bootstrap_accuracy(&split, 4000, 1);
        // sd of the mean = 0.5 / sqrt(8) = 0.177: the interval is about 0.15 .. 0.85.
        assert!(
            i.low > 0.05 && i.low < 0.3 && i.high > 0.7 && i.high < 0.95,
            "{i:?}"
        );
    }

    #[test]
    fn seeds_are_resampled_too() {
        // One patient, so the patient draw changes nothing: all spread comes from the
        // seeds (differences 0 and 1, so resampled means lie in [0, 1] and both ends
        // are reached by some draw of 2000).
        let a = tallies(&[&[(0, 1)], &[(0, 1)]]);
        let b = tallies(&[&[(0, 1)], &[(1, 1)]]);
        let interval = bootstrap_difference(
            &PairedTallies {
                baseline: a,
                method: b,
            },
            2000,
            3,
        );
        assert_eq!((interval.low, interval.high), (0.0, 1.0));
    }
}
