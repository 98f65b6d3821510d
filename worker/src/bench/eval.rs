//! `hsat bench eval`: the kNN of `hsat eval` at the scale of a real dataset, today's
//! exact f64 CPU path (`eval.knn_device = "cpu_exact"`) against the device path
//! (`"auto"`, [`crate::eval::knn`]) on the same seeded features, in one run.
//!
//! The features are generated here (nothing is downloaded): `classes` random class
//! centres, each bank and query row its class's centre plus unit Gaussian noise
//! (centres of norm about `sqrt(dim) / 2`, so neighbours mostly share a class, as
//! with a trained encoder). The device path reads its bank from a raw f32 file, as
//! `hsat eval` does; writing that file is not timed.

use std::time::Instant;

use hsat_core::eval::report::{Bank, parallel_knn};
use hsat_core::rng::{SplitMix64, derive_seed};
use tch::Device;

use super::BenchError;
use crate::eval::{BankRows, DeviceKnn, FeatureWriter, KnnStats, device_knn_scores};

/// What to measure.
#[derive(Debug, Clone)]
pub struct EvalBenchOptions {
    /// Bank (train) rows.
    pub bank: usize,
    /// Query (val) rows.
    pub queries: usize,
    /// Values per row.
    pub dim: usize,
    /// Classes of the generated features.
    pub classes: usize,
    /// Neighbours.
    pub k: usize,
    /// Temperature.
    pub t: f64,
    /// Seed of the features.
    pub seed: u64,
    /// Device of the device path.
    pub device: Device,
    /// Memory budget of the device path's chunks, MiB.
    pub memory_mb: usize,
    /// CPU threads (both paths' f64 work, and libtorch's).
    pub threads: usize,
    /// Queries the exact path runs (the first ones); 0 or more than `queries` runs
    /// them all. Its time grows linearly with the queries (each is independent), so
    /// at sizes where it would take hours a subset gives its full time by
    /// proportion; agreement is measured on that subset.
    pub exact_queries: usize,
}

/// What [`bench_eval`] measured.
#[derive(Debug, Clone)]
pub struct EvalBenchReport {
    /// Seconds of the exact f64 CPU path on [`exact_queries`](Self::exact_queries)
    /// queries.
    pub exact_seconds: f64,
    /// Queries the exact path ran.
    pub exact_queries: usize,
    /// `exact_seconds` scaled to every query (equal to it when all ran).
    pub exact_seconds_all: f64,
    /// Seconds of the device path (f32 selection + f64 rescoring).
    pub device_seconds: f64,
    /// Largest absolute difference of any class score between the two paths.
    pub max_score_difference: f64,
    /// Fraction of queries whose predicted class (argmax, lower class on ties) agrees.
    pub prediction_agreement: f64,
    /// Selection rounds and widened queries of the device path.
    pub stats: KnnStats,
}

/// Generates the features, runs both paths on them and compares their scores.
///
/// `on_phase` is told what starts (generation, each path); `on_progress` gets the
/// device path's (done, total) queries.
///
/// # Errors
///
/// [`BenchError::Options`] for empty sizes; [`BenchError::Io`] if the scratch
/// file cannot be written; the device path's errors.
pub fn bench_eval(
    options: &EvalBenchOptions,
    on_phase: &mut dyn FnMut(&str),
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalBenchReport, BenchError> {
    let o = options;
    if o.bank == 0 || o.queries == 0 || o.dim == 0 || o.classes == 0 || o.k == 0 {
        return Err(BenchError::Options(
            "--bank, --queries, --dim, --classes and --k must all be at least 1".to_owned(),
        ));
    }
    tch::set_num_threads(o.threads as i32);
    on_phase("generating features");
    let mut centres_rng = SplitMix64::new(derive_seed(o.seed, &[0]));
    let centres: Vec<Vec<f32>> = (0..o.classes)
        .map(|_| {
            (0..o.dim)
                .map(|_| 0.5 * centres_rng.normal() as f32)
                .collect()
        })
        .collect();
    let mut labels_rng = SplitMix64::new(derive_seed(o.seed, &[1]));
    let bank_labels: Vec<usize> = (0..o.bank)
        .map(|_| labels_rng.below(o.classes as u64) as usize)
        .collect();
    let query_labels: Vec<usize> = (0..o.queries)
        .map(|_| labels_rng.below(o.classes as u64) as usize)
        .collect();
    let row = |label: usize, rng: &mut SplitMix64| -> Vec<f32> {
        centres[label]
            .iter()
            .map(|&c| c + rng.normal() as f32)
            .collect()
    };
    let mut rng = SplitMix64::new(derive_seed(o.seed, &[2]));
    let bank: Vec<Vec<f32>> = bank_labels.iter().map(|&l| row(l, &mut rng)).collect();
    let queries: Vec<Vec<f32>> = query_labels.iter().map(|&l| row(l, &mut rng)).collect();

    let scratch = tempfile::tempdir().map_err(BenchError::io("creating a scratch folder"))?;
    let path = scratch.path().join("bank.f32");
    let mut writer = FeatureWriter::create(&path)?;
    writer.append(&bank)?;
    let file = writer.finish()?;

    on_phase("device path (f32 top-k in chunks, f64 rescoring)");
    let spec = DeviceKnn {
        n_classes: o.classes,
        k: o.k,
        t: o.t,
        device: o.device,
        memory_bytes: o.memory_mb.saturating_mul(1 << 20),
        threads: o.threads,
    };
    let started = Instant::now();
    let (fast, stats) = device_knn_scores(
        BankRows::File(&file),
        &bank_labels,
        &queries,
        &spec,
        on_progress,
    )?;
    let device_seconds = started.elapsed().as_secs_f64();

    let exact_queries = match o.exact_queries {
        0 => o.queries,
        n => n.min(o.queries),
    };
    on_phase(&format!(
        "exact path (f64 on the CPU), {exact_queries} queries"
    ));
    let started = Instant::now();
    let exact = parallel_knn(
        Bank {
            features: &bank,
            labels: &bank_labels,
            n_classes: o.classes,
            k: o.k,
            t: o.t,
            threads: o.threads,
        },
        &queries[..exact_queries],
    )
    .map_err(|e| BenchError::Options(e.to_string()))?;
    let exact_seconds = started.elapsed().as_secs_f64();

    let max_score_difference = fast
        .iter()
        .flatten()
        .zip(exact.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let agreeing = fast
        .iter()
        .zip(&exact)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    Ok(EvalBenchReport {
        exact_seconds,
        exact_queries,
        exact_seconds_all: if exact_queries == o.queries {
            exact_seconds
        } else {
            exact_seconds * o.queries as f64 / exact_queries as f64
        },
        device_seconds,
        max_score_difference,
        prediction_agreement: agreeing as f64 / exact_queries as f64,
        stats,
    })
}

/// Index of the largest score, the lower one on ties.
fn argmax(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &s)| {
            if s > best.1 { (i, s) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_agrees_and_measures_both_paths() {
        let options = EvalBenchOptions {
            bank: 200,
            queries: 30,
            dim: 16,
            classes: 3,
            k: 20,
            t: 0.07,
            seed: 1,
            device: Device::Cpu,
            memory_mb: 1,
            threads: 1,
            exact_queries: 0,
        };
        let mut phases = Vec::new();
        let report = bench_eval(&options, &mut |p| phases.push(p.to_owned()), &mut |_, _| {})
            .expect("bench");
        assert_eq!(report.max_score_difference, 0.0);
        assert_eq!(report.prediction_agreement, 1.0);
        assert!(report.exact_seconds > 0.0 && report.device_seconds > 0.0);
        assert_eq!(phases.len(), 3, "{phases:?}");
        assert_eq!(report.exact_queries, 30);
        assert_eq!(report.exact_seconds_all, report.exact_seconds);
        let zero = EvalBenchOptions {
            bank: 0,
            ..options.clone()
        };
        assert!(matches!(
            bench_eval(&zero, &mut |_| {}, &mut |_, _| {}),
            Err(BenchError::Options(_))
        ));
    }

    #[test]
    fn the_exact_path_can_run_a_subset_and_is_scaled_to_all_queries() {
        let options = EvalBenchOptions {
            bank: 200,
            queries: 40,
            dim: 16,
            classes: 3,
            k: 20,
            t: 0.07,
            seed: 2,
            device: Device::Cpu,
            memory_mb: 1,
            threads: 1,
            exact_queries: 10,
        };
        let mut done = 0;
        let report = bench_eval(&options, &mut |_| {}, &mut |d, _| done = d).expect("bench");
        assert_eq!(done, 40, "the device path ran every query");
        assert_eq!(report.exact_queries, 10);
        assert!((report.exact_seconds_all - 4.0 * report.exact_seconds).abs() < 1e-12);
        assert_eq!(report.max_score_difference, 0.0);
        assert_eq!(report.prediction_agreement, 1.0);
    }
}
