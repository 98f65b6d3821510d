//! The evaluation protocol's math (method.md §7.2-7.4): kNN class scores of
//! embeddings against a train bank, aggregation of patch scores into slide and
//! patient scores, and the metrics the paper's tables report. Pure functions over
//! plain vectors; the embeddings come from the worker (with tch), the numbers here
//! are checked against a PyTorch/numpy reference (`core/tests/eval_parity.rs`).
//!
//! The pipeline of one evaluation (clean or adversarial val embeddings alike):
//!
//! 1. [`knn_scores`]: per val patch, L1-normalised class scores from its `k` nearest
//!    train patches (cosine similarity, weights `exp(sim / t)`);
//! 2. [`aggregate`], once with slide ids and once with patient ids: per-patch
//!    softmax, summed per group, L1-normalised;
//! 3. [`metrics`] at each of the three levels.
//!
//! [`report`] holds the results of `hsat eval` built from these numbers (per model,
//! attack and level) and their Markdown and CSV tables; the worker's
//! `hsat_worker::eval::run_eval` produces the features and calls it.
//!
//! [`stats`] summarises repeated experiments (`hsat repro`): mean and sd over seeds,
//! a t interval, and a cluster bootstrap of the difference between two methods;
//! [`repro`] applies them to the per-sample outcomes of each seed.
//!
//! Conventions are listed in `README.md` beside this file.

mod aggregate;
mod knn;
mod metrics;
pub mod report;
pub mod repro;
pub mod stats;

#[cfg(test)]
mod tests;

pub use aggregate::{Aggregated, aggregate};
pub use knn::{class_scores, dot, knn_scores, unit};
pub use metrics::{Metrics, average_precision, metrics, ranked_classes};

/// Inputs the evaluation math cannot work with (mismatched lengths, labels out of
/// range, a group with two labels): a bug or a broken dataset upstream, not a
/// property of the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalInputError {
    /// Inputs that do not fit together (lengths, label range, row widths).
    #[error("{0}")]
    BadInput(String),
    /// The per-patch inputs do not have one entry per patch.
    #[error("{what} has {got} entries but there are {expected} patch scores: pass one per patch")]
    LengthMismatch {
        /// Which input is off.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The number of score rows.
        expected: usize,
    },
    /// Two patches of one group carry different labels.
    #[error(
        "group {group:?} has patches labelled {first} and {second}: every patch of a slide \
         or patient must carry its label"
    )]
    MixedLabels {
        /// The group id.
        group: String,
        /// The first label seen for it.
        first: usize,
        /// A different label seen later.
        second: usize,
    },
}

/// Divides `values` by their sum, in place; an all-zero (or empty) vector stays as is.
fn l1_normalise(values: &mut [f64]) {
    let total: f64 = values.iter().sum();
    if total > 0.0 {
        for value in values.iter_mut() {
            *value /= total;
        }
    }
}
