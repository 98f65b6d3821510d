//! The hierarchical sampler: which patients, slides and patches make up each
//! training step (method.md §2), as pure functions of (index, seed, epoch, step,
//! position). The invariants are listed in `README.md` beside this file.
//!
//! The pipeline of one job:
//!
//! 1. [`balanced_patients`], once: the split's patients, with the patients of rare
//!    classes replicated (after a seeded shuffle) so every class is as frequent as
//!    the largest;
//! 2. [`epoch_order`]: a seeded permutation of that list per epoch;
//! 3. [`plan_step`]: step `s` is the chunk `s % steps_per_epoch` of epoch
//!    `s / steps_per_epoch`'s order, [`steps_per_epoch`] chunks of `batch_size`
//!    entries (the last may be smaller); each patient of the chunk draws
//!    `num_slide_samples` slides and each slide `num_patch_samples` patches with
//!    [`choose_tiled`].
//!
//! Nothing here depends on the world size, the worker or the time: a step's plan is
//! a function of the global step alone (architecture invariant 4), and the position
//! of a resumed job is just its next step.

mod shard;
#[cfg(test)]
mod tests;

pub use shard::{shard_of, shard_range};

use crate::config::HidiscSampling;
use crate::dataset::{DatasetIndex, Split};
use crate::rng::{SplitMix64, derive_seed, stable_id};

/// First element of the seed path of each kind of draw, so two kinds never share a
/// stream (ASCII of the word, for readability in a debugger).
const BALANCE_TAG: u64 = 0x0062_616c_616e_6365; // "balance"
const EPOCH_TAG: u64 = 0x0000_0065_706f_6368; // "epoch"
const SLIDE_TAG: u64 = 0x0000_0073_6c69_6465; // "slide"
const PATCH_TAG: u64 = 0x0000_0070_6174_6368; // "patch"

/// One slide drawn for a patient, and the patches drawn from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlideDraw {
    /// Index into the patient's [`slides`](crate::dataset::Patient::slides).
    pub slide: usize,
    /// Indices into that slide's [`patches`](crate::dataset::Slide::patches);
    /// `num_patch_samples` of them.
    pub patches: Vec<usize>,
}

/// One patient of a step and everything drawn for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientDraw {
    /// Index into [`DatasetIndex::patients`].
    pub patient: usize,
    /// The patient's class (index into [`DatasetIndex::classes`]).
    pub label: usize,
    /// Position in the step, `0..batch_size`: the batch row of this patient. The same
    /// patient may fill two slots of a step (class balancing replicates patients).
    pub slot: usize,
    /// `num_slide_samples` slide draws, in batch order.
    pub slides: Vec<SlideDraw>,
}

/// The content of one global step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// The global step (0-based, counted from the start of the job).
    pub step: u64,
    /// Its epoch: `step / steps_per_epoch`.
    pub epoch: u64,
    /// `batch_size` patients, fewer in the last step of an epoch; slots in order.
    pub patients: Vec<PatientDraw>,
}

/// The patient list of `split` that epochs permute, built once per job (the
/// reference's behaviour).
///
/// Without `balance`: the split's patients in index (id) order. With `balance`: for
/// each class in sorted order that has patients in the split, its patients shuffled
/// with a seeded stream, repeated until there are at least as many as in the largest
/// class, and cut to exactly that many; the classes are concatenated. Every class
/// then appears equally often, and every patient at least once.
pub fn balanced_patients(
    index: &DatasetIndex,
    split: Split,
    seed: u64,
    balance: bool,
) -> Vec<usize> {
    let members = index.patients_in(split);
    if !balance {
        return members;
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); index.classes.len()];
    for patient in members {
        by_class[index.patients[patient].class].push(patient);
    }
    let largest = by_class.iter().map(Vec::len).max().unwrap_or(0);
    let mut balanced = Vec::with_capacity(largest * by_class.len());
    for (class, mut patients) in by_class.into_iter().enumerate() {
        if patients.is_empty() {
            continue;
        }
        let class_seed = derive_seed(
            seed,
            &[
                BALANCE_TAG,
                stable_id(split.name()),
                stable_id(&index.classes[class]),
            ],
        );
        SplitMix64::new(class_seed).shuffle(&mut patients);
        balanced.extend(patients.iter().copied().cycle().take(largest));
    }
    balanced
}

/// The order of `balanced` in `epoch`: a permutation seeded by (`seed`, `epoch`).
pub fn epoch_order(balanced: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = balanced.to_vec();
    SplitMix64::new(derive_seed(seed, &[EPOCH_TAG, epoch])).shuffle(&mut order);
    order
}

/// Steps per epoch: `ceil(balanced_len / batch_size)`, so every entry of the balanced
/// list is used exactly once per epoch (the last step may be smaller). 0 for an
/// empty list. `batch_size` must be >= 1 (a validated config guarantees it); 0 is
/// read as 1.
pub fn steps_per_epoch(balanced_len: usize, batch_size: usize) -> u64 {
    debug_assert!(batch_size > 0, "a step needs at least one patient");
    balanced_len.div_ceil(batch_size.max(1)) as u64
}

/// `wanted` indices out of `0..available`: a permutation seeded by `seed`, repeated
/// until long enough, then cut (method.md §2). So the first `min(available, wanted)`
/// are distinct and every index is used `floor(wanted / available)` or `ceil` times.
///
/// `available` must be >= 1 (index slides and patches are never empty); with 0 the
/// result is empty.
pub fn choose_tiled(seed: u64, available: usize, wanted: usize) -> Vec<usize> {
    debug_assert!(available > 0 || wanted == 0, "nothing to choose from");
    if available == 0 {
        return Vec::new();
    }
    let mut permutation: Vec<usize> = (0..available).collect();
    SplitMix64::new(seed).shuffle(&mut permutation);
    permutation.into_iter().cycle().take(wanted).collect()
}

/// The content of global step `step`: its patients (the chunk `step %
/// steps_per_epoch` of the epoch's order), and for each the slides and patches
/// drawn.
///
/// Depends only on its arguments. The slides of slot `k` are drawn with a seed of
/// (`seed`, `step`, `k`, patient id), the patches of its `j`-th slide draw with a
/// seed of (`seed`, `step`, `k`, patient id, `j`, slide): a slide drawn twice (fewer
/// slides than `num_slide_samples`) draws its patches independently each time, as
/// the reference does.
///
/// `balanced` must come from [`balanced_patients`] on the same `index`; an empty
/// list gives an empty plan. `batch_size` 0 is read as 1.
pub fn plan_step(
    index: &DatasetIndex,
    balanced: &[usize],
    seed: u64,
    step: u64,
    batch_size: usize,
    sampling: &HidiscSampling,
) -> StepPlan {
    let batch_size = batch_size.max(1);
    let per_epoch = steps_per_epoch(balanced.len(), batch_size);
    if per_epoch == 0 {
        return StepPlan {
            step,
            epoch: 0,
            patients: Vec::new(),
        };
    }
    let epoch = step / per_epoch;
    // The position is < per_epoch <= balanced.len(): it fits in usize.
    let start = (step % per_epoch) as usize * batch_size;
    let end = (start + batch_size).min(balanced.len());
    let order = epoch_order(balanced, seed, epoch);
    let patients = order[start..end]
        .iter()
        .enumerate()
        .map(|(slot, &patient)| draw_patient(index, seed, step, slot, patient, sampling))
        .collect();
    StepPlan {
        step,
        epoch,
        patients,
    }
}

/// The slides and patches of the patient in `slot` of `step`.
fn draw_patient(
    index: &DatasetIndex,
    seed: u64,
    step: u64,
    slot: usize,
    patient: usize,
    sampling: &HidiscSampling,
) -> PatientDraw {
    let record = &index.patients[patient];
    let patient_key = stable_id(&record.id);
    let slot_key = slot as u64;
    let slide_seed = derive_seed(seed, &[SLIDE_TAG, step, slot_key, patient_key]);
    let slides = choose_tiled(slide_seed, record.slides.len(), sampling.num_slide_samples)
        .into_iter()
        .enumerate()
        .map(|(draw, slide)| {
            let patch_seed = derive_seed(
                seed,
                &[
                    PATCH_TAG,
                    step,
                    slot_key,
                    patient_key,
                    draw as u64,
                    slide as u64,
                ],
            );
            SlideDraw {
                slide,
                patches: choose_tiled(
                    patch_seed,
                    record.slides[slide].patches.len(),
                    sampling.num_patch_samples,
                ),
            }
        })
        .collect();
    PatientDraw {
        patient,
        label: record.class,
        slot,
        slides,
    }
}
