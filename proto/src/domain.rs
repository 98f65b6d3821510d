//! The control plane's messages as domain types: what the coordinator and the
//! workers see. Every value here passed the checks of the wire conversion, so the
//! invariants written on the fields hold.

use std::path::PathBuf;
use std::time::Duration;

pub use hsat_core::losses::{LevelLosses, StepLosses};
pub use hsat_core::sampler::{PatientDraw, SlideDraw};
pub use hsat_core::telemetry::StepTelemetry;

/// A registered worker, as numbered by the coordinator (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// What a worker says about itself when it joins.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Human-readable name (pod or host name); may be empty.
    pub worker_name: String,
    /// The worker's validated config in canonical JSON
    /// (`hsat_core::config::Config::to_json_value`); always a JSON object.
    pub config: serde_json::Value,
    /// `DatasetIndex::fingerprint` of the worker's dataset.
    pub dataset_fingerprint: String,
    /// Host other ranks reach this worker at (it may host the c10d TCPStore);
    /// never empty.
    pub advertise_host: String,
    /// The worker's hsat version ([`crate::HSAT_VERSION`] of its build).
    pub hsat_version: String,
}

/// The coordinator's answer to a [`Registration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The worker's id for every later call.
    pub worker_id: WorkerId,
    /// How often to heartbeat; > 0.
    pub heartbeat: Duration,
    /// A worker not heard from for this long is dropped; > `heartbeat`.
    pub lease: Duration,
}

/// Where the job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Fewer workers than expected have registered; nothing trains yet.
    WaitingForWorkers,
    /// A generation trains.
    Running,
    /// Membership changed: the next generation is being formed.
    Regrouping,
    /// Every step is committed.
    Finished,
    /// The job stopped on an error (see [`JobStatus::message`]).
    Failed,
}

impl JobState {
    /// Lower-case words, for logs and `hsat status`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::WaitingForWorkers => "waiting for workers",
            Self::Running => "running",
            Self::Regrouping => "regrouping",
            Self::Finished => "finished",
            Self::Failed => "failed",
        }
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// The current generation (0 = none formed yet). A worker of an older one
    /// should leave its collective and ask for an assignment.
    pub generation: u64,
    /// Where the job is.
    pub state: JobState,
}

/// A worker asks what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentRequest {
    /// Who asks.
    pub worker_id: WorkerId,
    /// The generation the worker is in (0 = none).
    pub generation: u64,
    /// Steps whose update the worker's model holds.
    pub next_step: u64,
    /// The step it wants a [`TrainAssignment`] for: `next_step`, or `next_step + 1`
    /// while it prefetches; always >= `next_step`.
    pub want_step: u64,
    /// The worker's collective in `generation` failed with this error: the
    /// coordinator breaks the generation at once.
    pub group_error: Option<String>,
    /// The last steps the worker's model trained, oldest first (at most
    /// [`crate::worker_protocol::HELD_HISTORY`]); when the model holds its own
    /// update the last one is `next_step - 1`. A restarted coordinator confirms the
    /// worker's state against its ledger with them, and recovers steps its ledger
    /// lost.
    pub held: Vec<HeldStep>,
}

/// One step a worker's model trained: which generation trained it, the worker's
/// rank there, and the parameter checksum after the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldStep {
    /// The global step.
    pub step: u64,
    /// The generation that trained it (>= 1).
    pub generation: u64,
    /// Its world size (>= 1).
    pub world_size: u32,
    /// The worker's rank in it (< `world_size`).
    pub rank: u32,
    /// Parameter checksum after the update.
    pub checksum: u64,
}

/// What a worker does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// Nothing yet: ask again after `retry`.
    Wait {
        /// When to ask again.
        retry: Duration,
        /// Why (for logs).
        reason: String,
    },
    /// Join a generation (leave any older collective first).
    Group(GroupAssignment),
    /// Train one step.
    Train(TrainAssignment),
    /// Stop; the job is over for this worker.
    Stop {
        /// The job finished (every step committed); false: failed or cancelled.
        success: bool,
        /// Why.
        reason: String,
        /// On a coordinator shutdown: write the checkpoint of this step (steps
        /// applied; the worker's model holds exactly this many) before leaving, so the
        /// job resumes from the last committed step.
        checkpoint_step: Option<u64>,
        /// With `success == false`: the job is not over, only this coordinator
        /// stopped (a shutdown); a restarted one resumes it (the worker exits 75).
        resumable: bool,
    },
}

/// How a rank reaches the generation's c10d TCPStore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreRole {
    /// Rank 0: create the store on an OS-chosen port, then call `publish_store`.
    Host,
    /// Other ranks: connect to rank 0's store.
    Connect {
        /// Rank 0's advertise host.
        host: String,
        /// The port rank 0 published; > 0.
        port: u16,
    },
}

/// Membership of one generation, for one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The generation (>= 1); store keys are prefixed by it.
    pub generation: u64,
    /// This worker's rank, `< world_size`.
    pub rank: u32,
    /// Ranks in the generation, >= 1.
    pub world_size: u32,
    /// Host the store (rank 0) or connect to it.
    pub store: StoreRole,
    /// Rank whose parameters and optimizer state every rank takes first;
    /// `< world_size`.
    pub broadcast_root: u32,
    /// First step of the generation; the broadcast state holds `start_step` updates.
    pub start_step: u64,
    /// Steps of the whole job.
    pub total_steps: u64,
    /// Steps per epoch (`steps_per_epoch(balanced, batch_size)`).
    pub steps_per_epoch: u64,
    /// Set only when no live worker holds the committed state: the broadcast root
    /// loads this checkpoint (it holds `start_step` updates) before the broadcast.
    pub resume_checkpoint: Option<PathBuf>,
}

/// One step's work for one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainAssignment {
    /// The generation this was issued in.
    pub generation: u64,
    /// The global step (0-based).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Patients in the whole step; the shard's weight in the all-reduce is
    /// `shard.len() / global_patients` (a shard may be empty).
    pub global_patients: u64,
    /// This rank's contiguous share of `plan_step(step)`, slots in order.
    pub shard: Vec<PatientDraw>,
    /// Steps of the whole job (for the learning-rate schedule).
    pub total_steps: u64,
}

/// A rank applied the update of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Who reports.
    pub worker_id: WorkerId,
    /// The generation the step was trained in.
    pub generation: u64,
    /// The step.
    pub step: u64,
    /// The reporter's rank in `generation`.
    pub rank: u32,
    /// Patients of its shard.
    pub local_patients: u64,
    /// Its losses.
    pub losses: StepLosses,
    /// Checksum over all parameters' bytes after the update; equal on every rank.
    pub param_checksum: u64,
    /// Seconds the step took, data wait included; finite, >= 0.
    pub step_seconds: f64,
    /// Seconds of that spent waiting for data; finite, >= 0.
    pub data_wait_seconds: f64,
    /// Set by rank 0 when it wrote a (complete) checkpoint after this step.
    pub checkpoint_dir: Option<PathBuf>,
    /// What the rank measured besides its losses (zeros from an older worker).
    pub telemetry: StepTelemetry,
}

/// One worker in [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its id.
    pub worker_id: WorkerId,
    /// Its name.
    pub name: String,
    /// Rank in the current generation, if a member.
    pub rank: Option<u32>,
    /// Time since the coordinator last heard from it.
    pub last_heartbeat_age: Duration,
    /// What it does: `member`, `waiting`, `stopped`, ...
    pub state: String,
}

/// The job as the Admin service shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// Where the job is.
    pub state: JobState,
    /// Details (the error of a failed job).
    pub message: String,
    /// Committed steps.
    pub step: u64,
    /// Steps of the job.
    pub total_steps: u64,
    /// Epoch of the next step.
    pub epoch: u64,
    /// Current generation (0 = none yet).
    pub generation: u64,
    /// Registered, live workers.
    pub workers: Vec<WorkerStatus>,
    /// Committed steps per second over a recent window.
    pub steps_per_second: f64,
    /// Patients per second over the same window.
    pub patients_per_second: f64,
    /// Losses of the last committed step (rank-weighted mean).
    pub last_losses: Option<StepLosses>,
}
