//! Patch scores to slide or patient scores (method.md §7.3).

use std::collections::BTreeMap;

use super::{EvalInputError, l1_normalise};

/// Scores of groups (slides or patients), sorted by group id.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregated {
    /// Group ids, sorted (byte order of the strings), each once.
    pub groups: Vec<String>,
    /// `[n_groups][n_classes]`, each row L1-normalised.
    pub scores: Vec<Vec<f64>>,
    /// The label of each group (shared by all its patches).
    pub labels: Vec<usize>,
}

/// Softmax of each patch's scores, summed per group id, L1-normalised (method.md
/// §7.3). `scores`, `groups` and `labels` have one entry per patch.
///
/// # Errors
///
/// [`EvalInputError::LengthMismatch`] if `groups` or `labels` do not have one entry per
/// score row; [`EvalInputError::MixedLabels`] if a group's patches disagree on the label.
pub fn aggregate(
    scores: &[Vec<f64>],
    groups: &[String],
    labels: &[usize],
) -> Result<Aggregated, EvalInputError> {
    for (what, got) in [("groups", groups.len()), ("labels", labels.len())] {
        if got != scores.len() {
            return Err(EvalInputError::LengthMismatch {
                what,
                got,
                expected: scores.len(),
            });
        }
    }
    let mut sums: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
    for ((row, group), &label) in scores.iter().zip(groups).zip(labels) {
        let probs = softmax(row);
        match sums.get_mut(group.as_str()) {
            None => {
                sums.insert(group, (probs, label));
            }
            Some((sum, first)) => {
                if *first != label {
                    return Err(EvalInputError::MixedLabels {
                        group: group.clone(),
                        first: *first,
                        second: label,
                    });
                }
                debug_assert_eq!(sum.len(), probs.len(), "score rows differ in length");
                for (total, p) in sum.iter_mut().zip(&probs) {
                    *total += p;
                }
            }
        }
    }
    let mut out = Aggregated {
        groups: Vec::with_capacity(sums.len()),
        scores: Vec::with_capacity(sums.len()),
        labels: Vec::with_capacity(sums.len()),
    };
    for (group, (mut sum, label)) in sums {
        l1_normalise(&mut sum);
        out.groups.push(group.to_owned());
        out.scores.push(sum);
        out.labels.push(label);
    }
    Ok(out)
}

/// Numerically stable softmax (the maximum is subtracted first).
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out: Vec<f64> = row.iter().map(|&x| (x - max).exp()).collect();
    l1_normalise(&mut out);
    out
}
