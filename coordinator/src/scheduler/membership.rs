//! Who may form a generation, and when: the formation wait of the first
//! generation, the silence rule after a break, admitting live workers that are
//! outside the generation, and the pause below `min_workers`. Pure functions of the
//! scheduler's state and `now`, called from [`Scheduler::on_event`].

use std::time::Duration;

use hsat_proto::domain::WorkerId;

use super::{Action, GenStatus, Phase, Scheduler, Worker};

impl Scheduler {
    /// Heard from within `silent_after`: a worker that missed several heartbeats
    /// (killed, frozen, partitioned) is not waited for, long before its lease ends.
    pub(super) fn is_heard_from(&self, worker: &Worker, now: Duration) -> bool {
        now.saturating_sub(worker.last_seen) <= self.settings.silent_after
    }

    /// Workers that may be members of the next generation, in registration order:
    /// checked in (their model state is known) and not silent.
    pub(super) fn formation_candidates(&self, now: Duration) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.checked_in && w.next_step.is_some() && self.is_heard_from(w, now))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether a generation of `candidates` may form now (README "Flow", step 2 and
    /// 5). `since`: when the last generation broke (`None`: no generation yet).
    pub(super) fn ready_to_form(
        &self,
        since: Option<Duration>,
        candidates: &[WorkerId],
        now: Duration,
    ) -> bool {
        let count = candidates.len();
        if count < self.settings.min_workers {
            return false;
        }
        match since {
            // The first generation: everyone expected, or `min_workers` once the
            // formation wait since the first registration is over.
            None => {
                count >= self.settings.expected_workers
                    || self.first_registered.is_some_and(|first| {
                        now.saturating_sub(first) >= self.settings.formation_wait
                    })
            }
            // After a break: every worker still heartbeating has checked in (the
            // silent ones are not waited for), or the regroup wait is over.
            Some(since) => {
                let still_coming = self
                    .workers
                    .iter()
                    .filter(|(id, w)| {
                        !w.stopped && !candidates.contains(id) && self.is_heard_from(w, now)
                    })
                    .count();
                still_coming == 0 || now.saturating_sub(since) >= self.settings.regroup_wait
            }
        }
    }

    /// A worker (a newcomer, or a live one left out of the last generation) waits
    /// outside an active generation: issue nothing new, let the issued steps commit,
    /// then form the next generation with it.
    pub(super) fn admit_at_next_boundary(&mut self, now: Duration, actions: &mut Vec<Action>) {
        if self.shutdown.is_some() {
            return;
        }
        let Some(generation) = &mut self.generation else {
            return;
        };
        if generation.status != GenStatus::Active {
            return;
        }
        generation.status = GenStatus::Draining {
            until: generation.issued_end,
        };
        tracing::info!(
            generation = generation.number,
            until = generation.issued_end,
            "draining to admit a worker"
        );
        actions.push(Action::Wake);
        self.end_drained(now, actions);
    }

    /// Updates the pause (no generation and fewer live workers than `min_workers`),
    /// logging when it starts, changes and ends.
    pub(super) fn note_pause(&mut self, now: Duration) {
        let waiting = matches!(self.phase, Phase::Waiting | Phase::Regrouping { .. })
            && self.shutdown.is_none()
            && !self.generation.as_ref().is_some_and(|g| g.is_live());
        let live = self
            .workers
            .values()
            .filter(|w| !w.stopped && self.is_heard_from(w, now))
            .count();
        let min = self.settings.min_workers;
        let paused = (waiting && live < min).then(|| {
            if matches!(self.phase, Phase::Waiting) {
                format!("waiting for workers: {live} of min {min} live")
            } else {
                format!(
                    "paused: {live} of min {min} workers; training continues when workers return"
                )
            }
        });
        if paused != self.paused {
            // Waiting for the first workers is the normal start, not worth a warning.
            let regrouping = matches!(self.phase, Phase::Regrouping { .. });
            match &paused {
                Some(reason) if regrouping => {
                    tracing::warn!(
                        live,
                        min_workers = min,
                        committed = self.committed,
                        "{reason}"
                    );
                }
                None if self.paused.is_some() && regrouping => {
                    tracing::info!(
                        live,
                        min_workers = min,
                        "enough workers again: the job continues"
                    );
                }
                _ => {}
            }
            self.paused = paused;
        }
    }
}
