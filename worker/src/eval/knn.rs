//! kNN class scores on the model's device (`eval.knn_device = "auto"`): the same
//! numbers as the exact f64 CPU path (`hsat_core::eval::knn_scores`), at the scale of
//! a real dataset's bank.
//!
//! 1. **Select in f32, on the device, in chunks.** Queries and bank rows are
//!    L2-normalised in f32; a chunk of queries is multiplied with one chunk of bank
//!    rows at a time (`[queries, bank rows]` similarities), each chunk's top
//!    `k + margin` is merged into a running top `k + margin` per query. Chunk sizes
//!    come from a byte budget (`eval.knn_memory_mb`), so memory is bounded whatever
//!    the bank size; the bank is read chunk by chunk from memory or from a raw f32
//!    file ([`FeatureFile`]), and kept on the device when it fits in half the budget.
//! 2. **Rescore in f64.** The selected rows' cosines are recomputed exactly as the
//!    CPU path computes them (`hsat_core::eval::{unit, dot}`), sorted with the same
//!    tie rule (lower bank index first), and the top `k` become the class scores
//!    (`hsat_core::eval::class_scores`): for the same neighbours the scores are
//!    bitwise those of the CPU path.
//! 3. **Prove the selection, or widen it.** f32 rounding can reorder near-ties, so
//!    the f32 top `k` may miss an exact top-`k` row. Every row left out has an f32
//!    similarity at most the smallest selected one, `f_min`, so an exact similarity
//!    at most `f_min + err`, where `err` bounds the f32 error ([`f32_error_bound`]).
//!    If the exact `k`-th similarity exceeds `f_min + err`, no row left out can
//!    reach or tie it and the result is exact. Otherwise (duplicate rows, heavy
//!    ties) the query is selected again with a margin eight times wider, until it is
//!    proven or the margin covers the whole bank. Results therefore always equal the
//!    CPU path's.
//!
//! The margin, [`MARGIN`] = 32: for random 2048-dimensional features and a
//! 100k-row bank, consecutive top-200 similarities are about 3e-5 apart, so 32 extra
//! rows put `f_min` about 1e-3 below the `k`-th similarity, above the worst-case f32
//! error bound at 2048 dimensions (3.7e-4): almost every query is proven in the first
//! round, and the extra rescoring costs 16 % over rescoring `k`. Real features with
//! denser tops get proven in a later round instead of silently differing.
//!
//! The bound assumes full-f32 matrix products (libtorch's default: TF32 matmuls are
//! off unless a program turns them on; hsat never does).

use hsat_core::eval::{EvalInputError, class_scores, dot, unit};
use tch::{Device, Kind, Tensor};

use super::EvalRunError;
use super::store::FeatureFile;

/// Candidates selected in f32 beyond `k` in the first round (see the module docs).
pub const MARGIN: usize = 32;
/// How much wider the margin of a query that could not be proven gets each round.
const WIDEN: usize = 8;
/// `F.normalize`'s floor on a row's norm, as the CPU path.
const NORM_EPS: f64 = 1e-12;

/// The bank's rows: in memory or in a raw f32 file.
#[derive(Debug, Clone, Copy)]
pub enum BankRows<'a> {
    /// Rows in memory.
    Memory(&'a [Vec<f32>]),
    /// Rows on disk, read by range.
    File(&'a FeatureFile),
}

impl BankRows<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            BankRows::Memory(rows) => rows.len(),
            BankRows::File(file) => file.rows(),
        }
    }

    /// Whether the bank has no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per row (`None` for an empty in-memory bank).
    fn dim(&self) -> Option<usize> {
        match self {
            BankRows::Memory(rows) => rows.first().map(Vec::len),
            BankRows::File(file) => (file.rows() > 0).then_some(file.dim()),
        }
    }

    /// Rows `start..start + count`, flat, into `out`.
    fn read_flat(
        &self,
        start: usize,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EvalRunError> {
        match self {
            BankRows::Memory(rows) => {
                out.clear();
                for row in &rows[start..start + count] {
                    out.extend_from_slice(row);
                }
                Ok(())
            }
            BankRows::File(file) => file.read_flat(start, count, out),
        }
    }
}

/// How to run [`device_knn_scores`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceKnn {
    /// Number of classes (labels are below it).
    pub n_classes: usize,
    /// Neighbours per query (clipped to the bank size).
    pub k: usize,
    /// Temperature: weights `exp(sim / t)`.
    pub t: f64,
    /// Where the f32 similarities and top-k run.
    pub device: Device,
    /// Bytes the chunks may take on the device (bank rows, query rows,
    /// similarities, running top-k); at least one row of each is always used.
    pub memory_bytes: usize,
    /// CPU threads of the f64 rescoring.
    pub threads: usize,
}

/// What [`device_knn_scores`] had to do beyond one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KnnStats {
    /// Queries whose first-round selection could not be proven exact and were
    /// selected again with a wider margin.
    pub widened: usize,
    /// Selection rounds (1 when every query was proven in the first).
    pub rounds: usize,
}

/// Worst-case difference between the f32 cosine of two rows (each L2-normalised in
/// f32, then one f32 dot product in any summation order) and the exact cosine, for
/// rows of `dim` values: normalising costs each side a relative error of at most
/// about `(dim + 3) u`, the dot product of two unit vectors at most `dim u`
/// (`u = 2^-24`), so `3 (dim + 4) u` bounds the total; `1e-9` covers the f64
/// rounding of the rescored value it is compared with.
pub fn f32_error_bound(dim: usize) -> f64 {
    3.0 * (dim as f64 + 4.0) * f64::from(f32::EPSILON) / 2.0 + 1e-9
}

/// kNN class scores of `queries` against `bank` (method.md §7.2), equal to
/// `hsat_core::eval::knn_scores` with the same inputs (see the module docs for how).
///
/// `progress(done, total)` counts queries whose scores are final.
///
/// # Errors
///
/// [`EvalRunError::Input`] for inputs the CPU path rejects (labels not one per
/// bank row or out of range, rows of different widths); [`EvalRunError::Torch`] or
/// [`EvalRunError::Write`] (the bank file) if libtorch or a read fails.
pub fn device_knn_scores(
    bank: BankRows<'_>,
    labels: &[usize],
    queries: &[Vec<f32>],
    spec: &DeviceKnn,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Vec<f64>>, KnnStats), EvalRunError> {
    let n = bank.len();
    check_inputs(bank, labels, queries, spec.n_classes)?;
    let k = spec.k.min(n);
    let mut stats = KnnStats::default();
    progress(0, queries.len());
    if k == 0 || queries.is_empty() {
        progress(queries.len(), queries.len());
        return Ok((vec![vec![0.0; spec.n_classes]; queries.len()], stats));
    }
    let dim = bank.dim().unwrap_or(0);
    let err = f32_error_bound(dim);
    let bank_chunk = (spec.memory_bytes / 2 / (4 * dim.max(1))).clamp(1, n);
    let cached = if bank_chunk == n {
        Some(normalised(bank, 0, n, spec.device)?)
    } else {
        None
    };

    let mut scores: Vec<Option<Vec<f64>>> = vec![None; queries.len()];
    let mut pending: Vec<usize> = (0..queries.len()).collect();
    let mut done = 0;
    let mut margin = MARGIN;
    while !pending.is_empty() {
        stats.rounds += 1;
        let keep = k.saturating_add(margin).min(n);
        let per_query = 4 * (bank_chunk + dim) + 36 * keep;
        let query_chunk = (spec.memory_bytes / 2 / per_query).max(1);
        let mut unproven = Vec::new();
        for chunk in pending.chunks(query_chunk) {
            let selected = select(
                bank,
                cached.as_ref(),
                bank_chunk,
                queries,
                chunk,
                keep,
                spec.device,
            )?;
            let rescored = rescore(
                bank,
                labels,
                queries,
                chunk,
                &selected,
                k,
                keep == n,
                err,
                spec,
            )?;
            for (&q, result) in chunk.iter().zip(rescored) {
                match result {
                    Some(row) => {
                        scores[q] = Some(row);
                        done += 1;
                    }
                    None => unproven.push(q),
                }
            }
            progress(done, queries.len());
        }
        if stats.rounds == 1 {
            stats.widened = unproven.len();
        }
        pending = unproven;
        margin = margin.saturating_mul(WIDEN);
    }
    let scores = scores
        .into_iter()
        .map(|row| row.expect("every query is proven by the round that keeps the whole bank"))
        .collect();
    Ok((scores, stats))
}

/// The CPU path's input checks, with its messages.
fn check_inputs(
    bank: BankRows<'_>,
    labels: &[usize],
    queries: &[Vec<f32>],
    n_classes: usize,
) -> Result<(), EvalInputError> {
    if bank.len() != labels.len() {
        return Err(EvalInputError::BadInput(format!(
            "the bank has {} rows but {} labels: pass one label per bank row",
            bank.len(),
            labels.len()
        )));
    }
    if let Some(label) = labels.iter().find(|&&label| label >= n_classes) {
        return Err(EvalInputError::BadInput(format!(
            "bank label {label} is not below n_classes = {n_classes}"
        )));
    }
    let Some(width) = bank.dim() else {
        return Ok(());
    };
    // A file's rows all have its width; rows in memory are checked one by one.
    let bank_widths: &[Vec<f32>] = match bank {
        BankRows::Memory(rows) => rows,
        BankRows::File(_) => &[],
    };
    if let Some(other) = bank_widths
        .iter()
        .chain(queries)
        .map(Vec::len)
        .find(|&w| w != width)
    {
        return Err(width_error(other, width));
    }
    Ok(())
}

fn width_error(got: usize, width: usize) -> EvalInputError {
    EvalInputError::BadInput(format!(
        "feature rows differ in width ({got} vs {width}): bank and queries must come from one backbone"
    ))
}

/// Rows `start..start + count` of the bank as an L2-normalised `[count, dim]` f32
/// tensor on `device`.
fn normalised(
    bank: BankRows<'_>,
    start: usize,
    count: usize,
    device: Device,
) -> Result<Tensor, EvalRunError> {
    let mut flat = Vec::new();
    bank.read_flat(start, count, &mut flat)?;
    let dim = bank.dim().unwrap_or(0);
    unit_rows(&flat, count, dim, device)
}

/// `[count, dim]` rows divided by their L2 norms (at least `1e-12`, as `F.normalize`).
fn unit_rows(
    flat: &[f32],
    count: usize,
    dim: usize,
    device: Device,
) -> Result<Tensor, EvalRunError> {
    let rows = Tensor::from_slice(flat)
        .f_view([count as i64, dim as i64])?
        .f_to_device(device)?;
    let norms = rows
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
        .f_clamp_min(NORM_EPS)?;
    Ok(rows.f_div(&norms)?)
}

/// The f32 top `keep` of each query of `chunk`: `(indices [q][keep], smallest
/// selected f32 similarity per query)`.
fn select(
    bank: BankRows<'_>,
    cached: Option<&Tensor>,
    bank_chunk: usize,
    queries: &[Vec<f32>],
    chunk: &[usize],
    keep: usize,
    device: Device,
) -> Result<(Vec<Vec<i64>>, Vec<f32>), EvalRunError> {
    let dim = bank.dim().unwrap_or(0);
    let mut flat = Vec::with_capacity(chunk.len() * dim);
    for &q in chunk {
        flat.extend_from_slice(&queries[q]);
    }
    let query = unit_rows(&flat, chunk.len(), dim, device)?;
    let n = bank.len();
    let mut best: Option<(Tensor, Tensor)> = None;
    tch::no_grad(|| -> Result<(), EvalRunError> {
        for start in (0..n).step_by(bank_chunk) {
            let count = bank_chunk.min(n - start);
            let rows = match cached {
                Some(all) => all.f_narrow(0, start as i64, count as i64)?,
                None => normalised(bank, start, count, device)?,
            };
            let sims = query.f_matmul(&rows.f_tr()?)?;
            let (values, indices) = sims.f_topk(keep.min(count) as i64, 1, true, false)?;
            let indices = indices.f_add_scalar(start as i64)?;
            best = Some(match best.take() {
                None => (values, indices),
                Some((best_values, best_indices)) => {
                    let values = Tensor::f_cat(&[best_values, values], 1)?;
                    let indices = Tensor::f_cat(&[best_indices, indices], 1)?;
                    let width = values.size()[1] as usize;
                    if width > keep {
                        let (top, at) = values.f_topk(keep as i64, 1, true, false)?;
                        (top, indices.f_gather(1, &at, false)?)
                    } else {
                        (values, indices)
                    }
                }
            });
        }
        Ok(())
    })?;
    let (values, indices) = best.expect("the bank has at least one row");
    let width = values.size()[1] as usize;
    let values = Vec::<f32>::try_from(
        &values
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_view([-1])?,
    )?;
    let indices = Vec::<i64>::try_from(
        &indices
            .f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_view([-1])?,
    )?;
    let floors = values
        .chunks(width)
        .map(|row| row.iter().copied().fold(f32::INFINITY, f32::min))
        .collect();
    Ok((indices.chunks(width).map(<[i64]>::to_vec).collect(), floors))
}

/// Exact f64 class scores of each query of `chunk` from its selected rows, or `None`
/// for a query whose selection cannot be proven to hold the exact top `k`.
#[allow(clippy::too_many_arguments)]
fn rescore(
    bank: BankRows<'_>,
    labels: &[usize],
    queries: &[Vec<f32>],
    chunk: &[usize],
    selected: &(Vec<Vec<i64>>, Vec<f32>),
    k: usize,
    whole_bank: bool,
    err: f64,
    spec: &DeviceKnn,
) -> Result<Vec<Option<Vec<f64>>>, EvalRunError> {
    let one = |i: usize| -> Result<Option<Vec<f64>>, EvalRunError> {
        let query = unit(&queries[chunk[i]]);
        let mut row = Vec::new();
        let mut ranked = Vec::with_capacity(selected.0[i].len());
        for &index in &selected.0[i] {
            let index = index as usize;
            bank.read_flat(index, 1, &mut row)?;
            ranked.push((dot(&query, &unit(&row)), index));
        }
        // The CPU path's order: decreasing similarity, ties by lower bank index.
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let kth = ranked[k - 1].0;
        // `!(a > b)` rather than `a <= b`: a NaN similarity is never proven.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !whole_bank && !(kth > f64::from(selected.1[i]) + err) {
            return Ok(None);
        }
        Ok(Some(class_scores(
            ranked[..k].iter().map(|&(sim, index)| (sim, labels[index])),
            spec.n_classes,
            spec.t,
        )))
    };
    let threads = spec.threads.clamp(1, chunk.len().max(1));
    let per_thread = chunk.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<Option<Vec<f64>>>, EvalRunError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..chunk.len())
            .step_by(per_thread)
            .map(|from| {
                let one = &one;
                scope.spawn(move || {
                    (from..(from + per_thread).min(chunk.len()))
                        .map(one)
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or(Err(EvalRunError::ThreadPanicked {
                    what: "kNN rescoring",
                }))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(chunk.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
