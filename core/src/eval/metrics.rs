//! The metrics of the paper's tables (method.md §7.4).

use super::EvalInputError;

/// The metrics of one level (patch, slide or patient).
///
/// Rates are fractions in `[0, 1]`; with no samples (or, for the class averages, no
/// class present) they are `NaN`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Fraction of samples whose label is the highest-scoring class.
    pub accuracy: f64,
    /// Fraction of samples whose label is among the two highest-scoring classes.
    pub top2: f64,
    /// Fraction of samples whose label is among the three highest-scoring classes.
    pub top3: f64,
    /// Macro recall (MCA): the mean over the classes present in the labels of the
    /// fraction of that class's samples predicted as it.
    pub mean_class_accuracy: f64,
    /// Mean over the classes present in the labels of the one-vs-rest average
    /// precision ([`average_precision`]), as scikit-learn's
    /// `average_precision_score(one_hot, scores, average="macro")` restricted to them.
    pub mean_average_precision: f64,
    /// Counts indexed `[true class][predicted class]`, `n_classes x n_classes`.
    pub confusion: Vec<Vec<usize>>,
}

/// Class indices by decreasing score; equal scores keep the lower class first.
/// The prediction is the first entry; top-k accuracy looks at the first `k`.
pub fn ranked_classes(row: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order
}

/// All metrics of `scores` (`[n][n_classes]`) against `labels` (method.md §7.4).
///
/// # Errors
///
/// [`EvalInputError::BadInput`] if `labels` is not as long as `scores`, a label is
/// `>= n_classes` or a score row is not `n_classes` long.
pub fn metrics(
    scores: &[Vec<f64>],
    labels: &[usize],
    n_classes: usize,
) -> Result<Metrics, EvalInputError> {
    if scores.len() != labels.len() {
        return Err(EvalInputError::BadInput(format!(
            "{} score rows but {} labels: pass one label per row",
            scores.len(),
            labels.len()
        )));
    }
    if scores.iter().any(|row| row.len() != n_classes) {
        return Err(EvalInputError::BadInput(format!(
            "every score row must have n_classes = {n_classes} entries"
        )));
    }
    if let Some(label) = labels.iter().find(|&&label| label >= n_classes) {
        return Err(EvalInputError::BadInput(format!(
            "label {label} is not below n_classes = {n_classes}"
        )));
    }
    let n = scores.len() as f64;
    let mut confusion = vec![vec![0_usize; n_classes]; n_classes];
    let mut hits = [0_usize; 3];
    for (row, &label) in scores.iter().zip(labels) {
        let ranked = ranked_classes(row);
        if let Some(&predicted) = ranked.first() {
            confusion[label][predicted] += 1;
        }
        if let Some(rank) = ranked.iter().position(|&class| class == label) {
            for hit in hits.iter_mut().skip(rank) {
                *hit += 1;
            }
        }
    }
    let present: Vec<usize> = (0..n_classes)
        .filter(|&class| labels.contains(&class))
        .collect();
    let recalls = present.iter().map(|&class| {
        let support: usize = confusion[class].iter().sum();
        confusion[class][class] as f64 / support as f64
    });
    let precisions = present.iter().map(|&class| {
        let positives: Vec<bool> = labels.iter().map(|&label| label == class).collect();
        let column: Vec<f64> = scores.iter().map(|row| row[class]).collect();
        average_precision(&positives, &column)
    });
    Ok(Metrics {
        accuracy: hits[0] as f64 / n,
        top2: hits[1] as f64 / n,
        top3: hits[2] as f64 / n,
        mean_class_accuracy: mean(recalls),
        mean_average_precision: mean(precisions),
        confusion,
    })
}

/// Average precision of binary `positives` ranked by `scores`, as scikit-learn's
/// `average_precision_score`: `AP = sum_n (R_n - R_{n-1}) P_n` over the distinct
/// score thresholds in decreasing order (`R_0 = 0`), where `P_n` and `R_n` are the
/// precision and recall of predicting positive every sample scoring `>=` the n-th
/// threshold. Tied scores enter together (no interpolation, no order within ties).
/// `NaN` without positives.
pub fn average_precision(positives: &[bool], scores: &[f64]) -> f64 {
    assert_eq!(positives.len(), scores.len(), "one score per sample");
    let total_positives = positives.iter().filter(|&&p| p).count();
    if total_positives == 0 {
        return f64::NAN;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut true_positives, mut seen) = (0_usize, 0_usize);
    let (mut previous_recall, mut ap) = (0.0, 0.0);
    for (position, &index) in order.iter().enumerate() {
        seen += 1;
        true_positives += usize::from(positives[index]);
        let last_of_threshold = order
            .get(position + 1)
            .is_none_or(|&next| scores[next] != scores[index]);
        if last_of_threshold {
            let recall = true_positives as f64 / total_positives as f64;
            let precision = true_positives as f64 / seen as f64;
            ap += (recall - previous_recall) * precision;
            previous_recall = recall;
        }
    }
    ap
}

/// Arithmetic mean; `NaN` when empty.
fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0_usize), |(s, c), v| (s + v, c + 1));
    sum / count as f64
}
