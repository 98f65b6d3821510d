//! The planning half of the loader, pure: a step plan becomes one decode job per
//! (patient, slide, patch), each carrying its candidate files and its views' seeds;
//! and the decoding of one job, which depends on nothing but the job.

use std::path::PathBuf;

use hsat_core::dataset::DatasetIndex;
use hsat_core::rng::{SplitMix64, derive_seed, stable_id};
use hsat_core::sampler::StepPlan;
use hsat_core::schedule::dynamic_strength;

use super::LoaderSpec;
use crate::image::{AugmentConfig, augment, base_process, decode_file};

/// One unit of work: a patch and its views.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeJob {
    /// Row of the patient in the batch being assembled: its position in the plan (a
    /// rank's shard of the step in distributed runs).
    pub row: usize,
    /// Position of the slide among the patient's drawn slides.
    pub slide_pos: usize,
    /// Position of the patch among the slide's drawn patches.
    pub patch_pos: usize,
    /// Candidate files: the planned patch first, then the rest of the slide in a
    /// seeded order (the fallback for an unreadable patch).
    pub candidates: Vec<PathBuf>,
    /// One seed per augmented view.
    pub view_seeds: Vec<u64>,
    /// Augmentation settings of the step (its epoch's strength).
    pub augment: AugmentConfig,
}

/// What decoding a job gave.
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    /// The job's batch row.
    pub row: usize,
    /// The job's slide position.
    pub slide_pos: usize,
    /// The job's patch position.
    pub patch_pos: usize,
    /// `V x C x H x W` floats, or `None` if no candidate could be read.
    pub views: Option<Vec<f32>>,
    /// Candidates that failed before one worked (or all of them), with the reason.
    pub failures: Vec<String>,
}

/// The epoch of `step` (a job of `steps_per_epoch` steps per epoch).
pub fn epoch_of(step: u64, steps_per_epoch: u64) -> u64 {
    step / steps_per_epoch.max(1)
}

/// The decode jobs of `plan`, in (row, slide, patch) order.
///
/// Seeds derive from (seed, step, slot, patient, slide, patch, draw positions, view),
/// never from the row, so a patient's pixels do not depend on which rank loads it.
pub fn plan_jobs(
    index: &DatasetIndex,
    spec: &LoaderSpec,
    plan: &StepPlan,
    epoch: u64,
) -> Vec<DecodeJob> {
    let step = plan.step;
    let augment_cfg = AugmentConfig {
        rand_aug_prob: spec.rand_aug_prob,
        dynamic: spec.dynamic_aug,
        strength: if spec.dynamic_aug {
            dynamic_strength(epoch as usize, spec.num_epochs)
        } else {
            1.0
        },
        out_size: spec.image_size,
    };
    let views = spec.sampling.num_transforms as u64;
    let mut jobs = Vec::new();
    for (row, draw) in plan.patients.iter().enumerate() {
        let patient = &index.patients[draw.patient];
        let patient_key = stable_id(&patient.id);
        for (slide_pos, slide_draw) in draw.slides.iter().enumerate() {
            let slide = &patient.slides[slide_draw.slide];
            for (patch_pos, &patch) in slide_draw.patches.iter().enumerate() {
                // The planned patch first, then the others of the slide in a seeded order.
                let mut others: Vec<usize> =
                    (0..slide.patches.len()).filter(|&i| i != patch).collect();
                SplitMix64::new(derive_seed(
                    spec.seed,
                    &[
                        step,
                        patient_key,
                        slide_draw.slide as u64,
                        patch as u64,
                        0xfa11,
                    ],
                ))
                .shuffle(&mut others);
                let candidates = std::iter::once(patch)
                    .chain(others)
                    .map(|i| slide.patches[i].clone())
                    .collect();
                // The slot and draw positions keep a patient drawn twice in one step (class
                // balancing) or a patch drawn twice from a slide from getting identical views.
                let view_seeds = (0..views)
                    .map(|view| {
                        let path = [
                            step,
                            draw.slot as u64,
                            patient_key,
                            slide_draw.slide as u64,
                            patch as u64,
                            slide_pos as u64,
                            patch_pos as u64,
                            view,
                        ];
                        derive_seed(spec.seed, &path)
                    })
                    .collect();
                jobs.push(DecodeJob {
                    row,
                    slide_pos,
                    patch_pos,
                    candidates,
                    view_seeds,
                    augment: augment_cfg.clone(),
                });
            }
        }
    }
    jobs
}

/// Decodes the first readable candidate of `job` and makes its views. A panic in
/// decoding or augmentation becomes a failed job like any bad file, so that whoever
/// waits for the result is never left waiting.
pub fn run_job(job: &DecodeJob) -> JobResult {
    let (views, failures) =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make_views(job))).unwrap_or_else(
            |panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let first = job
                    .candidates
                    .first()
                    .map_or_else(String::new, |p| p.display().to_string());
                (None, vec![format!("{first}: decoding panicked: {what}")])
            },
        );
    JobResult {
        row: job.row,
        slide_pos: job.slide_pos,
        patch_pos: job.patch_pos,
        views,
        failures,
    }
}

fn make_views(job: &DecodeJob) -> (Option<Vec<f32>>, Vec<String>) {
    let mut failures = Vec::new();
    for path in &job.candidates {
        match decode_file(path) {
            Ok(decoded) => {
                let base = base_process(&decoded);
                let mut data = Vec::new();
                for &seed in &job.view_seeds {
                    let mut rng = SplitMix64::new(seed);
                    data.extend_from_slice(&augment(&base, &job.augment, &mut rng).data);
                }
                return (Some(data), failures);
            }
            Err(err) => failures.push(format!("{}: {err}", path.display())),
        }
    }
    (None, failures)
}
