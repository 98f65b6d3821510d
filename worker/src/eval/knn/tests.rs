//! The device kNN against the exact f64 CPU path (`hsat_core::eval::knn_scores`, itself
//! checked against NumPy in `core/tests/eval_parity.rs`) on the same random inputs.

use hsat_core::eval::knn_scores;
use hsat_core::rng::SplitMix64;
use tch::Device;

use super::*;
use crate::eval::store::FeatureWriter;

fn rows(rng: &mut SplitMix64, n: usize, dim: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| (0..dim).map(|_| rng.normal() as f32).collect())
        .collect()
}

fn spec(k: usize, memory_bytes: usize) -> DeviceKnn {
    DeviceKnn {
        n_classes: 4,
        k,
        t: 0.07,
        device: Device::Cpu,
        memory_bytes,
        threads: 2,
    }
}

/// Runs both paths and asserts equal scores (the device path sums the same f64
/// weights in the same order, so they are bitwise equal, well within 1e-6).
fn agree(bank: &[Vec<f32>], labels: &[usize], queries: &[Vec<f32>], spec: &DeviceKnn) -> KnnStats {
    let exact = knn_scores(bank, labels, queries, spec.n_classes, spec.k, spec.t).expect("cpu");
    let mut seen = Vec::new();
    let (scores, stats) = device_knn_scores(
        BankRows::Memory(bank),
        labels,
        queries,
        spec,
        &mut |d, t| {
            seen.push((d, t));
        },
    )
    .expect("device");
    assert_eq!(scores.len(), exact.len());
    for (q, (got, want)) in scores.iter().zip(&exact).enumerate() {
        assert_eq!(got, want, "query {q}: device {got:?} vs exact {want:?}");
    }
    assert_eq!(
        seen.last(),
        Some(&(queries.len(), queries.len())),
        "progress ends at the total"
    );
    stats
}

#[test]
fn random_features_match_the_exact_path_with_many_chunks() {
    let mut rng = SplitMix64::new(7);
    let bank = rows(&mut rng, 300, 16);
    let labels: Vec<usize> = (0..300).map(|_| rng.below(4) as usize).collect();
    let queries = rows(&mut rng, 41, 16);
    // 600 bytes: bank chunks of 9 rows, query chunks of 1: every merge path runs.
    let stats = agree(&bank, &labels, &queries, &spec(10, 600));
    assert_eq!(
        stats.rounds, 1,
        "random data is proven in the first round: {stats:?}"
    );
    // One chunk for everything (the bank cached on the device).
    agree(&bank, &labels, &queries, &spec(10, 1 << 24));
}

#[test]
fn duplicate_rows_and_ties_past_the_margin_are_resolved_exactly() {
    // 6 distinct rows, each repeated 50 times (labels differ between copies): every
    // query ties with 50 rows at once, more than k + MARGIN = 42 at the k-th place, so
    // f32 top-k picks arbitrary copies and the selection must be widened.
    let mut rng = SplitMix64::new(11);
    let distinct = rows(&mut rng, 6, 8);
    let bank: Vec<Vec<f32>> = (0..300).map(|i| distinct[i % 6].clone()).collect();
    let labels: Vec<usize> = (0..300).map(|i| (i / 7) % 4).collect();
    let mut queries = rows(&mut rng, 5, 8);
    queries.extend(distinct.iter().cloned());
    let stats = agree(&bank, &labels, &queries, &spec(10, 2000));
    assert!(
        stats.widened > 0 && stats.rounds > 1,
        "ties past the margin widen: {stats:?}"
    );
}

#[test]
fn k_larger_than_the_bank_takes_every_row() {
    let mut rng = SplitMix64::new(3);
    let bank = rows(&mut rng, 20, 5);
    let labels: Vec<usize> = (0..20).map(|i| i % 4).collect();
    let queries = rows(&mut rng, 7, 5);
    let stats = agree(&bank, &labels, &queries, &spec(1000, 300));
    assert_eq!(stats.rounds, 1);
}

#[test]
fn a_bank_streamed_from_disk_gives_the_same_scores() {
    let mut rng = SplitMix64::new(5);
    let bank = rows(&mut rng, 120, 12);
    let labels: Vec<usize> = (0..120).map(|_| rng.below(4) as usize).collect();
    let queries = rows(&mut rng, 9, 12);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut writer = FeatureWriter::create(&dir.path().join("bank.f32")).expect("create");
    for part in bank.chunks(32) {
        writer.append(part).expect("append");
    }
    let file = writer.finish().expect("finish");
    let spec = spec(15, 1000);
    let (from_disk, _) = device_knn_scores(
        BankRows::File(&file),
        &labels,
        &queries,
        &spec,
        &mut |_, _| {},
    )
    .expect("file");
    let exact = knn_scores(&bank, &labels, &queries, 4, 15, 0.07).expect("cpu");
    assert_eq!(from_disk, exact);
}

#[test]
fn inputs_the_exact_path_rejects_are_rejected() {
    let bank = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let queries = vec![vec![1.0, 1.0]];
    let run = |labels: &[usize], queries: &[Vec<f32>]| {
        device_knn_scores(
            BankRows::Memory(&bank),
            labels,
            queries,
            &spec(1, 1 << 20),
            &mut |_, _| {},
        )
        .expect_err("bad input")
        .to_string()
    };
    assert!(run(&[0], &queries).contains("2 rows but 1 labels"));
    assert!(run(&[0, 4], &queries).contains("bank label 4"));
    assert!(run(&[0, 1], &[vec![1.0]]).contains("differ in width"));
}

#[test]
fn an_empty_bank_or_k_zero_gives_zero_scores() {
    let queries = vec![vec![1.0, 2.0]; 3];
    let (scores, _) = device_knn_scores(
        BankRows::Memory(&[]),
        &[],
        &queries,
        &spec(5, 1 << 20),
        &mut |_, _| {},
    )
    .expect("empty");
    assert_eq!(scores, vec![vec![0.0; 4]; 3]);
    let bank = vec![vec![1.0, 0.0]];
    let (scores, _) = device_knn_scores(
        BankRows::Memory(&bank),
        &[1],
        &queries,
        &spec(0, 1 << 20),
        &mut |_, _| {},
    )
    .expect("k = 0");
    assert_eq!(scores, vec![vec![0.0; 4]; 3]);
}
