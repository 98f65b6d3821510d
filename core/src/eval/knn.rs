//! kNN class scores (method.md §7.2).

use super::{EvalInputError, l1_normalise};

/// Smallest norm a feature row is divided by (as `torch.nn.functional.normalize`).
const NORM_EPS: f64 = 1e-12;

/// kNN class scores of query features against a train bank (method.md §7.2).
///
/// Both sides are L2-normalised (rows of norm below `1e-12` are divided by `1e-12`,
/// as `F.normalize` does), similarities are cosines, each query keeps its top `k`
/// bank rows (`k` clipped to the bank size; equal similarities keep the lower bank
/// index first), weights them by `exp(sim / t)`, sums the weights per class and
/// L1-normalises. Returns `[n_query][n_classes]`; a query with no neighbour (`k = 0`
/// or an empty bank) gets all zeros.
///
/// # Errors
///
/// [`EvalInputError::BadInput`] if `bank_labels` is not as long as `bank`, a label is
/// `>= n_classes`, or a row's width differs from the first bank row's.
pub fn knn_scores(
    bank: &[Vec<f32>],
    bank_labels: &[usize],
    queries: &[Vec<f32>],
    n_classes: usize,
    k: usize,
    t: f64,
) -> Result<Vec<Vec<f64>>, EvalInputError> {
    if bank.len() != bank_labels.len() {
        return Err(EvalInputError::BadInput(format!(
            "the bank has {} rows but {} labels: pass one label per bank row",
            bank.len(),
            bank_labels.len()
        )));
    }
    if let Some(label) = bank_labels.iter().find(|&&label| label >= n_classes) {
        return Err(EvalInputError::BadInput(format!(
            "bank label {label} is not below n_classes = {n_classes}"
        )));
    }
    let width = bank.first().map(Vec::len);
    if let Some(row) = bank
        .iter()
        .chain(queries)
        .find(|row| Some(row.len()) != width && width.is_some())
    {
        return Err(EvalInputError::BadInput(format!(
            "feature rows differ in width ({} vs {}): bank and queries must come from one backbone",
            row.len(),
            width.unwrap_or_default()
        )));
    }
    let bank: Vec<Vec<f64>> = bank.iter().map(|row| unit(row)).collect();
    let k = k.min(bank.len());
    Ok(queries
        .iter()
        .map(|query| {
            let query = unit(query);
            let sims: Vec<f64> = bank.iter().map(|row| dot(&query, row)).collect();
            let mut order: Vec<usize> = (0..sims.len()).collect();
            // Stable sort: equal similarities keep the lower bank index first.
            order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
            class_scores(
                order[..k]
                    .iter()
                    .map(|&index| (sims[index], bank_labels[index])),
                n_classes,
                t,
            )
        })
        .collect())
}

/// L1-normalised class scores of a query's neighbours, given as `(cosine, label)` in
/// neighbour order (decreasing similarity, ties by lower bank index): the last step
/// of [`knn_scores`], shared with the worker's device kNN so both sum the same
/// weights in the same order (bitwise equal results for equal neighbours).
///
/// Every label must be below `n_classes` (checked by the callers).
pub fn class_scores(
    neighbours: impl IntoIterator<Item = (f64, usize)>,
    n_classes: usize,
    t: f64,
) -> Vec<f64> {
    let mut scores = vec![0.0; n_classes];
    for (sim, label) in neighbours {
        scores[label] += (sim / t).exp();
    }
    l1_normalise(&mut scores);
    scores
}

/// The row in f64, divided by its L2 norm (at least `1e-12`): the normalisation of
/// [`knn_scores`], public so the worker's rescoring computes the same cosines.
pub fn unit(row: &[f32]) -> Vec<f64> {
    let norm = row
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
        .max(NORM_EPS);
    row.iter().map(|&x| f64::from(x) / norm).collect()
}

/// The dot product of two f64 rows, summed in index order (the cosine of two
/// [`unit()`] rows, as [`knn_scores`] computes it).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "feature rows must all have the same length"
    );
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
