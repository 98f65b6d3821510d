//! The file-backed loader: plans each step's decode jobs, decodes and augments them on
//! a pool of plain threads (never on an async runtime), assembles the step's batch,
//! and keeps up to `prefetch` finished batches ready so that loading overlaps with
//! training.
//!
//! ```text
//!   planner thread: next plan -> jobs::plan_jobs (pure) -> job queue
//!   N decode threads: jobs::run_job (decode + base processing + V views) -> result queue
//!   planner thread: all of the step's results -> assemble::assemble (pure) -> batch queue
//!   trainer: Loader::next_batch(s) takes step s from the batch queue
//! ```
//!
//! Pixels depend only on (seed, step, patient, slide, patch, view), never on which
//! thread did the work or in what order: [`load_step`] runs the same two pure halves
//! without threads and gives the same batch. The fallback rules are in [`assemble`].
//!
//! - [`jobs`]: a plan -> decode jobs; one job -> its views.
//! - [`assemble`]: a step's results -> its [`HostBatch`].

pub mod assemble;
pub mod jobs;

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use hsat_core::config::{Config, HidiscSampling};
use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::{StepPlan, plan_step, steps_per_epoch};

use self::jobs::{DecodeJob, JobResult, epoch_of, plan_jobs, run_job};
use crate::error::{DataError, Result};

/// Everything the loader needs besides the index.
#[derive(Debug, Clone, PartialEq)]
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

impl LoaderSpec {
    /// The loader settings of `config` (`data.loader.threads = 0`: one per core).
    pub fn from_config(config: &Config) -> Self {
        LoaderSpec {
            seed: config.infra.seed,
            batch_size: config.training.batch_size,
            sampling: config.data.hidisc,
            image_size: config.data.image_size,
            rand_aug_prob: config.data.rand_aug_prob,
            dynamic_aug: config.data.dynamic_aug,
            num_epochs: config.training.num_epochs,
            threads: config.data.loader.decode_threads(),
            prefetch: config.data.loader.prefetch,
        }
    }
}

/// Problems met while loading one step.
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

/// One step's batch in plain memory, ready to become a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Global step.
    pub step: u64,
    /// Epoch of that step.
    pub epoch: u64,
    /// `[B, S, P, V, C, H, W]`; `B` counts the patients kept (dropped ones are gone).
    pub shape: [usize; 7],
    /// Row-major pixels of `shape`, in [0, 1].
    pub pixels: Vec<f32>,
    /// Class label of each of the B patients.
    pub labels: Vec<u32>,
    /// Id of each of the B patients.
    pub patient_ids: Vec<String>,
    /// What went wrong while loading it.
    pub stats: LoadStats,
}

/// Loads one step on the calling thread: the loader's two pure halves without the
/// pool. The threaded [`Loader`] gives the same batch.
pub fn load_step(
    index: &DatasetIndex,
    spec: &LoaderSpec,
    steps_per_epoch: u64,
    plan: &StepPlan,
) -> Result<HostBatch> {
    let epoch = epoch_of(plan.step, steps_per_epoch);
    let results = plan_jobs(index, spec, plan, epoch)
        .iter()
        .map(run_job)
        .collect();
    assemble::assemble(index, spec, plan, epoch, results)
}

/// The threaded loader.
pub struct Loader {
    batches: Receiver<Result<HostBatch>>,
    steps_per_epoch: u64,
    /// The step the next batch must be (sampler-planned loaders produce steps in
    /// order); `None` when plans come from outside and arrive in their own order.
    next_step: Option<u64>,
    planner: Option<JoinHandle<()>>,
    stop: Sender<()>,
}

impl Loader {
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
            return Err(DataError::NoPatients);
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
        let (job_tx, job_rx) = unbounded::<DecodeJob>();
        let (result_tx, result_rx) = unbounded::<JobResult>();
        let mut decoders = Vec::with_capacity(spec.threads.max(1));
        for n in 0..spec.threads.max(1) {
            let jobs = job_rx.clone();
            let results = result_tx.clone();
            let thread = format!("decode-{n}");
            let handle = std::thread::Builder::new()
                .name(format!("hsat-{thread}"))
                .spawn(move || {
                    for job in jobs.iter() {
                        if results.send(run_job(&job)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|source| DataError::ThreadSpawn { thread, source })?;
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
                        load_on_pool(&index, &spec, steps_per_epoch, &plan, &job_tx, &result_rx);
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
            .map_err(|source| DataError::ThreadSpawn {
                thread: "planner".into(),
                source,
            })?;
        Ok(Loader {
            batches,
            steps_per_epoch,
            next_step: start_step,
            planner: Some(planner),
            stop,
        })
    }

    /// Steps that make one pass over the (balanced) patient list.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The batch of `step`, waiting for it if it is not ready yet. Steps come in the
    /// order they were planned; unreadable patches are logged as a warning.
    pub fn next_batch(&mut self, step: u64) -> Result<HostBatch> {
        if let Some(next) = self.next_step
            && step != next
        {
            return Err(DataError::OutOfOrder {
                held: next,
                asked: step,
            });
        }
        let batch = self.batches.recv().map_err(|_| DataError::Stopped)??;
        if batch.step != step {
            return Err(DataError::OutOfOrder {
                held: batch.step,
                asked: step,
            });
        }
        self.next_step = self.next_step.map(|next| next + 1);
        if batch.stats != LoadStats::default() {
            tracing::warn!(
                step,
                replaced_patches = batch.stats.replaced_patches,
                replaced_slides = batch.stats.replaced_slides,
                dropped_patients = ?batch.stats.dropped_patients,
                first = ?batch.stats.messages.first(),
                "unreadable patches in this step"
            );
        }
        Ok(batch)
    }
}

impl Drop for Loader {
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

/// One step on the pool: its jobs out to the decode threads, all results back, then
/// the pure assembly.
fn load_on_pool(
    index: &DatasetIndex,
    spec: &LoaderSpec,
    steps_per_epoch: u64,
    plan: &StepPlan,
    jobs: &Sender<DecodeJob>,
    results: &Receiver<JobResult>,
) -> Result<HostBatch> {
    let epoch = epoch_of(plan.step, steps_per_epoch);
    let planned = plan_jobs(index, spec, plan, epoch);
    let expected = planned.len();
    for job in planned {
        jobs.send(job).map_err(|_| DataError::Stopped)?;
    }
    let mut collected = Vec::with_capacity(expected);
    for _ in 0..expected {
        collected.push(results.recv().map_err(|_| DataError::Stopped)?);
    }
    assemble::assemble(index, spec, plan, epoch, collected)
}

#[cfg(test)]
mod tests;
