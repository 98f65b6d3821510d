use super::*;

const EPS: f64 = 1e-12;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < EPS
}

#[test]
fn perfect_scores_give_every_metric_one() {
    let labels = [0, 1, 2, 2, 1, 0, 3];
    let scores: Vec<Vec<f64>> = labels
        .iter()
        .map(|&label| {
            let mut row = vec![0.1; 4];
            row[label] = 0.7;
            row
        })
        .collect();
    let m = metrics(&scores, &labels, 4).expect("valid input");
    for value in [
        m.accuracy,
        m.top2,
        m.top3,
        m.mean_class_accuracy,
        m.mean_average_precision,
    ] {
        assert!(close(value, 1.0), "{m:?}");
    }
    assert_eq!(m.confusion[2], vec![0, 0, 2, 0]);
}

#[test]
fn top_k_ties_rank_the_lower_class_first() {
    assert_eq!(ranked_classes(&[0.2, 0.4, 0.2, 0.2]), vec![1, 0, 2, 3]);
    // Label 3 ties with 0 and 2 for second place and loses both ties.
    let m = metrics(&[vec![0.2, 0.4, 0.2, 0.2]], &[3], 4).expect("valid input");
    assert_eq!((m.accuracy, m.top2, m.top3), (0.0, 0.0, 0.0));
    let m = metrics(&[vec![0.2, 0.4, 0.2, 0.2]], &[2], 4).expect("valid input");
    assert_eq!((m.accuracy, m.top2, m.top3), (0.0, 0.0, 1.0));
    assert_eq!(m.confusion[2][1], 1);
}

#[test]
fn mean_class_accuracy_skips_absent_classes() {
    // Class 0: 1 of 2 right; class 2: 1 of 1; class 1 absent from the labels.
    let scores = vec![
        vec![0.8, 0.1, 0.1],
        vec![0.1, 0.8, 0.1],
        vec![0.1, 0.1, 0.8],
    ];
    let m = metrics(&scores, &[0, 0, 2], 3).expect("valid input");
    assert!(close(m.mean_class_accuracy, 0.75));
    assert!(close(m.accuracy, 2.0 / 3.0));
}

#[test]
fn average_precision_matches_hand_computed_cases() {
    // sklearn docs example: y = [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> 0.8333...
    let ap = average_precision(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]);
    assert!(close(ap, 5.0 / 6.0), "{ap}");
    // All tied: one threshold, P = 2/4 at R = 1.
    let ap = average_precision(&[true, false, true, false], &[0.5; 4]);
    assert!(close(ap, 0.5), "{ap}");
    // Tie between a positive and a negative at the top enters as one step (P = 1/2),
    // whatever their order; then the second positive alone: R 1/2 -> 1 at P = 2/3.
    for positives in [[true, false, true], [false, true, true]] {
        let ap = average_precision(&positives, &[0.9, 0.9, 0.5]);
        assert!(close(ap, 0.5 * 0.5 + 0.5 * 2.0 / 3.0), "{ap}");
    }
    assert!(average_precision(&[false, false], &[0.1, 0.2]).is_nan());
}

#[test]
fn knn_weights_neighbours_by_exp_similarity() {
    let bank = vec![vec![1.0, 0.0], vec![0.0, 2.0], vec![3.0, 0.0]];
    let labels = [0, 1, 1];
    // Query along x: sims 1, 0, 1 -> k = 2 takes banks 0 and 2 (equal weight).
    let scores = knn_scores(&bank, &labels, &[vec![5.0, 0.0]], 2, 2, 0.5).expect("valid input");
    assert!(
        close(scores[0][0], 0.5) && close(scores[0][1], 0.5),
        "{scores:?}"
    );
    // k clipped to the bank: all three neighbours, weights e^2, 1, e^2.
    let scores = knn_scores(&bank, &labels, &[vec![5.0, 0.0]], 2, 200, 0.5).expect("valid input");
    let e2 = 2.0_f64.exp();
    assert!(close(scores[0][0], e2 / (2.0 * e2 + 1.0)), "{scores:?}");
    // Tie for the single slot: the lower bank index wins.
    let scores = knn_scores(&bank, &labels, &[vec![1.0, 0.0]], 2, 1, 0.07).expect("valid input");
    assert_eq!(scores[0], vec![1.0, 0.0]);
    // No neighbour: zeros.
    let scores = knn_scores(&bank, &labels, &[vec![1.0, 0.0]], 2, 0, 0.07).expect("valid input");
    assert_eq!(scores[0], vec![0.0, 0.0]);
}

#[test]
fn aggregate_sums_softmax_per_sorted_group() {
    let scores = vec![vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
    let groups: Vec<String> = ["b", "a", "b"].map(String::from).to_vec();
    let out = aggregate(&scores, &groups, &[1, 0, 1]).unwrap();
    assert_eq!(out.groups, vec!["a", "b"]);
    assert_eq!(out.labels, vec![0, 1]);
    let e = 1.0_f64.exp();
    assert!(close(out.scores[0][0], e / (e + 1.0)));
    // b: (0.5, 0.5) + (1/(1+e), e/(1+e)), halved.
    assert!(close(out.scores[1][1], (0.5 + e / (e + 1.0)) / 2.0));
    assert!(close(out.scores[1].iter().sum::<f64>(), 1.0));
}

#[test]
fn aggregate_rejects_mixed_labels_and_bad_lengths() {
    let scores = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
    let groups: Vec<String> = ["p", "p"].map(String::from).to_vec();
    assert_eq!(
        aggregate(&scores, &groups, &[0, 1]),
        Err(EvalInputError::MixedLabels {
            group: "p".into(),
            first: 0,
            second: 1
        })
    );
    assert!(matches!(
        aggregate(&scores, &groups[..1], &[0, 0]),
        Err(EvalInputError::LengthMismatch { what: "groups", .. })
    ));
}

#[test]
fn mismatched_inputs_are_errors_not_panics() {
    let bank = vec![vec![1.0_f32, 0.0], vec![0.0, 1.0]];
    let err = knn_scores(&bank, &[0], &[vec![1.0, 0.0]], 2, 1, 0.07).expect_err("one label short");
    assert!(err.to_string().contains("2 rows but 1 labels"), "{err}");
    // Each case names its own problem, so none passes on another check's error.
    let cases = [
        (
            knn_scores(&bank, &[0, 5], &[vec![1.0, 0.0]], 2, 1, 0.07).map(drop),
            "bank label 5 is not below n_classes = 2",
        ),
        (
            knn_scores(&bank, &[0, 1], &[vec![1.0, 0.0, 3.0]], 2, 1, 0.07).map(drop),
            "feature rows differ in width",
        ),
        (
            metrics(&[vec![0.5, 0.5]], &[], 2).map(drop),
            "1 score rows but 0 labels",
        ),
        (
            metrics(&[vec![0.5, 0.5]], &[2], 2).map(drop),
            "label 2 is not below n_classes = 2",
        ),
        (
            metrics(&[vec![1.0]], &[0], 2).map(drop),
            "every score row must have n_classes = 2 entries",
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected).to_string();
        assert!(err.contains(expected), "{err}");
    }
}
