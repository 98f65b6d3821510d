//! The worker's side of the control protocol as one pure state machine: given the
//! last reply (or the outcome of local work), it says what the worker does next.
//!
//! The real worker (`hsat-worker`), the simulated workers of the coordinator's
//! tests and of `hsat bench control-plane` all drive this one machine, so the
//! protocol's rules live in one place: the generation and step a request names, the
//! two-step lookahead, the group error carried to the coordinator, when to stop
//! asking because the job's last step is already held.
//!
//! ```text
//!   Register ─> Ask ─┬─ Wait  -> Sleep (nothing queued) or Train (something queued)
//!                ^   ├─ Group -> FormGroup -> GroupFormed | GroupFailed
//!                │   ├─ Train -> queued (up to LOOKAHEAD), then Train front step
//!                │   └─ Stop  -> Stop
//!                └── Train -> Trained -> Report -> Reported | CollectiveFailed
//!
//!   any call answered UnknownWorker (the coordinator restarted or expired the
//!   lease) -> Forgotten -> Register again, keeping the model and its held steps
//! ```
//!
//! The machine remembers the last [`HELD_HISTORY`] steps its model trained (step,
//! generation, world size, rank, checksum) and sends them with every request: a
//! restarted coordinator confirms the state against its ledger, or recovers steps
//! its ledger lost, from them.
//!
//! No I/O, no clock, no tokio: [`WorkerProtocol::next_action`] reads the state and
//! never changes it (so a driver may retry the same action), and
//! [`WorkerProtocol::on_event`] is the only way the state moves. A driver loop is:
//!
//! ```text
//! loop {
//!     match protocol.next_action() {
//!         Action::Ask(request) => protocol.on_event(Event::Assigned(rpc(request)?))?,
//!         Action::Train(step) => protocol.on_event(train(step))?,
//!         ...
//!         Action::Stop { success, reason } => break,
//!     }
//! }
//! ```

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::{
    Assignment, AssignmentRequest, GroupAssignment, HeldStep, Registered, Registration, StepLosses,
    StepReport, TrainAssignment, WorkerId,
};

/// Steps a worker holds ahead of the one it trains (the coordinator's window): the
/// loading of step s + 1 overlaps the training of step s.
pub const LOOKAHEAD: usize = 2;

/// The longest a worker sleeps on a `Wait` before asking again, whatever the
/// coordinator suggested: a regroup should not find it asleep.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Trained steps a worker remembers and sends with each request (more than the
/// coordinator's window, so a restarted coordinator can recover every step issued
/// after its ledger's last commit).
pub const HELD_HISTORY: usize = 4;

/// What the worker does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Call `register` with this registration; answer with [`Event::Registered`].
    Register(Registration),
    /// Call `next_assignment` with this request; answer with [`Event::Assigned`].
    Ask(AssignmentRequest),
    /// Leave any older collective and form this generation's (rank 0 hosts the
    /// store and calls `publish_store`); answer with [`Event::GroupFormed`] or
    /// [`Event::GroupFailed`].
    FormGroup(GroupAssignment),
    /// Train this step (the front of the queue); answer with [`Event::Trained`] or
    /// [`Event::CollectiveFailed`].
    Train(TrainAssignment),
    /// Call `report_step` with this report; answer with [`Event::Reported`].
    Report(StepReport),
    /// Sleep this long, then answer with [`Event::Slept`].
    Sleep(Duration),
    /// The job is over for this worker.
    Stop {
        /// The job finished; false: it failed or was cancelled.
        success: bool,
        /// The coordinator's reason.
        reason: String,
        /// Write the checkpoint of this step before leaving (the coordinator shuts
        /// down and this worker's model holds exactly this many steps).
        checkpoint_step: Option<u64>,
        /// Not over: the coordinator shut down and a restarted one resumes the job.
        resumable: bool,
    },
}

/// What a worker measured about a step it trained; the protocol adds who, which
/// generation and which rank to make the [`StepReport`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepOutcome {
    /// Patients of its shard.
    pub local_patients: u64,
    /// Its losses.
    pub losses: StepLosses,
    /// Checksum over all parameters' bytes after the update.
    pub param_checksum: u64,
    /// Seconds the step took, data wait included; finite, >= 0.
    pub step_seconds: f64,
    /// Seconds of that spent waiting for data; finite, >= 0.
    pub data_wait_seconds: f64,
    /// Set by rank 0 when it wrote a (complete) checkpoint after this step.
    pub checkpoint_dir: Option<PathBuf>,
    /// What the rank measured besides its losses.
    pub telemetry: hsat_core::telemetry::StepTelemetry,
}

/// What happened: a reply of the coordinator or the outcome of local work.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `register` answered.
    Registered(Registered),
    /// `next_assignment` answered.
    Assigned(Assignment),
    /// The generation's collective is up and every rank holds the root's state.
    GroupFormed {
        /// The generation formed.
        generation: u64,
    },
    /// Rendezvous or the state broadcast failed: the coordinator hears of it with
    /// the next request.
    GroupFailed {
        /// The generation that could not form.
        generation: u64,
        /// The collective's error.
        error: String,
    },
    /// The front step was trained and its update applied.
    Trained(StepOutcome),
    /// A collective of the front step failed (a peer died or hung): the group, its
    /// queued steps and the step are dropped; the coordinator hears of it with the
    /// next request.
    CollectiveFailed {
        /// The collective's error.
        error: String,
    },
    /// `report_step` answered.
    Reported,
    /// The sleep of [`Action::Sleep`] is over.
    Slept,
    /// A call was answered `UnknownWorker`: the coordinator restarted (or expired
    /// this worker's lease). The worker drops its collective and queued steps and
    /// registers again, keeping its model (and the steps it holds).
    Forgotten,
}

/// The coordinator (or the driver) broke the protocol: the worker cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A `Train` arrived while the worker is in no generation.
    #[error("the coordinator sent step {step} before any group: a protocol error, restart the job")]
    TrainBeforeGroup {
        /// The step sent.
        step: u64,
    },
    /// A `Train` arrived for another step or generation than the next one.
    #[error(
        "the coordinator sent step {step} of generation {generation}, expected step {expected_step} of generation {expected_generation}: a protocol error"
    )]
    UnexpectedStep {
        /// The step sent.
        step: u64,
        /// Its generation.
        generation: u64,
        /// The step the worker asked for.
        expected_step: u64,
        /// The worker's generation.
        expected_generation: u64,
    },
    /// The driver reported an event the protocol did not ask for (a bug in the
    /// worker loop, not in the coordinator).
    #[error("worker loop bug: event {event} arrived while the protocol expected {expected}")]
    UnexpectedEvent {
        /// The event that arrived.
        event: &'static str,
        /// What the protocol waited for.
        expected: &'static str,
    },
}

/// Where the machine is between actions.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Not registered yet.
    Unregistered(Registration),
    /// Asking for work or training queued steps (decided by the queue).
    Working,
    /// A `Group` arrived: forming it.
    Forming(GroupAssignment),
    /// A step was trained: reporting it.
    Reporting(StepReport),
    /// A `Wait` arrived with nothing queued.
    Sleeping(Duration),
    /// The coordinator said stop.
    Stopped {
        success: bool,
        reason: String,
        checkpoint_step: Option<u64>,
        resumable: bool,
    },
}

/// The worker's side of the protocol (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerProtocol {
    phase: Phase,
    /// What to register with (again, after [`Event::Forgotten`]).
    registration: Registration,
    worker_id: Option<WorkerId>,
    /// The generation this worker is a formed member of.
    group: Option<GroupAssignment>,
    /// Steps whose update the worker's model holds.
    next_step: u64,
    /// Steps given but not trained yet, in order; the front one trains next.
    queued: VecDeque<TrainAssignment>,
    /// A collective error to tell the coordinator with the next request, and the
    /// generation it happened in; cleared once the coordinator answered.
    group_error: Option<(u64, String)>,
    /// A `Wait` arrived while steps are queued: train one before asking again.
    train_before_asking: bool,
    steps_trained: u64,
    generations: u64,
    /// The last steps the model trained, oldest first, at most [`HELD_HISTORY`].
    held: VecDeque<HeldStep>,
    /// Times the worker registered.
    registrations: u64,
}

impl WorkerProtocol {
    /// A worker that registers with `registration` first.
    pub fn new(registration: Registration) -> Self {
        Self {
            phase: Phase::Unregistered(registration.clone()),
            registration,
            worker_id: None,
            group: None,
            next_step: 0,
            queued: VecDeque::new(),
            group_error: None,
            train_before_asking: false,
            steps_trained: 0,
            generations: 0,
            held: VecDeque::new(),
            registrations: 0,
        }
    }

    /// The last steps the model trained, oldest first.
    pub fn held(&self) -> impl Iterator<Item = &HeldStep> {
        self.held.iter()
    }

    /// Times the worker registered (more than 1 after a coordinator restart).
    pub fn registrations(&self) -> u64 {
        self.registrations
    }

    /// The id the coordinator gave, once registered.
    pub fn worker_id(&self) -> Option<WorkerId> {
        self.worker_id
    }

    /// The generation this worker is a formed member of.
    pub fn group(&self) -> Option<&GroupAssignment> {
        self.group.as_ref()
    }

    /// Steps whose update the worker's model holds.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// Steps held but not trained yet.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Steps this worker trained (its shards), over all generations.
    pub fn steps_trained(&self) -> u64 {
        self.steps_trained
    }

    /// Generations this worker formed.
    pub fn generations(&self) -> u64 {
        self.generations
    }

    /// What to do next. Reads the state only: calling it twice gives the same action.
    pub fn next_action(&self) -> Action {
        match &self.phase {
            Phase::Unregistered(registration) => Action::Register(registration.clone()),
            Phase::Forming(group) => Action::FormGroup(group.clone()),
            Phase::Reporting(report) => Action::Report(report.clone()),
            Phase::Sleeping(duration) => Action::Sleep(*duration),
            Phase::Stopped {
                success,
                reason,
                checkpoint_step,
                resumable,
            } => Action::Stop {
                success: *success,
                resumable: *resumable,
                reason: reason.clone(),
                // Only a model that holds exactly that step can write it.
                checkpoint_step: checkpoint_step.filter(|&step| step == self.next_step),
            },
            Phase::Working => match self.queued.front() {
                Some(front) if !self.should_ask() => Action::Train(front.clone()),
                _ => Action::Ask(self.request()),
            },
        }
    }

    /// Whether to ask for work rather than train the front step.
    fn should_ask(&self) -> bool {
        let queued = self.queued.len();
        if queued == 0 {
            return true;
        }
        if queued >= LOOKAHEAD || self.train_before_asking {
            return false;
        }
        // Past the job's last step there is nothing to prefetch: asking would only
        // be held by the coordinator's long poll.
        let beyond_end = self
            .group
            .as_ref()
            .is_some_and(|g| self.want_step() >= g.total_steps);
        !beyond_end
    }

    /// The step the next request asks for: the first one not held.
    fn want_step(&self) -> u64 {
        self.next_step + self.queued.len() as u64
    }

    fn request(&self) -> AssignmentRequest {
        let generation = match (&self.group_error, &self.group) {
            (Some((generation, _)), _) => *generation,
            (None, Some(group)) => group.generation,
            (None, None) => 0,
        };
        AssignmentRequest {
            // Unregistered workers never ask (the phase registers first).
            worker_id: self.worker_id.unwrap_or(WorkerId(0)),
            generation,
            next_step: self.next_step,
            want_step: self.want_step(),
            group_error: self.group_error.as_ref().map(|(_, e)| e.clone()),
            held: self.held.iter().copied().collect(),
        }
    }

    /// Moves the state on `event`; an event the coordinator should not have caused
    /// (or the driver should not have sent) is a [`ProtocolError`].
    pub fn on_event(&mut self, event: Event) -> Result<(), ProtocolError> {
        let expected = self.expected_event();
        let unexpected = |event: &Event| ProtocolError::UnexpectedEvent {
            event: event_name(event),
            expected,
        };
        match (&self.phase, event) {
            (Phase::Unregistered(_), Event::Registered(registered)) => {
                self.worker_id = Some(registered.worker_id);
                self.registrations += 1;
                self.phase = Phase::Working;
            }
            (Phase::Stopped { .. }, Event::Forgotten) => {
                return Err(unexpected(&Event::Forgotten));
            }
            (_, Event::Forgotten) => {
                // The new coordinator knows nothing of this worker's generation: the
                // collective and the queued steps go, the model (next_step, held)
                // stays and is offered at the next check-in.
                self.worker_id = None;
                self.group = None;
                self.group_error = None;
                self.leave_group();
                self.phase = Phase::Unregistered(self.registration.clone());
            }
            (Phase::Working, Event::Assigned(assignment)) if self.should_ask() => {
                // The coordinator has now seen the group error, if any.
                self.group_error = None;
                self.on_assignment(assignment)?;
            }
            (Phase::Forming(group), Event::GroupFormed { generation })
                if group.generation == generation =>
            {
                // The model now holds the broadcast root's state: this worker's
                // own trained steps describe it only if it held the same step.
                if group.start_step != self.next_step || group.resume_checkpoint.is_some() {
                    self.held.clear();
                }
                self.next_step = group.start_step;
                self.group = Some(group.clone());
                self.generations += 1;
                self.phase = Phase::Working;
            }
            (Phase::Forming(group), Event::GroupFailed { generation, error })
                if group.generation == generation =>
            {
                self.group_error = Some((generation, error));
                self.phase = Phase::Working;
            }
            (Phase::Working, Event::Trained(outcome)) if !self.should_ask() => {
                let (Some(train), Some(group), Some(worker_id)) =
                    (self.queued.pop_front(), &self.group, self.worker_id)
                else {
                    return Err(unexpected(&Event::Trained(outcome)));
                };
                self.next_step = train.step + 1;
                self.steps_trained += 1;
                if self.held.len() >= HELD_HISTORY {
                    self.held.pop_front();
                }
                self.held.push_back(HeldStep {
                    step: train.step,
                    generation: train.generation,
                    world_size: group.world_size,
                    rank: group.rank,
                    checksum: outcome.param_checksum,
                });
                self.train_before_asking = false;
                self.phase = Phase::Reporting(StepReport {
                    worker_id,
                    generation: train.generation,
                    step: train.step,
                    rank: group.rank,
                    local_patients: outcome.local_patients,
                    losses: outcome.losses,
                    param_checksum: outcome.param_checksum,
                    step_seconds: outcome.step_seconds,
                    data_wait_seconds: outcome.data_wait_seconds,
                    checkpoint_dir: outcome.checkpoint_dir,
                    telemetry: outcome.telemetry,
                });
            }
            (Phase::Working, Event::CollectiveFailed { error }) if !self.should_ask() => {
                let Some(group) = self.group.take() else {
                    return Err(unexpected(&Event::CollectiveFailed { error }));
                };
                self.group_error = Some((group.generation, error));
                self.leave_group();
            }
            (Phase::Reporting(_), Event::Reported) => self.phase = Phase::Working,
            (Phase::Sleeping(_), Event::Slept) => self.phase = Phase::Working,
            (_, event) => return Err(unexpected(&event)),
        }
        Ok(())
    }

    fn on_assignment(&mut self, assignment: Assignment) -> Result<(), ProtocolError> {
        match assignment {
            Assignment::Wait { retry, .. } => {
                if self.queued.is_empty() {
                    self.phase = Phase::Sleeping(retry.min(MAX_WAIT));
                } else {
                    self.train_before_asking = true;
                }
            }
            Assignment::Stop {
                success,
                reason,
                checkpoint_step,
                resumable,
            } => {
                self.group = None;
                self.leave_group();
                self.phase = Phase::Stopped {
                    success,
                    reason,
                    checkpoint_step,
                    resumable,
                };
            }
            Assignment::Group(group) => {
                // The old collective and its queued steps go before the new one forms.
                self.group = None;
                self.leave_group();
                self.phase = Phase::Forming(group);
            }
            Assignment::Train(train) => {
                let Some(group) = &self.group else {
                    return Err(ProtocolError::TrainBeforeGroup { step: train.step });
                };
                let expected_step = self.want_step();
                if train.generation != group.generation || train.step != expected_step {
                    return Err(ProtocolError::UnexpectedStep {
                        step: train.step,
                        generation: train.generation,
                        expected_step,
                        expected_generation: group.generation,
                    });
                }
                self.queued.push_back(train);
            }
        }
        Ok(())
    }

    fn leave_group(&mut self) {
        self.queued.clear();
        self.train_before_asking = false;
    }

    /// The event the current action is answered with (for error messages).
    fn expected_event(&self) -> &'static str {
        match self.next_action() {
            Action::Register(_) => "Registered",
            Action::Ask(_) => "Assigned",
            Action::FormGroup(_) => "GroupFormed or GroupFailed of its generation",
            Action::Train(_) => "Trained or CollectiveFailed",
            Action::Report(_) => "Reported",
            Action::Sleep(_) => "Slept",
            Action::Stop { .. } => "nothing (stopped)",
        }
    }
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Registered(_) => "Registered",
        Event::Assigned(_) => "Assigned",
        Event::GroupFormed { .. } => "GroupFormed",
        Event::GroupFailed { .. } => "GroupFailed",
        Event::Trained(_) => "Trained",
        Event::CollectiveFailed { .. } => "CollectiveFailed",
        Event::Reported => "Reported",
        Event::Slept => "Slept",
        Event::Forgotten => "Forgotten",
    }
}

#[cfg(test)]
#[path = "worker_protocol_tests.rs"]
mod tests;
