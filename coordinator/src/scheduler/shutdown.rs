//! Stopping a job on a shutdown signal (Kubernetes preemption): issue no new step,
//! let the issued ones commit (drain), then make sure a checkpoint of the last
//! committed step exists: if rank 0 did not report one, the first worker whose
//! model holds exactly the committed steps gets `Stop { checkpoint_step }` and
//! writes it before it leaves. The async shell waits (up to the grace) until the
//! checkpoint verifies on disk ([`Scheduler::checkpoint_wait`]).

use hsat_proto::domain::WorkerId;

use super::{Action, GenStatus, Phase, Scheduler};

/// A shutdown in progress.
#[derive(Debug, Clone)]
pub(super) struct Shutdown {
    /// Why (the signal), for the outcome and the workers' `Stop`.
    pub reason: String,
    /// Every issued step committed (or the generation broke): workers are stopped.
    drained: bool,
    /// The checkpoint asked for once drained; `None`: none needed.
    checkpoint: Option<CheckpointRequest>,
}

#[derive(Debug, Clone)]
struct CheckpointRequest {
    /// Steps the checkpoint holds (`step-<step>`): the committed ones.
    step: u64,
    /// The worker told to write it.
    writer: Option<WorkerId>,
    /// The writer left (after writing) or its lease expired.
    writer_gone: bool,
}

impl Shutdown {
    /// For `hsat status`.
    pub(super) fn describe(&self, committed: u64) -> String {
        match (&self.checkpoint, self.drained) {
            (_, false) => format!(
                "shutting down: no new steps, waiting for the issued ones to commit ({committed} committed)"
            ),
            (Some(request), true) => format!(
                "shutting down: waiting for the checkpoint of step {}",
                request.step
            ),
            (None, true) => format!("shutting down after {committed} committed steps"),
        }
    }
}

/// What a shutting-down coordinator still waits for before it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointWait {
    /// Nothing: no shutdown, or no checkpoint is needed (nothing committed, or rank
    /// 0 reported one of the last committed step).
    Nothing,
    /// Issued steps are still committing.
    Draining,
    /// A worker was (or will be) asked to write `step-<step>`.
    Writing {
        /// Steps the checkpoint holds.
        step: u64,
    },
    /// The writer left: check `step-<step>` on disk.
    Written {
        /// Steps the checkpoint holds.
        step: u64,
    },
    /// Every worker is stopped or gone and none could write it.
    Unavailable {
        /// The step that has no checkpoint.
        step: u64,
    },
}

impl Scheduler {
    /// Starts draining for a shutdown (SIGTERM); a finished or failed job ignores it.
    pub(super) fn begin_shutdown(&mut self, reason: String, actions: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Finished | Phase::Failed(_)) || self.shutdown.is_some() {
            return;
        }
        tracing::warn!(
            committed = self.committed,
            "shutting down ({reason}): issuing no new steps, letting the issued ones commit"
        );
        if let Some(generation) = self.generation.as_mut()
            && generation.status == GenStatus::Active
        {
            generation.status = GenStatus::Draining {
                until: generation.issued_end,
            };
        }
        self.shutdown = Some(Shutdown {
            reason,
            drained: false,
            checkpoint: None,
        });
        actions.push(Action::Wake);
        self.finish_shutdown_if_drained(actions);
    }

    /// Once the issued steps committed (or the generation broke): decide whether a
    /// checkpoint is needed and stop every worker (the job is cancelled).
    pub(super) fn finish_shutdown_if_drained(&mut self, actions: &mut Vec<Action>) {
        let committed = self.committed;
        let have_checkpoint = self
            .latest_checkpoint
            .as_ref()
            .is_some_and(|(_, step)| *step == committed);
        let over = matches!(self.phase, Phase::Finished | Phase::Failed(_));
        let drained = match self.generation.as_ref() {
            None => true,
            Some(generation) => match generation.status {
                GenStatus::Active => false,
                GenStatus::Draining { until } => committed >= until,
                GenStatus::Ended => true,
            },
        };
        let Some(shutdown) = self.shutdown.as_mut().filter(|s| !s.drained) else {
            return;
        };
        if over {
            // The job ended on its own meanwhile (finished or failed): nothing to do.
            shutdown.drained = true;
            return;
        }
        if !drained {
            return;
        }
        shutdown.drained = true;
        if let Some(generation) = self.generation.as_mut() {
            generation.status = GenStatus::Ended;
        }
        shutdown.checkpoint = (committed > 0 && !have_checkpoint).then_some(CheckpointRequest {
            step: committed,
            writer: None,
            writer_gone: false,
        });
        if shutdown.checkpoint.is_some() {
            tracing::info!(
                committed,
                "drained; no checkpoint of the last committed step yet: a worker holding it will write one"
            );
        } else {
            tracing::info!(
                committed,
                "drained; the last committed step needs no new checkpoint"
            );
        }
        self.phase = Phase::Failed(format!("cancelled: {}", shutdown.reason));
        actions.push(Action::Wake);
    }

    /// The checkpoint step for the `Stop` of `worker`, whose model holds
    /// `next_step` steps: the first worker holding the requested step writes it.
    /// At the job's end: unless rank 0 reported a checkpoint of the last step (its
    /// final report can be missing when it died after the last all-reduce and the
    /// step was committed as recovered), the first worker holding that step writes
    /// it before it leaves, as on a shutdown.
    pub(super) fn request_final_checkpoint(&mut self) {
        let last = self.committed;
        let have_checkpoint = self
            .latest_checkpoint
            .as_ref()
            .is_some_and(|(_, step)| *step == last);
        if last == 0 || have_checkpoint || self.shutdown.is_some() {
            return;
        }
        tracing::info!(
            step = last,
            "the job is finished but no checkpoint of its last step was reported: a worker holding it will write one"
        );
        self.shutdown = Some(Shutdown {
            reason: "finished".to_owned(),
            drained: true,
            checkpoint: Some(CheckpointRequest {
                step: last,
                writer: None,
                writer_gone: false,
            }),
        });
    }

    pub(super) fn checkpoint_request_for(
        &mut self,
        worker: WorkerId,
        next_step: u64,
    ) -> Option<u64> {
        let request = self.shutdown.as_mut()?.checkpoint.as_mut()?;
        if request.writer.is_some() || next_step != request.step {
            return None;
        }
        request.writer = Some(worker);
        tracing::info!(
            worker = %worker,
            step = request.step,
            "asking the worker to write the checkpoint of the last committed step before it leaves"
        );
        Some(request.step)
    }

    /// `worker` left or its lease expired.
    pub(super) fn note_gone(&mut self, worker: WorkerId) {
        if let Some(request) = self.shutdown.as_mut().and_then(|s| s.checkpoint.as_mut())
            && request.writer == Some(worker)
        {
            request.writer_gone = true;
        }
    }

    /// What a shutdown still waits for (see [`CheckpointWait`]).
    pub fn checkpoint_wait(&self) -> CheckpointWait {
        let Some(shutdown) = &self.shutdown else {
            return CheckpointWait::Nothing;
        };
        if !shutdown.drained {
            return CheckpointWait::Draining;
        }
        let Some(request) = &shutdown.checkpoint else {
            return CheckpointWait::Nothing;
        };
        let step = request.step;
        match request.writer {
            Some(_) if request.writer_gone => CheckpointWait::Written { step },
            Some(_) => CheckpointWait::Writing { step },
            None if self.workers.values().all(|w| w.stopped) => {
                CheckpointWait::Unavailable { step }
            }
            None => CheckpointWait::Writing { step },
        }
    }

    /// Whether a shutdown was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }
}
