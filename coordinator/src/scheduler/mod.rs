//! The scheduler: membership, generations, step issuing and committing, as one pure
//! state machine. [`Scheduler::on_event`] takes an [`Event`] (an RPC, a timer tick)
//! and the time since the coordinator started, and returns [`Action`]s for the
//! async shell to carry out (the reply, ledger records, waking long polls). No I/O,
//! no clock: tests drive it with any interleaving they like. The invariants it keeps
//! are listed in `README.md` beside this file.
//!
//! - `membership`: when a generation may form (formation wait, silent workers),
//!   admitting live workers left outside, the pause below `min_workers`;
//! - `restore`: a scheduler continued from the ledger after a coordinator restart,
//!   the state workers hold, rollback targets;
//! - `shutdown`: the drain on SIGTERM and the checkpoint of the last committed step.

mod membership;
mod restore;
mod shutdown;
#[cfg(test)]
mod tests;

pub use restore::{CheckpointCheck, RestoredJob};
pub use shutdown::CheckpointWait;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hsat_core::config::{ClusterConfig, HidiscSampling};
use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::{StepPlan, plan_step, shard_range};
use hsat_proto::domain::{
    Assignment, AssignmentRequest, GroupAssignment, HeartbeatReply, HeldStep, JobState, JobStatus,
    Registered, Registration, StepLosses, StepReport, StepTelemetry, StoreRole, TrainAssignment,
    WorkerId, WorkerStatus,
};
use hsat_proto::{ApiError, StorePublication};
use serde::Serialize;

use crate::identity::JobIdentity;

/// Steps that may be issued beyond the last committed one (a rank gets step s + 1
/// while it trains s, to prefetch its data).
pub const WINDOW: u64 = 2;

/// Membership and timing settings of a job (the coordinator's part of
/// `[cluster]`, see `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Workers to wait for before the first generation forms (`cluster.workers`); >= 1.
    pub expected_workers: usize,
    /// Fewest live workers a generation may have (`cluster.min_workers`); below it
    /// the job pauses. In `1..=expected_workers`.
    pub min_workers: usize,
    /// After the first registration, how long until the first generation may form
    /// with `min_workers` instead of `expected_workers` (`cluster.formation_wait_s`).
    pub formation_wait: Duration,
    /// How often workers heartbeat (`cluster.heartbeat_s`).
    pub heartbeat: Duration,
    /// A worker not heard from for this long is not waited for at a regroup
    /// (`SILENT_HEARTBEATS` heartbeats); < `lease`.
    pub silent_after: Duration,
    /// A worker not heard from for this long is dropped (`cluster.lease_s`);
    /// > `silent_after`.
    pub lease: Duration,
    /// After a generation breaks, how long to wait for every live worker to check
    /// in before forming the next one without the missing ones
    /// (`cluster.regroup_wait_s`).
    pub regroup_wait: Duration,
    /// How long a `NextAssignment` call may be held before answering `Wait`
    /// (`cluster.long_poll_s`).
    pub long_poll: Duration,
    /// On a shutdown signal: the deadline to drain, checkpoint and exit; after the
    /// job ended: to get every worker its `Stop` (`cluster.shutdown_grace_s`).
    pub shutdown_grace: Duration,
}

impl ClusterSettings {
    /// The `[cluster]` defaults for `expected_workers` workers (`min_workers` 1).
    pub fn new(expected_workers: usize) -> Self {
        let mut settings = Self::from_config(&ClusterConfig::default());
        settings.expected_workers = expected_workers.max(1);
        settings
    }

    /// The coordinator's settings from a validated `[cluster]` section.
    pub fn from_config(cluster: &ClusterConfig) -> Self {
        Self {
            expected_workers: cluster.workers,
            min_workers: cluster.min_workers,
            formation_wait: cluster.formation_wait,
            heartbeat: cluster.heartbeat,
            silent_after: cluster.silent_after(),
            lease: cluster.lease,
            regroup_wait: cluster.regroup_wait,
            long_poll: cluster.long_poll,
            shutdown_grace: cluster.shutdown_grace,
        }
    }

    /// Problems with settings built in code (a loaded config was already checked
    /// with the same rules), each naming the `[cluster]` key to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.expected_workers == 0 || self.min_workers == 0 {
            return Err("cluster.workers and cluster.min_workers must be >= 1".to_owned());
        }
        if self.min_workers > self.expected_workers {
            return Err(format!(
                "cluster.min_workers = {} must be at most cluster.workers = {}: lower it",
                self.min_workers, self.expected_workers
            ));
        }
        if self.heartbeat.is_zero()
            || self.silent_after < self.heartbeat
            || self.lease <= self.silent_after
        {
            return Err(format!(
                "cluster.lease_s = {} must be more than the silence threshold {} s \
                 ({} x cluster.heartbeat_s = {}), itself at least one heartbeat",
                self.lease.as_secs_f64(),
                self.silent_after.as_secs_f64(),
                hsat_core::config::SILENT_HEARTBEATS,
                self.heartbeat.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// The data plan of a job: what every step trains, as pure functions of the step.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The dataset.
    pub index: Arc<DatasetIndex>,
    /// `balanced_patients(index, Train, seed, balance)`.
    pub balanced: Arc<Vec<usize>>,
    /// The job seed.
    pub seed: u64,
    /// Patients per step (whole job).
    pub batch_size: usize,
    /// Slides / patches per patient.
    pub sampling: HidiscSampling,
    /// `steps_per_epoch(balanced.len(), batch_size)`.
    pub steps_per_epoch: u64,
    /// `steps_per_epoch * num_epochs`.
    pub total_steps: u64,
}

impl JobPlan {
    /// The plan of `step`.
    pub fn plan(&self, step: u64) -> StepPlan {
        plan_step(
            &self.index,
            &self.balanced,
            self.seed,
            step,
            self.batch_size,
            &self.sampling,
        )
    }
}

/// Something that happened; fed to [`Scheduler::on_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `Register`.
    Register(Registration),
    /// `Heartbeat`.
    Heartbeat(WorkerId),
    /// `NextAssignment`.
    Assignment(AssignmentRequest),
    /// `PublishStore`.
    PublishStore(StorePublication),
    /// `ReportStep`.
    Report(StepReport),
    /// `Leave`.
    Leave(WorkerId, String),
    /// `Admin.GetStatus`.
    Status,
    /// Timer: expire leases, form a generation whose regroup wait is over.
    Tick,
    /// Stop the job (SIGTERM): drain the issued steps, then every worker gets
    /// `Stop { success: false }` (one of them with the checkpoint to write).
    Shutdown(String),
}

/// The reply to an RPC event.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// To `Register`.
    Registered(Registered),
    /// To `Heartbeat`.
    Heartbeat(HeartbeatReply),
    /// To `NextAssignment`.
    Assignment(Assignment),
    /// To `PublishStore`, `ReportStep`, `Leave`.
    Done,
    /// To `GetStatus`.
    Status(JobStatus),
    /// The RPC fails.
    Error(ApiError),
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer the RPC that caused the event (exactly one per RPC event).
    Reply(Reply),
    /// Append this committed step to the ledger (in order).
    Commit(LedgerEntry),
    /// Committed steps from `to_step` on are void: no live worker holds them and the
    /// job resumes from a checkpoint (or the start). Append to the ledger.
    Rollback {
        /// The first voided step; training resumes there.
        to_step: u64,
        /// The checkpoint resumed from, if any.
        checkpoint: Option<PathBuf>,
    },
    /// Rank 0 reported a complete checkpoint holding `step` updates: record it in
    /// the ledger (and apply the retention policy).
    Checkpoint {
        /// Steps the checkpoint holds.
        step: u64,
        /// Its directory.
        dir: PathBuf,
    },
    /// Something long-polling `NextAssignment` calls wait for changed: retry them.
    Wake,
}

/// Where a job is, in the words of the `hsat_job_state{state}` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    /// Waiting for workers, or forming the next generation after a change.
    Forming,
    /// A generation trains.
    Training,
    /// Fewer live workers than `min_workers`: waiting for workers to return.
    Paused,
    /// Stopping on a shutdown signal: draining issued steps, checkpointing,
    /// exiting (the job is resumable).
    Finishing,
    /// Every step is committed.
    Finished,
    /// The job stopped on an error.
    Failed,
}

impl JobPhase {
    /// Every phase, in the order the metric lists them.
    pub const ALL: [JobPhase; 6] = [
        JobPhase::Forming,
        JobPhase::Training,
        JobPhase::Paused,
        JobPhase::Finishing,
        JobPhase::Finished,
        JobPhase::Failed,
    ];

    /// The `state` label value.
    pub fn label(self) -> &'static str {
        match self {
            JobPhase::Forming => "forming",
            JobPhase::Training => "training",
            JobPhase::Paused => "paused",
            JobPhase::Finishing => "finishing",
            JobPhase::Finished => "finished",
            JobPhase::Failed => "failed",
        }
    }
}

/// The job as its metrics show it ([`Scheduler::metrics_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsView {
    /// Where the job is.
    pub phase: JobPhase,
    /// Committed steps.
    pub committed: u64,
    /// Steps of the job.
    pub total_steps: u64,
    /// Epoch of the next step.
    pub epoch: u64,
    /// The current (or last) generation; 0 before the first.
    pub generation: u64,
    /// Workers heard from recently that were not told to stop.
    pub workers_alive: usize,
}

/// One rank's part of a committed step in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankRecord {
    /// Rank in the step's generation.
    pub rank: u32,
    /// The worker.
    pub worker: u64,
    /// Its name.
    pub worker_name: String,
    /// Dataset indices of its shard's patients, in slot order.
    pub patients: Vec<usize>,
    /// Their ids.
    pub patient_ids: Vec<String>,
    /// Its parameter checksum (absent when a recovered step lacks its report).
    pub checksum: Option<u64>,
    /// Its loss total.
    pub loss: Option<f64>,
    /// Its step time in seconds.
    pub step_seconds: Option<f64>,
}

/// One committed step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    /// The global step.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Steps of the job.
    pub total_steps: u64,
    /// The generation that trained it.
    pub generation: u64,
    /// Committed at a regroup because a surviving rank held its update, without
    /// every rank's report.
    pub recovered: bool,
    /// Patients of the whole step.
    pub global_patients: usize,
    /// Per rank, in rank order.
    pub ranks: Vec<RankRecord>,
    /// Rank-weighted mean losses (for the progress line).
    #[serde(skip)]
    pub losses: Option<StepLosses>,
    /// Slowest rank's step time.
    #[serde(skip)]
    pub step_seconds: f64,
    /// The ranks' telemetry (metrics, `metrics.jsonl`); `None` for a step
    /// recovered without reports.
    #[serde(skip)]
    pub telemetry: Option<CommitTelemetry>,
}

/// The ranks' telemetry of a committed step: patient-weighted means like the
/// losses (eps and lr are equal on every rank), patches summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommitTelemetry {
    /// Means over ranks, `patches` the step's total.
    pub ranks: StepTelemetry,
    /// Mean seconds the ranks waited for data.
    pub data_wait_seconds: f64,
}

#[derive(Debug, Clone)]
struct Worker {
    name: String,
    host: String,
    last_seen: Duration,
    /// Steps whose update its model holds, as last told.
    next_step: Option<u64>,
    /// The last steps its model trained, as last told (see `restore.rs`).
    held: Vec<HeldStep>,
    /// Asked for an assignment since it last left a generation (or registered).
    checked_in: bool,
    /// Got a `Stop`.
    stopped: bool,
    /// `(generation, step)` of its last accepted report. A worker reports its
    /// steps in order (and generations only grow), so a report not after this one
    /// is a replay: rejected, changing nothing.
    last_report: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GenStatus {
    Active,
    /// Regroup at `until`: steps from there on are not issued.
    Draining {
        until: u64,
    },
    /// Over (broken or drained); kept for its reports.
    Ended,
}

#[derive(Debug, Clone)]
struct Generation {
    number: u64,
    members: Vec<WorkerId>,
    /// `members` inverted (O(1) rank lookups with a thousand ranks).
    ranks: HashMap<WorkerId, u32>,
    names: Vec<String>,
    start_step: u64,
    broadcast_root: u32,
    store_port: Option<u16>,
    resume_checkpoint: Option<PathBuf>,
    status: GenStatus,
    /// One past the highest step issued.
    issued_end: u64,
    reports: BTreeMap<u64, BTreeMap<u32, StepReport>>,
}

impl Generation {
    fn rank_of(&self, worker: WorkerId) -> Option<u32> {
        self.ranks.get(&worker).copied()
    }

    fn is_live(&self) -> bool {
        self.status != GenStatus::Ended
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Waiting,
    Running,
    Regrouping { since: Duration },
    Finished,
    Failed(String),
}

/// The coordinator's decisions; see the [module docs](self).
#[derive(Debug)]
pub struct Scheduler {
    settings: ClusterSettings,
    plan: JobPlan,
    identity: JobIdentity,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: u64,
    generation: Option<Generation>,
    committed: u64,
    phase: Phase,
    latest_checkpoint: Option<(PathBuf, u64)>,
    /// Every checkpoint known (steps held -> directory), for rollbacks.
    checkpoints: BTreeMap<u64, PathBuf>,
    checkpoint_check: CheckpointCheck,
    /// Generation numbers continue above this (the ledger's and check-ins').
    generation_floor: u64,
    /// Set after a restart until the first generation forms (see `restore.rs`).
    restore: Option<restore::Restore>,
    plans: BTreeMap<u64, Arc<StepPlan>>,
    recent: VecDeque<(Duration, usize)>,
    last_losses: Option<StepLosses>,
    /// When the first worker registered (the formation wait runs from there).
    first_registered: Option<Duration>,
    /// Why the job is paused (fewer live workers than `min_workers`), for the
    /// status and to log changes once.
    paused: Option<String>,
    /// A shutdown in progress (see `shutdown.rs`).
    shutdown: Option<shutdown::Shutdown>,
}

fn unknown(worker: WorkerId) -> ApiError {
    ApiError::UnknownWorker(format!(
        "worker {worker} is unknown or its lease expired: register again"
    ))
}

impl Scheduler {
    /// A job that has committed nothing yet.
    pub fn new(settings: ClusterSettings, plan: JobPlan, identity: JobIdentity) -> Self {
        let phase = if plan.total_steps == 0 {
            Phase::Finished
        } else {
            Phase::Waiting
        };
        Self {
            settings,
            plan,
            identity,
            workers: BTreeMap::new(),
            next_id: 1,
            generation: None,
            committed: 0,
            phase,
            latest_checkpoint: None,
            checkpoints: BTreeMap::new(),
            checkpoint_check: CheckpointCheck::accept_all(),
            generation_floor: 0,
            restore: None,
            plans: BTreeMap::new(),
            recent: VecDeque::new(),
            last_losses: None,
            first_registered: None,
            paused: None,
            shutdown: None,
        }
    }

    /// Committed steps.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The job's plan.
    pub fn plan(&self) -> &JobPlan {
        &self.plan
    }

    /// Where the job is.
    pub fn state(&self) -> JobState {
        match self.phase {
            Phase::Waiting => JobState::WaitingForWorkers,
            Phase::Running => JobState::Running,
            Phase::Regrouping { .. } => JobState::Regrouping,
            Phase::Finished => JobState::Finished,
            Phase::Failed(_) => JobState::Failed,
        }
    }

    /// The error of a failed job.
    pub fn failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Failed(message) => Some(message),
            _ => None,
        }
    }

    /// The newest checkpoint rank 0 reported, and the steps it holds.
    pub fn latest_checkpoint(&self) -> Option<&(PathBuf, u64)> {
        self.latest_checkpoint.as_ref()
    }

    /// What the metrics show of the job at `now` (see `crate::metrics`).
    pub fn metrics_view(&self, now: Duration) -> MetricsView {
        // A shutdown ends the job as "cancelled" (a failed phase), but the job is
        // resumable: it shows as finishing until the process exits.
        let phase = match (&self.phase, &self.shutdown) {
            (Phase::Finished, _) => JobPhase::Finished,
            (_, Some(_)) => JobPhase::Finishing,
            (Phase::Failed(_), None) => JobPhase::Failed,
            (Phase::Running, None) => JobPhase::Training,
            (Phase::Regrouping { .. }, None) if self.paused.is_some() => JobPhase::Paused,
            (Phase::Waiting | Phase::Regrouping { .. }, None) => JobPhase::Forming,
        };
        MetricsView {
            phase,
            committed: self.committed,
            total_steps: self.plan.total_steps,
            epoch: self.committed / self.plan.steps_per_epoch.max(1),
            generation: self.generation.as_ref().map_or(0, |g| g.number),
            workers_alive: self
                .workers
                .values()
                .filter(|w| !w.stopped && self.is_heard_from(w, now))
                .count(),
        }
    }

    /// The job is over and every live worker was told to stop.
    ///
    /// A worker that stopped heartbeating (killed before it heard the end) is not
    /// waited for: the coordinator does not sit out its whole lease at the end.
    pub fn is_done(&self, now: Duration) -> bool {
        matches!(self.phase, Phase::Finished | Phase::Failed(_))
            && self
                .workers
                .values()
                .all(|w| w.stopped || !self.is_heard_from(w, now))
    }

    /// Applies `event` at `now` (time since the coordinator started) and says what
    /// to do. RPC events always yield exactly one [`Action::Reply`].
    pub fn on_event(&mut self, event: Event, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        let reply = match event {
            Event::Register(registration) => self.register(registration, now, &mut actions),
            Event::Heartbeat(worker) => self.heartbeat(worker, now),
            Event::Assignment(request) => self.assignment(request, now, &mut actions),
            Event::PublishStore(publication) => self.publish_store(publication, now, &mut actions),
            Event::Report(report) => self.report(report, now, &mut actions),
            Event::Leave(worker, reason) => self.leave(worker, &reason, now, &mut actions),
            Event::Status => Some(Reply::Status(self.status(now))),
            Event::Tick => {
                self.expire(now, &mut actions);
                None
            }
            Event::Shutdown(reason) => {
                self.begin_shutdown(reason, &mut actions);
                None
            }
        };
        self.try_form(now, &mut actions);
        self.finish_shutdown_if_drained(&mut actions);
        self.note_pause(now);
        if let Some(reply) = reply {
            actions.push(Action::Reply(reply));
        }
        actions
    }

    fn touch(&mut self, worker: WorkerId, now: Duration) -> Result<&mut Worker, ApiError> {
        let record = self
            .workers
            .get_mut(&worker)
            .ok_or_else(|| unknown(worker))?;
        record.last_seen = now;
        Ok(record)
    }

    fn register(
        &mut self,
        registration: Registration,
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<Reply> {
        // A finished job still registers workers: their first request gets
        // `Stop { success: true }` (a restarted pod of a finished job exits 0).
        if let Phase::Failed(_) = self.phase {
            return Some(Reply::Error(ApiError::Refused(format!(
                "the job is over ({}): nothing to join",
                self.state().describe()
            ))));
        }
        if let Some(shutdown) = &self.shutdown {
            // Unavailable, not Refused: the job goes on with the next coordinator,
            // so the worker retries (and exits 75, retryable, if none comes back).
            return Some(Reply::Error(ApiError::Unavailable(format!(
                "the coordinator is shutting down ({}): nothing to join; start the worker again \
                 once the coordinator is back",
                shutdown.reason
            ))));
        }
        if let Err(message) = self.identity.check(&registration) {
            return Some(Reply::Error(ApiError::Refused(message)));
        }
        self.first_registered.get_or_insert(now);
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        tracing::info!(worker = %id, name = %registration.worker_name, host = %registration.advertise_host, "worker registered");
        if matches!(self.phase, Phase::Waiting) && self.generation.is_none() {
            // Say what the start waits for (operators watching a pod's log).
            let registered = self.workers.len() + 1;
            let expected = self.settings.expected_workers;
            let first = self.first_registered.unwrap_or(now);
            let wait_left = self
                .settings
                .formation_wait
                .saturating_sub(now.saturating_sub(first));
            if registered < expected {
                tracing::info!(
                    registered,
                    expected_workers = expected,
                    min_workers = self.settings.min_workers,
                    formation_wait_left_s = wait_left.as_secs_f64(),
                    "waiting for workers: training starts when all {expected} have registered, or with at \
                     least {} once cluster.formation_wait_s ({:.1} s after the first registration) is over",
                    self.settings.min_workers,
                    self.settings.formation_wait.as_secs_f64()
                );
            }
        }
        self.workers.insert(
            id,
            Worker {
                name: registration.worker_name,
                host: registration.advertise_host,
                last_seen: now,
                next_step: None,
                held: Vec::new(),
                checked_in: false,
                stopped: false,
                last_report: None,
            },
        );
        self.admit_at_next_boundary(now, actions);
        Some(Reply::Registered(Registered {
            worker_id: id,
            heartbeat: self.settings.heartbeat,
            lease: self.settings.lease,
        }))
    }

    fn heartbeat(&mut self, worker: WorkerId, now: Duration) -> Option<Reply> {
        let state = self.state();
        let generation = self.generation.as_ref().map_or(0, |g| g.number);
        Some(match self.touch(worker, now) {
            Ok(_) => Reply::Heartbeat(HeartbeatReply { generation, state }),
            Err(err) => Reply::Error(err),
        })
    }

    fn wait(&self, reason: impl Into<String>) -> Reply {
        Reply::Assignment(Assignment::Wait {
            retry: self.settings.long_poll.max(Duration::from_millis(50)),
            reason: reason.into(),
        })
    }

    fn assignment(
        &mut self,
        request: AssignmentRequest,
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<Reply> {
        let phase = self.phase.clone();
        let record = match self.touch(request.worker_id, now) {
            Ok(record) => record,
            Err(err) => return Some(Reply::Error(err)),
        };
        record.next_step = Some(request.next_step);
        record.held.clone_from(&request.held);
        self.note_generations(&request);
        let Some(record) = self.workers.get_mut(&request.worker_id) else {
            return Some(Reply::Error(unknown(request.worker_id)));
        };
        match phase {
            Phase::Finished => {
                record.stopped = true;
                let checkpoint_step =
                    self.checkpoint_request_for(request.worker_id, request.next_step);
                return Some(Reply::Assignment(Assignment::Stop {
                    success: true,
                    reason: "every step is committed".to_owned(),
                    checkpoint_step,
                    resumable: false,
                }));
            }
            Phase::Failed(message) => {
                record.stopped = true;
                let checkpoint_step =
                    self.checkpoint_request_for(request.worker_id, request.next_step);
                // A shutdown ends the phase as failed ("cancelled: ..."), but the
                // job itself goes on with the next coordinator: workers exit 75.
                let resumable = self.shutdown.is_some();
                return Some(Reply::Assignment(Assignment::Stop {
                    success: false,
                    reason: message,
                    checkpoint_step,
                    resumable,
                }));
            }
            _ => {}
        }
        let worker = request.worker_id;
        let member_rank = self
            .generation
            .as_ref()
            .filter(|g| g.is_live())
            .and_then(|g| g.rank_of(worker).map(|rank| (g.number, rank)));
        if let (Some(error), Some((number, _))) = (&request.group_error, member_rank)
            && request.generation == number
        {
            self.break_generation(
                now,
                &format!("worker {worker} reported its collective failed: {error}"),
                actions,
            );
            return Some(self.checked_in_wait(worker));
        }
        let Some((number, rank)) = member_rank else {
            // A live worker outside the generation (it was silent or slow at the last
            // regroup): let it in at the next commit boundary.
            self.admit_at_next_boundary(now, actions);
            return Some(self.checked_in_wait(worker));
        };
        if request.generation != number {
            return Some(self.group_for(rank));
        }
        let Some(generation) = self.generation.as_mut() else {
            return Some(self.wait("no generation"));
        };
        let step = request.want_step;
        if step >= self.plan.total_steps {
            return Some(self.wait("waiting for the last steps to commit"));
        }
        if step < self.committed {
            return Some(Reply::Error(ApiError::Refused(format!(
                "step {step} is already committed (next is {}): ask for a step after the ones your model holds",
                self.committed
            ))));
        }
        if let GenStatus::Draining { until } = generation.status
            && step >= until
        {
            return Some(self.wait(format!("regrouping at step {until} to admit new workers")));
        }
        if step >= self.committed + WINDOW {
            return Some(self.wait(format!(
                "step {step} waits for step {} to commit",
                self.committed
            )));
        }
        generation.issued_end = generation.issued_end.max(step + 1);
        let world = generation.members.len();
        let generation_number = generation.number;
        let plan = self.plan_of(step);
        let range = shard_range(plan.patients.len(), world, rank as usize);
        Some(Reply::Assignment(Assignment::Train(TrainAssignment {
            generation: generation_number,
            step,
            epoch: plan.epoch,
            global_patients: plan.patients.len() as u64,
            shard: plan.patients[range].to_vec(),
            total_steps: self.plan.total_steps,
        })))
    }

    /// A non-member asked: it is checked in (its model state is known) and waits.
    fn checked_in_wait(&mut self, worker: WorkerId) -> Reply {
        if let Some(record) = self.workers.get_mut(&worker) {
            record.checked_in = true;
        }
        let reason = match (&self.phase, &self.generation) {
            _ if self.shutdown.is_some() => "the coordinator is shutting down".to_owned(),
            _ if self.paused.is_some() => self.paused.clone().unwrap_or_default(),
            (Phase::Waiting, _) => format!(
                "waiting for workers: {} of {} registered",
                self.workers.len(),
                self.settings.expected_workers
            ),
            (Phase::Regrouping { .. }, _) => "regrouping".to_owned(),
            (_, Some(g)) if g.is_live() => {
                "admitted at the next regroup (next commit boundary)".to_owned()
            }
            _ => "waiting".to_owned(),
        };
        self.wait(reason)
    }

    fn group_for(&self, rank: u32) -> Reply {
        let Some(generation) = &self.generation else {
            return self.wait("no generation");
        };
        let store = if rank == 0 {
            StoreRole::Host
        } else {
            let host = generation
                .members
                .first()
                .and_then(|w| self.workers.get(w))
                .map(|w| w.host.clone());
            match (host, generation.store_port) {
                (Some(host), Some(port)) => StoreRole::Connect { host, port },
                _ => return self.wait("waiting for rank 0 to publish its store"),
            }
        };
        Reply::Assignment(Assignment::Group(GroupAssignment {
            generation: generation.number,
            rank,
            world_size: generation.members.len() as u32,
            store,
            broadcast_root: generation.broadcast_root,
            start_step: generation.start_step,
            total_steps: self.plan.total_steps,
            steps_per_epoch: self.plan.steps_per_epoch,
            resume_checkpoint: generation.resume_checkpoint.clone(),
        }))
    }

    fn plan_of(&mut self, step: u64) -> Arc<StepPlan> {
        if let Some(plan) = self.plans.get(&step) {
            return Arc::clone(plan);
        }
        let plan = Arc::new(self.plan.plan(step));
        self.plans.insert(step, Arc::clone(&plan));
        plan
    }

    fn publish_store(
        &mut self,
        publication: StorePublication,
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<Reply> {
        if let Err(err) = self.touch(publication.worker_id, now) {
            return Some(Reply::Error(err));
        }
        let Some(generation) = self.generation.as_mut().filter(|g| g.is_live()) else {
            return Some(Reply::Error(ApiError::Refused(format!(
                "generation {} is over: ask for an assignment",
                publication.generation
            ))));
        };
        if generation.number != publication.generation
            || generation.rank_of(publication.worker_id) != Some(0)
        {
            return Some(Reply::Error(ApiError::Refused(format!(
                "worker {} is not rank 0 of generation {} (current generation {}): only rank 0 publishes the store",
                publication.worker_id, publication.generation, generation.number
            ))));
        }
        generation.store_port = Some(publication.port);
        actions.push(Action::Wake);
        Some(Reply::Done)
    }

    fn report(
        &mut self,
        report: StepReport,
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<Reply> {
        let key = (report.generation, report.step);
        let current = self.generation.as_ref().map(|g| g.number);
        let over = matches!(self.phase, Phase::Finished | Phase::Failed(_));
        let record = match self.touch(report.worker_id, now) {
            Ok(record) => record,
            Err(err) => return Some(Reply::Error(err)),
        };
        if let Some(last) = record.last_report
            && key <= last
        {
            return Some(Reply::Error(ApiError::Stale(format!(
                "worker {} already reported step {} of generation {} (or a later one): a report is \
                 accepted once; this one changed nothing",
                report.worker_id, report.step, report.generation
            ))));
        }
        // What the worker's model holds (its next ask says the same).
        record.next_step = Some(record.next_step.unwrap_or(0).max(report.step + 1));
        if over {
            record.last_report = Some(key);
            return Some(Reply::Done);
        }
        if current != Some(report.generation) {
            // Trained in a generation that is over (its step is redone, or was
            // recovered, in the current one), or in one of a coordinator before a
            // restart; a made-up generation lands here too.
            return Some(Reply::Error(ApiError::Stale(format!(
                "generation {} is not the current one ({}): the report of step {} changed nothing",
                report.generation,
                current.unwrap_or(0),
                report.step
            ))));
        }
        let Some(generation) = self.generation.as_mut() else {
            return Some(Reply::Done);
        };
        if generation.rank_of(report.worker_id) != Some(report.rank) {
            return Some(Reply::Error(ApiError::Refused(format!(
                "worker {} is not rank {} of generation {}",
                report.worker_id, report.rank, report.generation
            ))));
        }
        if report.step >= generation.issued_end {
            return Some(Reply::Error(ApiError::Refused(format!(
                "step {} was not assigned in generation {}: report only steps you were given",
                report.step, report.generation
            ))));
        }
        if let Some(dir) = &report.checkpoint_dir {
            // Rank 0 names a checkpoint once its (background) write completed, which
            // may be in the report of a later step: the directory name says its step.
            let holds = dir
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(hsat_core::checkpoint::step_of_dir_name)
                .unwrap_or(report.step + 1);
            if self
                .latest_checkpoint
                .as_ref()
                .is_none_or(|(_, s)| *s <= holds)
            {
                self.latest_checkpoint = Some((dir.clone(), holds));
            }
            if self.checkpoints.get(&holds) != Some(dir) {
                self.checkpoints.insert(holds, dir.clone());
                actions.push(Action::Checkpoint {
                    step: holds,
                    dir: dir.clone(),
                });
            }
        }
        if let Some(record) = self.workers.get_mut(&report.worker_id) {
            record.last_report = Some(key);
        }
        let Some(generation) = self.generation.as_mut() else {
            return Some(Reply::Done);
        };
        if report.step < self.committed {
            return Some(Reply::Done);
        }
        let live = generation.is_live();
        generation
            .reports
            .entry(report.step)
            .or_default()
            .insert(report.rank, report);
        if live {
            self.commit_ready(now, actions);
        }
        Some(Reply::Done)
    }

    /// Commits every step, in order, that all ranks of the live generation reported.
    fn commit_ready(&mut self, now: Duration, actions: &mut Vec<Action>) {
        loop {
            let Some(generation) = self.generation.as_ref() else {
                return;
            };
            let world = generation.members.len();
            let complete = generation
                .reports
                .get(&self.committed)
                .is_some_and(|reports| reports.len() == world);
            if !complete || self.committed >= self.plan.total_steps {
                break;
            }
            let step = self.committed;
            if let Err(message) = self.check_checksums(step) {
                tracing::error!(step, "{message}");
                self.phase = Phase::Failed(message);
                actions.push(Action::Wake);
                return;
            }
            self.commit(step, false, now, actions);
        }
        self.end_drained(now, actions);
    }

    fn check_checksums(&self, step: u64) -> Result<(), String> {
        let Some(reports) = self.generation.as_ref().and_then(|g| g.reports.get(&step)) else {
            return Ok(());
        };
        let mut values = reports.values().map(|r| r.param_checksum);
        let Some(first) = values.next() else {
            return Ok(());
        };
        if values.all(|v| v == first) {
            return Ok(());
        }
        let listed = reports
            .values()
            .map(|r| format!("rank {} {:016x}", r.rank, r.param_checksum))
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "parameters diverged at step {step}: the ranks' parameter checksums differ ({listed}); \
             the all-reduce or the optimizer is not deterministic across ranks: the job stops, \
             resume from the last checkpoint"
        ))
    }

    /// Records `step` as committed (with whatever reports the generation has).
    fn commit(&mut self, step: u64, recovered: bool, now: Duration, actions: &mut Vec<Action>) {
        let plan = self.plan_of(step);
        let Some(generation) = self.generation.as_ref() else {
            return;
        };
        let world = generation.members.len();
        let empty = BTreeMap::new();
        let reports = generation.reports.get(&step).unwrap_or(&empty);
        let ranks: Vec<RankRecord> = (0..world)
            .map(|rank| {
                let range = shard_range(plan.patients.len(), world, rank);
                let patients: Vec<usize> = plan.patients[range].iter().map(|p| p.patient).collect();
                let report = reports.get(&(rank as u32));
                RankRecord {
                    rank: rank as u32,
                    worker: generation.members[rank].0,
                    worker_name: generation.names[rank].clone(),
                    patient_ids: patients
                        .iter()
                        .map(|&p| self.plan.index.patients[p].id.clone())
                        .collect(),
                    patients,
                    checksum: report.map(|r| r.param_checksum),
                    loss: report.map(|r| r.losses.total),
                    step_seconds: report.map(|r| r.step_seconds),
                }
            })
            .collect();
        let losses = mean_losses(reports.values());
        let step_seconds = reports.values().map(|r| r.step_seconds).fold(0.0, f64::max);
        let telemetry = mean_telemetry(reports.values());
        let entry = LedgerEntry {
            step,
            epoch: plan.epoch,
            total_steps: self.plan.total_steps,
            generation: generation.number,
            recovered,
            global_patients: plan.patients.len(),
            ranks,
            losses,
            step_seconds,
            telemetry,
        };
        if let Some(generation) = self.generation.as_mut() {
            generation.reports.remove(&step);
        }
        self.record_commit(entry, now, actions);
    }

    /// Makes `entry` (the next step) committed: state, throughput, ledger action.
    fn record_commit(&mut self, entry: LedgerEntry, now: Duration, actions: &mut Vec<Action>) {
        let step = entry.step;
        let losses = entry.losses;
        let patients = entry.global_patients;
        self.plans.remove(&step);
        self.committed = step + 1;
        self.last_losses = losses.or(self.last_losses);
        self.recent.push_back((now, patients));
        while self.recent.len() > 64 {
            self.recent.pop_front();
        }
        actions.push(Action::Commit(entry));
        actions.push(Action::Wake);
        if self.committed >= self.plan.total_steps {
            tracing::info!(
                steps = self.committed,
                "every step committed: the job is finished"
            );
            self.phase = Phase::Finished;
            self.request_final_checkpoint();
        }
    }

    /// Ends a draining generation once everything it issued is committed.
    fn end_drained(&mut self, now: Duration, actions: &mut Vec<Action>) {
        if self.shutdown.is_some() {
            // Drained for a shutdown: stop instead of regrouping.
            self.finish_shutdown_if_drained(actions);
            return;
        }
        let Some(generation) = self.generation.as_mut() else {
            return;
        };
        if let GenStatus::Draining { until } = generation.status
            && self.committed >= until
            && !matches!(self.phase, Phase::Finished | Phase::Failed(_))
        {
            generation.status = GenStatus::Ended;
            let members = generation.members.clone();
            for member in members {
                if let Some(record) = self.workers.get_mut(&member) {
                    record.checked_in = false;
                }
            }
            self.phase = Phase::Regrouping { since: now };
            actions.push(Action::Wake);
        }
    }

    fn break_generation(&mut self, now: Duration, why: &str, actions: &mut Vec<Action>) {
        let Some(generation) = self.generation.as_mut().filter(|g| g.is_live()) else {
            return;
        };
        tracing::warn!(
            generation = generation.number,
            committed = self.committed,
            "generation broken: {why}"
        );
        generation.status = GenStatus::Ended;
        let members = generation.members.clone();
        for member in members {
            if let Some(record) = self.workers.get_mut(&member) {
                record.checked_in = false;
            }
        }
        if !matches!(self.phase, Phase::Finished | Phase::Failed(_)) {
            self.phase = Phase::Regrouping { since: now };
        }
        actions.push(Action::Wake);
    }

    fn leave(
        &mut self,
        worker: WorkerId,
        reason: &str,
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<Reply> {
        if self.workers.remove(&worker).is_none() {
            return Some(Reply::Done);
        }
        tracing::info!(worker = %worker, reason, "worker left");
        self.note_gone(worker);
        self.drop_member(
            worker,
            &format!("worker {worker} left: {reason}"),
            now,
            actions,
        );
        Some(Reply::Done)
    }

    fn drop_member(
        &mut self,
        worker: WorkerId,
        why: &str,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let member = self
            .generation
            .as_ref()
            .filter(|g| g.is_live())
            .is_some_and(|g| g.rank_of(worker).is_some());
        if member {
            self.break_generation(now, why, actions);
        }
    }

    fn expire(&mut self, now: Duration, actions: &mut Vec<Action>) {
        let lease = self.settings.lease;
        let expired: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.last_seen) > lease)
            .map(|(&id, _)| id)
            .collect();
        for worker in expired {
            self.workers.remove(&worker);
            tracing::warn!(worker = %worker, "lease expired");
            self.note_gone(worker);
            self.drop_member(
                worker,
                &format!("worker {worker}'s lease expired"),
                now,
                actions,
            );
        }
    }

    /// Forms the next generation when the rules allow (see README.md).
    fn try_form(&mut self, now: Duration, actions: &mut Vec<Action>) {
        let since = match self.phase {
            Phase::Waiting => None,
            Phase::Regrouping { since } => Some(since),
            _ => return,
        };
        if self.shutdown.is_some() || self.generation.as_ref().is_some_and(|g| g.is_live()) {
            return;
        }
        let candidates = self.formation_candidates(now);
        if !self.ready_to_form(since, &candidates, now) {
            return;
        }
        // The newest state any candidate holds, within what was ever issued.
        let issued_end = self.generation.as_ref().map_or(0, |g| g.issued_end);
        let holds: Vec<u64> = candidates
            .iter()
            .map(|id| self.workers.get(id).and_then(|w| w.next_step).unwrap_or(0))
            .collect();
        // After a restart the ledger, not `issued_end`, says what a held state is
        // worth (restore.rs); that also commits the steps it recovers.
        let restored = if self.restore.is_some() {
            let start = self.restored_start(&candidates, now, actions);
            self.restore = None;
            Some(start)
        } else {
            None
        };
        let best = match restored {
            Some(start) => start.map(|(step, _)| step),
            None => holds
                .iter()
                .copied()
                .filter(|&s| s >= self.committed && s <= issued_end.max(self.committed))
                .max(),
        };
        let (start_step, resume_checkpoint) = match best {
            Some(step) => (step, None),
            None => {
                // Nobody holds the committed state: resume from the newest checkpoint
                // that verifies (or the start) and void the steps after it.
                let (step, checkpoint) = self.rollback_target();
                tracing::warn!(
                    committed = self.committed,
                    resume = step,
                    checkpoint = %checkpoint
                        .as_ref()
                        .map_or_else(|| "none (the start)".to_owned(), |d| d.display().to_string()),
                    "no live worker holds the committed state: rolling back"
                );
                actions.push(Action::Rollback {
                    to_step: step,
                    checkpoint: checkpoint.clone(),
                });
                self.committed = step;
                (step, checkpoint)
            }
        };
        // Steps a survivor holds were fully all-reduced: commit them now.
        while self.committed < start_step {
            let step = self.committed;
            if let Err(message) = self.check_checksums(step) {
                self.phase = Phase::Failed(message);
                actions.push(Action::Wake);
                return;
            }
            self.commit(step, true, now, actions);
            if self.committed == step {
                // No generation to take the reports from (cannot happen: a restored
                // start committed its steps itself); never spin.
                break;
            }
        }
        if self.committed >= self.plan.total_steps {
            self.phase = Phase::Finished;
            self.request_final_checkpoint();
            return;
        }
        let broadcast_root = match restored {
            Some(Some((_, root))) => root,
            _ => holds
                .iter()
                .position(|&held| resume_checkpoint.is_some() || held == start_step)
                .unwrap_or(0),
        } as u32;
        let number = self.next_generation_number();
        let names = candidates
            .iter()
            .map(|id| {
                self.workers
                    .get(id)
                    .map(|w| w.name.clone())
                    .unwrap_or_default()
            })
            .collect();
        for id in &candidates {
            if let Some(record) = self.workers.get_mut(id) {
                record.checked_in = false;
            }
        }
        if since.is_none() && candidates.len() < self.settings.expected_workers {
            tracing::info!(
                world_size = candidates.len(),
                expected_workers = self.settings.expected_workers,
                min_workers = self.settings.min_workers,
                "formation wait over: starting with {} of {} expected workers (others join at the next regroup)",
                candidates.len(),
                self.settings.expected_workers
            );
        }
        tracing::info!(
            generation = number,
            world_size = candidates.len(),
            start_step,
            broadcast_root,
            "generation formed"
        );
        let ranks = candidates
            .iter()
            .enumerate()
            .map(|(rank, &id)| (id, rank as u32))
            .collect();
        self.generation = Some(Generation {
            number,
            ranks,
            members: candidates,
            names,
            start_step,
            broadcast_root,
            store_port: None,
            resume_checkpoint,
            status: GenStatus::Active,
            issued_end: start_step,
            reports: BTreeMap::new(),
        });
        self.phase = Phase::Running;
        actions.push(Action::Wake);
    }

    fn status(&self, now: Duration) -> JobStatus {
        let generation = self.generation.as_ref();
        let workers = self
            .workers
            .iter()
            .map(|(&id, w)| {
                let rank = generation
                    .filter(|g| g.is_live())
                    .and_then(|g| g.rank_of(id));
                WorkerStatus {
                    worker_id: id,
                    name: w.name.clone(),
                    rank,
                    last_heartbeat_age: now.saturating_sub(w.last_seen),
                    state: if w.stopped {
                        "stopped"
                    } else if rank.is_some() {
                        "member"
                    } else {
                        "waiting"
                    }
                    .to_owned(),
                }
            })
            .collect();
        let (steps_per_second, patients_per_second) =
            match (self.recent.front(), self.recent.back()) {
                (Some(first), Some(last)) if self.recent.len() >= 2 && last.0 > first.0 => {
                    let seconds = (last.0 - first.0).as_secs_f64();
                    let patients: usize = self.recent.iter().skip(1).map(|(_, p)| p).sum();
                    (
                        (self.recent.len() - 1) as f64 / seconds,
                        patients as f64 / seconds,
                    )
                }
                _ => (0.0, 0.0),
            };
        let message = match (self.failure(), &self.shutdown, &self.paused) {
            (Some(failure), _, _) => failure.to_owned(),
            (None, Some(shutdown), _) => shutdown.describe(self.committed),
            (None, None, Some(paused)) => paused.clone(),
            (None, None, None) => String::new(),
        };
        JobStatus {
            state: self.state(),
            message,
            step: self.committed,
            total_steps: self.plan.total_steps,
            epoch: self.committed / self.plan.steps_per_epoch.max(1),
            generation: generation.map_or(0, |g| g.number),
            workers,
            steps_per_second,
            patients_per_second,
            last_losses: self.last_losses,
        }
    }
}

/// Each rank's weight in a step's means: its share of the step's patients, or an
/// equal share when no rank had patients.
fn patient_weight(reports: &[&StepReport]) -> impl Fn(&StepReport) -> f64 + use<> {
    let total: u64 = reports.iter().map(|r| r.local_patients).sum();
    let ranks = reports.len() as f64;
    move |r: &StepReport| {
        if total == 0 {
            1.0 / ranks
        } else {
            r.local_patients as f64 / total as f64
        }
    }
}

/// Patient-weighted means of the ranks' telemetry (plain means when no rank had
/// patients); the attack gain over the ranks that measured one.
fn mean_telemetry<'a>(reports: impl Iterator<Item = &'a StepReport>) -> Option<CommitTelemetry> {
    let reports: Vec<&StepReport> = reports.collect();
    if reports.is_empty() {
        return None;
    }
    let weight = patient_weight(&reports);
    let mean = |value: fn(&StepReport) -> f64| reports.iter().map(|r| weight(r) * value(r)).sum();
    let gains: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| r.telemetry.attack_gain.map(|g| (weight(r), g)))
        .collect();
    let gain_weight: f64 = gains.iter().map(|(w, _)| w).sum();
    let attack_gain = (!gains.is_empty()).then(|| {
        if gain_weight > 0.0 {
            gains.iter().map(|(w, g)| w * g).sum::<f64>() / gain_weight
        } else {
            gains.iter().map(|(_, g)| g).sum::<f64>() / gains.len() as f64
        }
    });
    Some(CommitTelemetry {
        ranks: StepTelemetry {
            attack_gain,
            eps: mean(|r| r.telemetry.eps),
            lr: mean(|r| r.telemetry.lr),
            attack_seconds: mean(|r| r.telemetry.attack_seconds),
            allreduce_seconds: mean(|r| r.telemetry.allreduce_seconds),
            patches: reports.iter().map(|r| r.telemetry.patches).sum(),
        },
        data_wait_seconds: mean(|r| r.data_wait_seconds),
    })
}

/// Patient-weighted mean of the ranks' losses (plain mean when no rank had patients).
fn mean_losses<'a>(reports: impl Iterator<Item = &'a StepReport>) -> Option<StepLosses> {
    let reports: Vec<&StepReport> = reports.collect();
    if reports.is_empty() {
        return None;
    }
    let weight = patient_weight(&reports);
    let levels = |pick: fn(&StepLosses) -> Option<hsat_proto::domain::LevelLosses>| {
        let mut any = false;
        let mut sum = hsat_proto::domain::LevelLosses::default();
        for r in &reports {
            if let Some(l) = pick(&r.losses) {
                any = true;
                let w = weight(r);
                sum.patient += w * l.patient;
                sum.slide += w * l.slide;
                sum.patch += w * l.patch;
                sum.total += w * l.total;
            }
        }
        any.then_some(sum)
    };
    Some(StepLosses {
        total: reports.iter().map(|r| weight(r) * r.losses.total).sum(),
        clean: levels(|l| l.clean),
        adversarial: levels(|l| l.adversarial),
    })
}
