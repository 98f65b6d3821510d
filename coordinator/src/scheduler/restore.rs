//! A scheduler rebuilt from the ledger after a coordinator restart, and the choice
//! of the state a job continues from (what live workers hold, or a checkpoint).
//!
//! A restarted coordinator knows, from its ledger, the committed step `c`, the
//! parameter checksum of the last commit, the generations used so far and the
//! checkpoints recorded. It knows nothing of the workers: they register again
//! (their old ids are unknown to it) and check in with the step their model holds
//! and the last steps it trained ([`HeldStep`]: step, generation, world size, rank,
//! checksum). The first generation after the restart starts from the newest state
//! that is either
//!
//! - confirmed: a worker holds exactly `c` steps and its last trained step's
//!   checksum is the ledger's (or `c` = 0: the seeded initial state), or
//! - provably complete: a worker holds `h` in `(c, c + HELD_HISTORY]` and trained
//!   every step of `[c, h)` itself; holding a step's update proves every rank of
//!   its generation applied it (the all-reduce completed), so those steps are
//!   committed as `recovered`, their rank records rebuilt from the plan and the
//!   generation's world size (the holder's rank carries its checksum);
//!
//! otherwise the job rolls back to the newest checkpoint at or before `c` that
//! verifies (or to step 0). Generation numbers continue above every generation the
//! ledger or a check-in names, and worker ids above any an earlier incarnation
//! gave, so a stale call of the old incarnation can never match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hsat_core::sampler::shard_range;
use hsat_proto::domain::{AssignmentRequest, HeldStep, WorkerId};

use super::{Action, ClusterSettings, JobPlan, LedgerEntry, Phase, RankRecord, Scheduler};
use crate::identity::JobIdentity;

/// What a restarted coordinator knows of its job (from the ledger).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoredJob {
    /// Committed steps (after rollbacks).
    pub committed: u64,
    /// The parameter checksum of the last commit, if any rank reported one.
    pub last_checksum: Option<u64>,
    /// The world size of the last commit.
    pub last_world_size: usize,
    /// The highest generation the ledger names.
    pub highest_generation: u64,
    /// Coordinator starts before this one (0: this is the first).
    pub incarnation: u64,
    /// Checkpoints known (steps held -> directory): recorded in the ledger or found
    /// under the checkpoint root.
    pub checkpoints: BTreeMap<u64, PathBuf>,
}

/// Checks that a checkpoint directory is complete (its manifest verifies); `Err`
/// says what is wrong. The scheduler calls it only when it must roll back.
#[derive(Clone)]
pub struct CheckpointCheck(Arc<CheckFn>);

/// A checkpoint check: `Err` says what is wrong with the directory.
type CheckFn = dyn Fn(&Path) -> Result<(), String> + Send + Sync;

impl CheckpointCheck {
    /// A check running `check`.
    pub fn new(check: impl Fn(&Path) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    /// Accepts every directory (tests of the pure state machine).
    pub fn accept_all() -> Self {
        Self::new(|_| Ok(()))
    }

    fn check(&self, dir: &Path) -> Result<(), String> {
        (self.0)(dir)
    }
}

impl std::fmt::Debug for CheckpointCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointCheck")
    }
}

/// Set while the first generation after a restart has not formed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Restore {
    /// The ledger's checksum of its last commit.
    checksum: Option<u64>,
}

impl Scheduler {
    /// A scheduler that continues the job `restored` describes: `committed` steps
    /// stand, generations and worker ids continue above the earlier incarnations'.
    pub fn resume(
        settings: ClusterSettings,
        plan: JobPlan,
        identity: JobIdentity,
        restored: RestoredJob,
    ) -> Self {
        let mut scheduler = Self::new(settings, plan, identity);
        let total = scheduler.plan.total_steps;
        scheduler.committed = restored.committed.min(total);
        // Ids of incarnation k start at k * 2^32 + 1: an old worker's id is unknown
        // here, so it registers again instead of acting as someone else.
        scheduler.next_id = (restored.incarnation << 32) + 1;
        scheduler.generation_floor = restored.highest_generation;
        scheduler.checkpoints = restored.checkpoints;
        scheduler.latest_checkpoint = scheduler
            .checkpoints
            .range(..=scheduler.committed)
            .next_back()
            .map(|(&step, dir)| (dir.clone(), step));
        scheduler.restore = Some(Restore {
            checksum: restored.last_checksum,
        });
        if scheduler.committed >= total {
            scheduler.phase = Phase::Finished;
        }
        scheduler
    }

    /// Uses `check` to verify checkpoints before rolling back to one.
    pub fn with_checkpoint_check(mut self, check: CheckpointCheck) -> Self {
        self.checkpoint_check = check;
        self
    }

    /// Raises the floor of generation numbers to what a check-in names.
    pub(super) fn note_generations(&mut self, request: &AssignmentRequest) {
        let seen = request
            .held
            .iter()
            .map(|h| h.generation)
            .chain([request.generation])
            .max()
            .unwrap_or(0);
        self.generation_floor = self.generation_floor.max(seen);
    }

    /// The number of the next generation: above the last one and above every
    /// generation seen in the ledger or a check-in.
    pub(super) fn next_generation_number(&self) -> u64 {
        self.generation
            .as_ref()
            .map_or(0, |g| g.number)
            .max(self.generation_floor)
            + 1
    }

    /// After a restart: the newest state a candidate holds that the ledger confirms
    /// or that is provably complete (see the module docs); commits the recovered
    /// steps and returns `(start_step, index of the broadcast root in candidates)`.
    /// `None`: nobody holds such a state (roll back).
    pub(super) fn restored_start(
        &mut self,
        candidates: &[WorkerId],
        now: Duration,
        actions: &mut Vec<Action>,
    ) -> Option<(u64, usize)> {
        let restore = self.restore.clone()?;
        let committed = self.committed;
        let mut best: Option<(u64, usize)> = None;
        for (index, id) in candidates.iter().enumerate() {
            let Some(worker) = self.workers.get(id) else {
                continue;
            };
            let holds = worker.next_step.unwrap_or(0);
            let own = |step: u64| worker.held.iter().find(|h| h.step == step);
            let matches_ledger = committed == 0
                || match (restore.checksum, own(committed - 1)) {
                    (Some(expected), Some(h)) => h.checksum == expected,
                    // Its history does not reach back to the ledger's last commit:
                    // the steps after it must prove themselves.
                    (_, None) => holds > committed,
                    (None, Some(_)) => false,
                };
            let proven = match holds.cmp(&committed) {
                std::cmp::Ordering::Equal => matches_ledger,
                std::cmp::Ordering::Greater => {
                    matches_ledger && (committed..holds).all(|step| own(step).is_some())
                }
                std::cmp::Ordering::Less => false,
            };
            if proven {
                if best.is_none_or(|(step, _)| holds > step) {
                    best = Some((holds, index));
                }
            } else if holds >= committed {
                tracing::warn!(
                    worker = %id,
                    name = %worker.name,
                    holds,
                    committed,
                    "a worker's state cannot be confirmed against the ledger (checksum differs or its steps are unknown); not resuming from it"
                );
            }
        }
        let (start, root) = best?;
        let holder = candidates[root];
        let (name, held) = {
            let worker = self.workers.get(&holder)?;
            (worker.name.clone(), worker.held.clone())
        };
        for step in committed..start {
            let Some(record) = held.iter().find(|h| h.step == step).copied() else {
                break;
            };
            self.commit_recovered(step, record, holder, &name, now, actions);
        }
        tracing::info!(
            committed = self.committed,
            holder = %holder,
            "resuming from the state a live worker holds"
        );
        Some((start, root))
    }

    /// Commits `step`, trained before the restart by the generation `held` names,
    /// with rank records rebuilt from the plan (the holder's rank carries its
    /// checksum; the other ranks' reports were lost with the old coordinator).
    fn commit_recovered(
        &mut self,
        step: u64,
        held: HeldStep,
        holder: WorkerId,
        name: &str,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let plan = self.plan_of(step);
        let world = held.world_size.max(1) as usize;
        let ranks = (0..world)
            .map(|rank| {
                let range = shard_range(plan.patients.len(), world, rank);
                let patients: Vec<usize> = plan.patients[range].iter().map(|p| p.patient).collect();
                let mine = rank as u32 == held.rank;
                RankRecord {
                    rank: rank as u32,
                    worker: if mine { holder.0 } else { 0 },
                    worker_name: if mine { name.to_owned() } else { String::new() },
                    patient_ids: patients
                        .iter()
                        .map(|&p| self.plan.index.patients[p].id.clone())
                        .collect(),
                    patients,
                    checksum: mine.then_some(held.checksum),
                    loss: None,
                    step_seconds: None,
                }
            })
            .collect();
        let entry = LedgerEntry {
            step,
            epoch: plan.epoch,
            total_steps: self.plan.total_steps,
            generation: held.generation,
            recovered: true,
            global_patients: plan.patients.len(),
            ranks,
            losses: None,
            step_seconds: 0.0,
            telemetry: None,
        };
        self.record_commit(entry, now, actions);
    }

    /// Where a rollback resumes: the newest known checkpoint at or before the
    /// committed step that verifies (each newer one that fails is logged), or the
    /// start of the job.
    pub(super) fn rollback_target(&self) -> (u64, Option<PathBuf>) {
        for (&step, dir) in self.checkpoints.range(..=self.committed).rev() {
            match self.checkpoint_check.check(dir) {
                Ok(()) => return (step, Some(dir.clone())),
                Err(why) => tracing::warn!(
                    checkpoint = %dir.display(),
                    step,
                    "checkpoint rejected, trying an older one: {why}"
                ),
            }
        }
        (0, None)
    }
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
