//! Parity of `hsat_core::eval` with the PyTorch/numpy reference (method.md §7.2-7.4).
//!
//! The fixture `tests/fixtures/eval.json` is written by
//! `scripts/fixtures/eval_fixtures.py` (its docstring lists the contents). Regenerate
//! from any working directory with:
//!
//! ```sh
//! "${HSAT_PYTHON:-$HOME/.cache/hsat/venv-torch-2.13.0/bin/python}" scripts/fixtures/eval_fixtures.py
//! ```
//!
//! Every number must agree within 1e-6; counts and ids exactly.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;

use hsat_core::eval::{Metrics, aggregate, average_precision, knn_scores, metrics};
use serde::Deserialize;

const TOL: f64 = 1e-6;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    n_classes: usize,
    t: f64,
    ks: Vec<usize>,
    bank: Vec<Vec<f32>>,
    bank_labels: Vec<usize>,
    queries: Vec<Vec<f32>>,
    query_labels: Vec<usize>,
    query_slides: Vec<String>,
    query_patients: Vec<String>,
    knn: BTreeMap<String, Vec<Vec<f64>>>,
    levels: BTreeMap<String, Level>,
    ap_cases: Vec<ApCase>,
}

/// One binary column with many tied scores.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApCase {
    positives: Vec<bool>,
    scores: Vec<f64>,
    ap: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Level {
    /// `None` at patch level (no aggregation).
    groups: Option<Vec<String>>,
    scores: Vec<Vec<f64>>,
    labels: Vec<usize>,
    accuracy: f64,
    top2: f64,
    top3: f64,
    mean_class_accuracy: f64,
    mean_average_precision: f64,
    confusion: Vec<Vec<usize>>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eval.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_rows_close(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}[{i}]: length");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() < TOL, "{what}[{i}][{j}]: {a} vs {b}");
        }
    }
}

fn assert_metrics(what: &str, got: &Metrics, want: &Level) {
    for (name, a, b) in [
        ("accuracy", got.accuracy, want.accuracy),
        ("top2", got.top2, want.top2),
        ("top3", got.top3, want.top3),
        ("mca", got.mean_class_accuracy, want.mean_class_accuracy),
        (
            "map",
            got.mean_average_precision,
            want.mean_average_precision,
        ),
    ] {
        assert!((a - b).abs() < TOL, "{what} {name}: {a} vs {b}");
    }
    assert_eq!(got.confusion, want.confusion, "{what} confusion");
}

#[test]
fn knn_scores_match_torch() {
    let f = fixture();
    for k in &f.ks {
        let got = knn_scores(&f.bank, &f.bank_labels, &f.queries, f.n_classes, *k, f.t)
            .expect("valid input");
        assert_rows_close(&format!("knn k={k}"), &got, &f.knn[&k.to_string()]);
    }
}

#[test]
fn patch_slide_and_patient_metrics_match_reference() {
    let f = fixture();
    // The reference feeds the k = 10 scores (with exact zeros: tied AP thresholds).
    let patch =
        knn_scores(&f.bank, &f.bank_labels, &f.queries, f.n_classes, 10, f.t).expect("valid input");

    let want = &f.levels["patch"];
    assert_eq!(want.labels, f.query_labels);
    assert_rows_close("patch scores", &patch, &want.scores);
    let got = metrics(&patch, &f.query_labels, f.n_classes).expect("valid input");
    assert_metrics("patch", &got, want);

    for (level, groups) in [("slide", &f.query_slides), ("patient", &f.query_patients)] {
        let want = &f.levels[level];
        let agg = aggregate(&patch, groups, &f.query_labels).unwrap();
        assert_eq!(Some(&agg.groups), want.groups.as_ref(), "{level} ids");
        assert_eq!(agg.labels, want.labels, "{level} labels");
        assert_rows_close(&format!("{level} scores"), &agg.scores, &want.scores);
        let got = metrics(&agg.scores, &agg.labels, f.n_classes).expect("valid input");
        assert_metrics(level, &got, want);
    }
}

#[test]
fn average_precision_groups_tied_scores_like_sklearn() {
    for (i, case) in fixture().ap_cases.iter().enumerate() {
        let got = average_precision(&case.positives, &case.scores);
        assert!(
            (got - case.ap).abs() < TOL,
            "case {i}: {got} vs {}",
            case.ap
        );
    }
}
