//! The assembly half of the loader, pure: the decode results of one step become its
//! batch, with the fallback rules applied.
//!
//! - a patch whose file failed was already replaced by another patch of its slide
//!   (the job's later candidates): counted in `replaced_patches`;
//! - a slide none of whose candidates produced all its patches is filled with a copy of
//!   another complete drawn slide of the same patient: `replaced_slides`;
//! - a patient without any complete slide is left out of the step: `dropped_patients`.
//!
//! Results are put in (row, slide, patch) order first, so the batch and its stats do
//! not depend on the order in which threads finished.

use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::StepPlan;

use super::jobs::JobResult;
use super::{HostBatch, LoadStats, LoaderSpec};
use crate::error::{DataError, Result};

/// Failure messages kept per step for the log.
const KEPT_MESSAGES: usize = 5;

/// Builds the batch of `plan` from the results of all its jobs.
pub fn assemble(
    index: &DatasetIndex,
    spec: &LoaderSpec,
    plan: &StepPlan,
    epoch: u64,
    mut results: Vec<JobResult>,
) -> Result<HostBatch> {
    let step = plan.step;
    let (s, p, v) = (
        spec.sampling.num_slide_samples,
        spec.sampling.num_patch_samples,
        spec.sampling.num_transforms,
    );
    results.sort_by_key(|r| (r.row, r.slide_pos, r.patch_pos));
    let view_len = 3 * spec.image_size * spec.image_size;
    let patch_len = v * view_len;
    let slot_len = s * p * patch_len;
    let mut pixels = vec![0f32; plan.patients.len() * slot_len];
    // row -> slide_pos -> number of patches that produced views.
    let mut produced = vec![vec![0usize; s]; plan.patients.len()];
    let mut stats = LoadStats::default();
    for result in results {
        if !result.failures.is_empty() {
            if result.views.is_some() {
                stats.replaced_patches += result.failures.len();
            }
            for failure in result.failures {
                if stats.messages.len() < KEPT_MESSAGES {
                    stats.messages.push(failure);
                }
            }
        }
        let Some(views) = result.views else { continue };
        if views.len() != patch_len {
            return Err(DataError::ViewSize {
                got: views.len(),
                expected: patch_len,
            });
        }
        let offset = result.row * slot_len + (result.slide_pos * p + result.patch_pos) * patch_len;
        pixels[offset..offset + patch_len].copy_from_slice(&views);
        produced[result.row][result.slide_pos] += 1;
    }

    // A slide is usable when all its planned patches produced views (each failed patch
    // already fell back to the rest of its slide).
    let mut kept_rows = Vec::with_capacity(plan.patients.len());
    for (row, draw) in plan.patients.iter().enumerate() {
        let complete: Vec<usize> = (0..s).filter(|&sp| produced[row][sp] == p).collect();
        if complete.is_empty() {
            stats
                .dropped_patients
                .push(index.patients[draw.patient].id.clone());
            continue;
        }
        for sp in 0..s {
            if produced[row][sp] == p {
                continue;
            }
            let source = complete[sp % complete.len()];
            let (from, to) = (
                row * slot_len + source * p * patch_len,
                row * slot_len + sp * p * patch_len,
            );
            pixels.copy_within(from..from + p * patch_len, to);
            stats.replaced_slides += 1;
        }
        kept_rows.push(row);
    }
    // An empty plan is a rank with no patients this step (more ranks than patients):
    // it still takes part in the all-reduce, with weight 0.
    if kept_rows.is_empty() && !plan.patients.is_empty() {
        return Err(DataError::NothingReadable {
            step,
            first: stats
                .messages
                .first()
                .cloned()
                .unwrap_or_else(|| "no detail".into()),
        });
    }
    if kept_rows.len() != plan.patients.len() {
        let mut compact = Vec::with_capacity(kept_rows.len() * slot_len);
        for &row in &kept_rows {
            compact.extend_from_slice(&pixels[row * slot_len..(row + 1) * slot_len]);
        }
        pixels = compact;
    }
    let labels = kept_rows
        .iter()
        .map(|&row| plan.patients[row].label as u32)
        .collect();
    let patient_ids = kept_rows
        .iter()
        .map(|&row| index.patients[plan.patients[row].patient].id.clone())
        .collect();
    Ok(HostBatch {
        step,
        epoch,
        shape: [
            kept_rows.len(),
            s,
            p,
            v,
            3,
            spec.image_size,
            spec.image_size,
        ],
        pixels,
        labels,
        patient_ids,
        stats,
    })
}
