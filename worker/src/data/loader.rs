//! The file-backed batch source: plans each step with the hierarchical sampler,
//! decodes and augments its patches on a pool of plain threads (never on an async
//! runtime), and keeps up to `prefetch` finished batches ready so that loading
//! overlaps with training.
//!
//! Threads and ordering:
//!
//! ```text
//!   planner thread: plan_step(s) -> one job per (patient, slide, patch) -> job queue
//!   N decode threads: decode + base processing + V augmented views -> result queue
//!   planner thread: assembles step s from the results -> bounded batch queue (prefetch)
//!   trainer: BatchSource::batch(s) takes step s from the batch queue
//! ```
//!
//! Pixels depend only on (seed, step, patient, slide, patch, view), never on which
//! thread did the work. A missing or corrupt patch is replaced by another patch of the
//! same slide (counted); a slide that yields nothing is filled with a copy of another
//! drawn slide of the same patient; a patient that yields nothing is dropped from that step. All of
//! it is reported in [`LoadStats`].

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use hsat_core::config::HidiscSampling;
use hsat_core::dataset::DatasetIndex;
use hsat_core::rng::{SplitMix64, derive_seed, stable_id};
use hsat_core::sampler::{StepPlan, plan_step, steps_per_epoch};
use hsat_core::schedule::dynamic_strength;
use tch::Tensor;

use super::image::{AugmentConfig, augment, base_process, decode_file};
use super::{Batch, BatchSource};
use crate::error::{Result, WorkerError};

/// Everything the loader needs besides the index.
#[derive(Debug, Clone)]
pub struct LoaderSpec {
    /// Job seed.
    pub seed: u64,
    /// Patients per step.
    pub batch_size: usize,
    /// Slides, patches and views per patient.
    pub sampling: HidiscSampling,
    /// Patch side fed to the model, in pixels.
    pub image_size: usize,
    /// Augmentation probability (`data.rand_aug_prob`).
    pub rand_aug_prob: f64,
    /// HSAT's dynamic augmentation on or off.
    pub dynamic_aug: bool,
    /// Epochs of the run (the dynamic strength schedule needs it).
    pub num_epochs: usize,
    /// Decode/augment threads (>= 1).
    pub threads: usize,
    /// Finished batches kept ahead of the trainer (>= 1).
    pub prefetch: usize,
}

/// Problems met while loading one step, and where the time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    /// Patches that could not be read and were replaced by another of their slide.
    pub replaced_patches: usize,
    /// Slides that yielded nothing and were replaced by another slide of the patient.
    pub replaced_slides: usize,
    /// Patients dropped from the step because none of their slides yielded anything.
    pub dropped_patients: Vec<String>,
    /// First few error messages, for the log.
    pub messages: Vec<String>,
}

/// One unit of work: a patch and its views.
#[derive(Debug, Clone)]
struct Job {
    /// Row of the patient in the batch being assembled: its position in the plan (a
    /// rank's shard of the step in distributed runs).
    row: usize,
    slide_pos: usize,
    patch_pos: usize,
    /// Candidate files: the planned patch first, then the rest of the slide.
    candidates: Vec<PathBuf>,
    view_seeds: Vec<u64>,
    augment: AugmentConfig,
}

/// What a decode thread sends back.
#[derive(Debug)]
struct JobResult {
    row: usize,
    slide_pos: usize,
    patch_pos: usize,
    /// `V x C x H x W` floats, or `None` if no candidate could be read.
    views: Option<Vec<f32>>,
    /// Candidates that failed before one worked (or all of them).
    failures: Vec<String>,
}

/// A step's batch as plain memory, ready to become a tensor.
#[derive(Debug)]
struct HostBatch {
    step: u64,
    epoch: u64,
    dims: [i64; 7],
    pixels: Vec<f32>,
    labels: Vec<u32>,
    stats: LoadStats,
}

/// The file-backed [`BatchSource`].
pub struct FileSource {
    batches: Receiver<Result<HostBatch>>,
    steps_per_epoch: u64,
    /// The step the next batch must be (sampler-planned sources produce steps in
    /// order); `None` when plans come from outside and arrive in their own order.
    next_step: Option<u64>,
    last_stats: LoadStats,
    planner: Option<JoinHandle<()>>,
    stop: Sender<()>,
}

impl FileSource {
    /// Starts the loader threads, producing steps from `start_step` on.
    ///
    /// `balanced` is the balanced patient list of the training split
    /// ([`hsat_core::sampler::balanced_patients`]).
    pub fn start(
        index: Arc<DatasetIndex>,
        balanced: Arc<Vec<usize>>,
        spec: LoaderSpec,
        start_step: u64,
    ) -> Result<Self> {
        if balanced.is_empty() {
            return Err(WorkerError::Unsupported(
                "the training split has no patients: check the split file or manifest".into(),
            ));
        }
        let steps_per_epoch = steps_per_epoch(balanced.len(), spec.batch_size);
        let (seed, batch_size, sampling) = (spec.seed, spec.batch_size, spec.sampling);
        let planner_index = Arc::clone(&index);
        let mut step = start_step;
        let plans = move || {
            let plan = plan_step(&planner_index, &balanced, seed, step, batch_size, &sampling);
            step += 1;
            Some(plan)
        };
        Self::spawn(index, spec, steps_per_epoch, Some(start_step), plans)
    }

    /// Starts the loader threads on plans decided elsewhere: each plan received on
    /// `plans` (a rank's shard of a step, from the coordinator) becomes one batch, in
    /// the order received. The loader stops when `plans` is closed.
    ///
    /// Pixels still depend only on the seed and the draws' global positions (`slot`),
    /// so a patient looks the same whichever rank loads it.
    pub fn start_with_plans(
        index: Arc<DatasetIndex>,
        spec: LoaderSpec,
        steps_per_epoch: u64,
        plans: Receiver<StepPlan>,
    ) -> Result<Self> {
        Self::spawn(index, spec, steps_per_epoch, None, move || {
            plans.recv().ok()
        })
    }

    fn spawn(
        index: Arc<DatasetIndex>,
        spec: LoaderSpec,
        steps_per_epoch: u64,
        start_step: Option<u64>,
        mut next_plan: impl FnMut() -> Option<StepPlan> + Send + 'static,
    ) -> Result<Self> {
        let (batch_tx, batches) = bounded(spec.prefetch.max(1));
        let (stop, stop_rx) = bounded::<()>(1);
        let (job_tx, job_rx) = unbounded::<Job>();
        let (result_tx, result_rx) = unbounded::<JobResult>();
        let mut decoders = Vec::with_capacity(spec.threads.max(1));
        for n in 0..spec.threads.max(1) {
            let jobs = job_rx.clone();
            let results = result_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hsat-decode-{n}"))
                .spawn(move || decode_loop(&jobs, &results))
                .map_err(|e| {
                    WorkerError::Unsupported(format!("cannot start a loader thread: {e}"))
                })?;
            decoders.push(handle);
        }
        drop(result_tx);
        let planner = std::thread::Builder::new()
            .name("hsat-planner".into())
            .spawn(move || {
                loop {
                    if stop_rx.try_recv().is_ok() {
                        break;
                    }
                    let Some(plan) = next_plan() else { break };
                    let batch =
                        produce_step(&index, &spec, steps_per_epoch, plan, &job_tx, &result_rx);
                    let failed = batch.is_err();
                    if batch_tx.send(batch).is_err() || failed {
                        break;
                    }
                }
                drop(job_tx);
                for handle in decoders {
                    let _ = handle.join();
                }
            })
            .map_err(|e| {
                WorkerError::Unsupported(format!("cannot start the loader planner: {e}"))
            })?;
        Ok(FileSource {
            batches,
            steps_per_epoch,
            next_step: start_step,
            last_stats: LoadStats::default(),
            planner: Some(planner),
            stop,
        })
    }

    /// What went wrong while loading the last batch handed out.
    pub fn last_stats(&self) -> &LoadStats {
        &self.last_stats
    }
}

impl BatchSource for FileSource {
    fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    fn batch(&mut self, step: u64) -> Result<Batch> {
        if let Some(next) = self.next_step
            && step != next
        {
            return Err(WorkerError::Unsupported(format!(
                "the file loader produces steps in order: asked for step {step}, next is {next}"
            )));
        }
        let host = self.batches.recv().map_err(|_| {
            WorkerError::Unsupported("the loader threads stopped unexpectedly".into())
        })??;
        if host.step != step {
            return Err(WorkerError::Unsupported(format!(
                "the loader holds step {} but step {step} was asked for: plans must be fed in the order they are trained",
                host.step
            )));
        }
        self.next_step = self.next_step.map(|next| next + 1);
        if host.stats != LoadStats::default() {
            tracing::warn!(
                step,
                replaced_patches = host.stats.replaced_patches,
                replaced_slides = host.stats.replaced_slides,
                dropped_patients = ?host.stats.dropped_patients,
                first = ?host.stats.messages.first(),
                "unreadable patches in this step"
            );
        }
        let images = Tensor::f_from_slice(&host.pixels)?.f_reshape(host.dims)?;
        self.last_stats = host.stats;
        Ok(Batch {
            step,
            epoch: host.epoch,
            images,
            labels: host.labels,
        })
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        // Unblock a planner waiting for queue space, then wait for it.
        while self.batches.try_recv().is_ok() {}
        if let Some(planner) = self.planner.take() {
            // Keep draining until the planner has seen the stop signal.
            while !planner.is_finished() {
                let _ = self
                    .batches
                    .recv_timeout(std::time::Duration::from_millis(10));
            }
            let _ = planner.join();
        }
    }
}

/// Decodes the first readable candidate of a job and makes its views.
fn make_views(job: &Job) -> (Option<Vec<f32>>, Vec<String>) {
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

fn decode_loop(jobs: &Receiver<Job>, results: &Sender<JobResult>) {
    for job in jobs.iter() {
        // A panic in decoding or augmentation must not leave the planner waiting for a
        // result that never comes: it becomes a failed candidate like any bad file.
        let (views, failures) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make_views(&job)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    (
                        None,
                        vec![format!(
                            "{}: decoding panicked: {what}",
                            job.candidates[0].display()
                        )],
                    )
                });
        let sent = results.send(JobResult {
            row: job.row,
            slide_pos: job.slide_pos,
            patch_pos: job.patch_pos,
            views,
            failures,
        });
        if sent.is_err() {
            return;
        }
    }
}

/// Plans step `step`, has the decode threads make its views, and assembles the batch.
fn produce_step(
    index: &DatasetIndex,
    spec: &LoaderSpec,
    steps_per_epoch: u64,
    plan: StepPlan,
    jobs: &Sender<Job>,
    results: &Receiver<JobResult>,
) -> Result<HostBatch> {
    let step = plan.step;
    let epoch = step / steps_per_epoch.max(1);
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
    let (s, p, v) = (
        spec.sampling.num_slide_samples,
        spec.sampling.num_patch_samples,
        spec.sampling.num_transforms,
    );
    let mut expected = 0usize;
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
                let view_seeds = (0..v as u64)
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
                jobs.send(Job {
                    row,
                    slide_pos,
                    patch_pos,
                    candidates,
                    view_seeds,
                    augment: augment_cfg.clone(),
                })
                .map_err(|_| WorkerError::Unsupported("the decode threads stopped".into()))?;
                expected += 1;
            }
        }
    }

    let view_len = 3 * spec.image_size * spec.image_size;
    let patch_len = v * view_len;
    let slot_len = s * p * patch_len;
    let mut pixels = vec![0f32; plan.patients.len() * slot_len];
    // row -> slide_pos -> number of patches that produced views.
    let mut produced = vec![vec![0usize; s]; plan.patients.len()];
    let mut stats = LoadStats::default();
    for _ in 0..expected {
        let result = results
            .recv()
            .map_err(|_| WorkerError::Unsupported("the decode threads stopped".into()))?;
        if !result.failures.is_empty() {
            if result.views.is_some() {
                stats.replaced_patches += result.failures.len();
            }
            for failure in result.failures {
                if stats.messages.len() < 5 {
                    stats.messages.push(failure);
                }
            }
        }
        let Some(views) = result.views else { continue };
        if views.len() != patch_len {
            return Err(WorkerError::Unsupported(format!(
                "augmentation produced {} values for a patch, expected {patch_len}",
                views.len()
            )));
        }
        let offset = result.row * slot_len + (result.slide_pos * p + result.patch_pos) * patch_len;
        pixels[offset..offset + patch_len].copy_from_slice(&views);
        produced[result.row][result.slide_pos] += 1;
    }

    // A slide is usable when all its planned patches produced views (each failed patch
    // already fell back to the rest of its slide).
    let mut kept_slots = Vec::with_capacity(plan.patients.len());
    for (slot, draw) in plan.patients.iter().enumerate() {
        let complete: Vec<usize> = (0..s).filter(|&sp| produced[slot][sp] == p).collect();
        if complete.is_empty() {
            stats
                .dropped_patients
                .push(index.patients[draw.patient].id.clone());
            continue;
        }
        for sp in 0..s {
            if produced[slot][sp] == p {
                continue;
            }
            let source = complete[sp % complete.len()];
            let (from, to) = (
                slot * slot_len + source * p * patch_len,
                slot * slot_len + sp * p * patch_len,
            );
            pixels.copy_within(from..from + p * patch_len, to);
            stats.replaced_slides += 1;
        }
        kept_slots.push(slot);
    }
    // An empty plan is a rank with no patients this step (more ranks than patients):
    // it still takes part in the all-reduce, with weight 0.
    if kept_slots.is_empty() && !plan.patients.is_empty() {
        return Err(WorkerError::Unsupported(format!(
            "step {step}: no patient yielded a readable patch ({}); run `hsat data check`",
            stats.messages.first().map_or("no detail", String::as_str)
        )));
    }
    if kept_slots.len() != plan.patients.len() {
        let mut compact = Vec::with_capacity(kept_slots.len() * slot_len);
        for &slot in &kept_slots {
            compact.extend_from_slice(&pixels[slot * slot_len..(slot + 1) * slot_len]);
        }
        pixels = compact;
    }
    let labels = kept_slots
        .iter()
        .map(|&slot| plan.patients[slot].label as u32)
        .collect();
    let size = spec.image_size as i64;
    Ok(HostBatch {
        step,
        epoch,
        dims: [
            kept_slots.len() as i64,
            s as i64,
            p as i64,
            v as i64,
            3,
            size,
            size,
        ],
        pixels,
        labels,
        stats,
    })
}
