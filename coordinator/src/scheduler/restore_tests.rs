//! A scheduler restored from the ledger: restored state, generation and worker id
//! numbering, steps recovered from what workers hold, rollback to the newest
//! checkpoint that verifies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hsat_core::config::Config;
use hsat_proto::HSAT_VERSION;
use hsat_proto::domain::*;

use super::super::tests::{commits, config, index, ms, register, reply, settings};
use super::*;
use crate::Job;
use crate::scheduler::{Event, Reply};

const CHECKSUM: u64 = 0xabc;

/// A job of 20 patients, 4 per step, 3 epochs, resumed from `restored`; two
/// workers expected.
fn resumed(restored: RestoredJob) -> (Scheduler, Config, JobPlan) {
    let config = config(4, 3);
    let job = Job::from_index(config.clone(), index(20));
    let identity = JobIdentity {
        config: config.to_json_value(),
        dataset_fingerprint: "fp".into(),
        hsat_version: HSAT_VERSION.into(),
    };
    let plan = job.plan.clone();
    (
        Scheduler::resume(settings(2), job.plan, identity, restored),
        config,
        plan,
    )
}

fn restored(committed: u64) -> RestoredJob {
    RestoredJob {
        committed,
        last_checksum: Some(CHECKSUM),
        last_world_size: 2,
        highest_generation: 3,
        incarnation: 2,
        checkpoints: BTreeMap::new(),
    }
}

fn held(step: u64, generation: u64, rank: u32, checksum: u64) -> HeldStep {
    HeldStep {
        step,
        generation,
        world_size: 2,
        rank,
        checksum,
    }
}

/// A worker checks in (no generation: it re-registered) holding `next_step` with
/// `held` history; returns every action.
fn check_in(
    s: &mut Scheduler,
    worker: WorkerId,
    next_step: u64,
    held: Vec<HeldStep>,
    now: u64,
) -> Vec<Action> {
    s.on_event(
        Event::Assignment(AssignmentRequest {
            worker_id: worker,
            generation: 0,
            next_step,
            want_step: next_step,
            group_error: None,
            held,
        }),
        ms(now),
    )
}

fn group_of(actions: &[Action]) -> Option<GroupAssignment> {
    match reply(actions) {
        Reply::Assignment(Assignment::Group(g)) => Some(g),
        _ => None,
    }
}

fn rollbacks(actions: &[Action]) -> Vec<(u64, Option<PathBuf>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Rollback {
                to_step,
                checkpoint,
            } => Some((*to_step, checkpoint.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_resumed_job_continues_at_the_committed_step_with_new_generations_and_ids() {
    let (mut s, config, _) = resumed(restored(4));
    assert_eq!(s.committed(), 4);
    assert_eq!(s.state(), JobState::WaitingForWorkers);
    let a = register(&mut s, &config, "a", 0);
    let b = register(&mut s, &config, "b", 0);
    assert_eq!(
        (a.0, b.0),
        ((2 << 32) + 1, (2 << 32) + 2),
        "ids continue above the earlier incarnations'"
    );
    // Both hold step 4 with the ledger's checksum: confirmed, no rollback.
    let first = check_in(&mut s, a, 4, vec![held(3, 3, 0, CHECKSUM)], 1);
    assert!(commits(&first).is_empty());
    let second = check_in(&mut s, b, 4, vec![held(3, 3, 1, CHECKSUM)], 1);
    assert!(commits(&second).is_empty() && rollbacks(&second).is_empty());
    let group = group_of(&check_in(&mut s, a, 4, vec![held(3, 3, 0, CHECKSUM)], 2)).unwrap();
    assert_eq!(
        (group.generation, group.start_step, group.resume_checkpoint),
        (4, 4, None),
        "the generation number continues above the ledger's highest (3)"
    );
}

#[test]
fn steps_a_worker_holds_beyond_the_ledger_are_committed_as_recovered() {
    let (mut s, config, plan) = resumed(restored(4));
    let a = register(&mut s, &config, "a", 0);
    let b = register(&mut s, &config, "b", 0);
    // a trained steps 4 and 5 in generation 3 (as rank 1) after the ledger's last
    // commit; b only step 4 (its report of step 5 was lost with the coordinator).
    let history_a = vec![
        held(3, 3, 1, CHECKSUM),
        held(4, 3, 1, 44),
        held(5, 3, 1, 55),
    ];
    let history_b = vec![held(3, 3, 0, CHECKSUM), held(4, 3, 0, 44)];
    check_in(&mut s, a, 6, history_a.clone(), 1);
    let formed = check_in(&mut s, b, 5, history_b, 1);
    let recovered = commits(&formed);
    assert_eq!(recovered.iter().map(|e| e.step).collect::<Vec<_>>(), [4, 5]);
    for entry in &recovered {
        assert!(entry.recovered);
        assert_eq!(entry.generation, 3);
        assert_eq!(entry.ranks.len(), 2, "the world size of generation 3");
        let patients: Vec<usize> = entry
            .ranks
            .iter()
            .flat_map(|r| r.patients.clone())
            .collect();
        let planned: Vec<usize> = plan
            .plan(entry.step)
            .patients
            .iter()
            .map(|p| p.patient)
            .collect();
        assert_eq!(patients, planned, "rank records rebuilt from the plan");
        assert_eq!(entry.ranks[1].worker_name, "a");
        assert_eq!(entry.ranks[0].checksum, None);
    }
    assert_eq!(recovered[1].ranks[1].checksum, Some(55));
    assert_eq!(s.committed(), 6);
    let group = group_of(&check_in(&mut s, a, 6, history_a, 2)).unwrap();
    assert_eq!((group.start_step, group.broadcast_root), (6, 0));
    assert_eq!(group.generation, 4);
}

#[test]
fn a_checksum_that_differs_from_the_ledger_rolls_back_to_the_newest_checkpoint_that_verifies() {
    let mut job = restored(6);
    job.checkpoints = BTreeMap::from([
        (2, PathBuf::from("/ck/step-2")),
        (4, PathBuf::from("/ck/step-4")),
        (8, PathBuf::from("/ck/step-8")),
    ]);
    let (s, config, _) = resumed(job);
    // step-4 is damaged: the rollback takes step-2 (step-8 is after the commit).
    let mut s = s.with_checkpoint_check(CheckpointCheck::new(|dir: &Path| {
        if dir.ends_with("step-4") {
            Err("model.safetensors: 3 bytes, the manifest says 4".into())
        } else {
            Ok(())
        }
    }));
    let a = register(&mut s, &config, "a", 0);
    let b = register(&mut s, &config, "b", 0);
    check_in(&mut s, a, 6, vec![held(5, 3, 0, 999)], 1);
    let formed = check_in(&mut s, b, 6, vec![held(5, 3, 1, 999)], 1);
    assert!(commits(&formed).is_empty());
    assert_eq!(rollbacks(&formed), [(2, Some(PathBuf::from("/ck/step-2")))]);
    assert_eq!(s.committed(), 2);
    let group = group_of(&check_in(&mut s, a, 6, Vec::new(), 2)).unwrap();
    assert_eq!(group.start_step, 2);
    assert_eq!(group.resume_checkpoint, Some(PathBuf::from("/ck/step-2")));
}

#[test]
fn a_state_without_history_is_not_trusted_after_a_restart() {
    let (mut s, config, _) = resumed(restored(4));
    let a = register(&mut s, &config, "a", 0);
    let b = register(&mut s, &config, "b", 0);
    // Both claim step 4 but cannot show its checksum (no trained steps): rollback
    // to the start (no checkpoint known).
    check_in(&mut s, a, 4, Vec::new(), 1);
    let formed = check_in(&mut s, b, 4, Vec::new(), 1);
    assert_eq!(rollbacks(&formed), [(0, None)]);
    assert_eq!(s.committed(), 0);
}

#[test]
fn generations_continue_above_those_a_check_in_names() {
    let (mut s, config, _) = resumed(restored(4));
    let a = register(&mut s, &config, "a", 0);
    let b = register(&mut s, &config, "b", 0);
    // A generation the ledger never saw (its first commit was lost): 7.
    check_in(&mut s, a, 4, vec![held(3, 7, 0, CHECKSUM)], 1);
    check_in(&mut s, b, 4, vec![held(3, 7, 1, CHECKSUM)], 1);
    let group = group_of(&check_in(&mut s, a, 4, Vec::new(), 2)).unwrap();
    assert_eq!(group.generation, 8);
}

#[test]
fn a_finished_job_registers_workers_and_stops_them_with_success() {
    let (s, config, plan) = resumed(restored(0));
    drop(s);
    let (mut s, _, _) = resumed(restored(plan.total_steps));
    assert_eq!(s.state(), JobState::Finished);
    let a = register(&mut s, &config, "a", 0);
    match reply(&check_in(&mut s, a, 0, Vec::new(), 1)) {
        Reply::Assignment(Assignment::Stop { success, .. }) => assert!(success),
        other => panic!("{other:?}"),
    }
    assert!(s.is_done(Duration::ZERO));
}
