//! Scheduler tests: scripted scenarios for each rule, and a property test that
//! drives the state machine with simulated workers (collectives as barriers) under
//! random joins, leaves, crashes and lease expiries, then checks the ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use hsat_core::config::Config;
use hsat_core::dataset::{DatasetFormat, DatasetIndex, IndexNotes, Patient, Slide, Split};
use hsat_core::sampler::epoch_order;
use hsat_proto::HSAT_VERSION;
use hsat_proto::domain::*;
use proptest::prelude::*;

use super::*;
use crate::Job;

pub(super) fn index(patients: usize) -> DatasetIndex {
    DatasetIndex {
        format: DatasetFormat::Manifest,
        root: PathBuf::from("/data"),
        classes: vec!["a".into(), "b".into()],
        patients: (0..patients)
            .map(|p| Patient {
                id: format!("p{p:03}"),
                class: p % 3 % 2,
                split: if p % 5 == 4 { Split::Val } else { Split::Train },
                slides: (0..1 + p % 2)
                    .map(|s| Slide {
                        id: format!("s{s}"),
                        patches: (0..2)
                            .map(|k| PathBuf::from(format!("{p}/{s}/{k}.png")))
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        fingerprint: "fp".into(),
        notes: IndexNotes::default(),
    }
}

pub(super) fn config(batch: usize, epochs: usize) -> Config {
    Config::from_toml_str(&format!(
        "[training]\nbatch_size = {batch}\nnum_epochs = {epochs}\n[data.hidisc]\nnum_slide_samples = 1\nnum_patch_samples = 1\n"
    ))
    .unwrap()
}

fn scheduler(
    patients: usize,
    batch: usize,
    epochs: usize,
    settings: ClusterSettings,
) -> (Scheduler, Config) {
    let config = config(batch, epochs);
    let job = Job::from_index(config.clone(), index(patients));
    let identity = JobIdentity {
        config: config.to_json_value(),
        dataset_fingerprint: "fp".into(),
        hsat_version: HSAT_VERSION.into(),
    };
    (Scheduler::new(settings, job.plan, identity), config)
}

pub(super) fn settings(expected: usize) -> ClusterSettings {
    let mut s = ClusterSettings::new(expected);
    s.heartbeat = Duration::from_millis(100);
    s.silent_after = Duration::from_millis(300);
    s.lease = Duration::from_millis(1000);
    s.regroup_wait = Duration::from_millis(1000);
    s.formation_wait = Duration::from_millis(500);
    s.validate().unwrap();
    s
}

pub(super) fn registration(config: &Config, name: &str) -> Registration {
    Registration {
        worker_name: name.into(),
        config: config.to_json_value(),
        dataset_fingerprint: "fp".into(),
        advertise_host: format!("{name}.local"),
        hsat_version: HSAT_VERSION.into(),
    }
}

pub(super) fn reply(actions: &[Action]) -> Reply {
    let replies: Vec<&Reply> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), 1, "{actions:?}");
    replies[0].clone()
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn register(s: &mut Scheduler, config: &Config, name: &str, now: u64) -> WorkerId {
    match reply(&s.on_event(Event::Register(registration(config, name)), ms(now))) {
        Reply::Registered(r) => r.worker_id,
        other => panic!("{other:?}"),
    }
}

pub(super) fn ask(
    s: &mut Scheduler,
    worker: WorkerId,
    generation: u64,
    next_step: u64,
    want: u64,
    now: u64,
) -> Assignment {
    let request = AssignmentRequest {
        worker_id: worker,
        generation,
        next_step,
        want_step: want,
        group_error: None,
        held: Vec::new(),
    };
    match reply(&s.on_event(Event::Assignment(request), ms(now))) {
        Reply::Assignment(a) => a,
        other => panic!("{other:?}"),
    }
}

pub(super) fn report(
    worker: WorkerId,
    generation: u64,
    rank: u32,
    step: u64,
    checksum: u64,
) -> StepReport {
    StepReport {
        worker_id: worker,
        generation,
        step,
        rank,
        local_patients: 1,
        losses: StepLosses {
            total: 1.0,
            clean: Some(LevelLosses::default()),
            adversarial: None,
        },
        param_checksum: checksum,
        step_seconds: 0.1,
        data_wait_seconds: 0.0,
        checkpoint_dir: None,
        telemetry: Default::default(),
    }
}

pub(super) fn commits(actions: &[Action]) -> Vec<LedgerEntry> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Commit(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// Two workers, generation 1: returns their ids (rank order).
fn formed_pair(s: &mut Scheduler, config: &Config) -> (WorkerId, WorkerId) {
    let a = register(s, config, "a", 0);
    let b = register(s, config, "b", 0);
    assert!(matches!(ask(s, a, 0, 0, 0, 1), Assignment::Wait { .. }));
    assert_eq!(s.state(), JobState::WaitingForWorkers);
    // b checks in: the generation forms; rank 1 waits for rank 0's store.
    assert!(matches!(ask(s, b, 0, 0, 0, 1), Assignment::Wait { .. }));
    assert_eq!(s.state(), JobState::Running);
    match ask(s, a, 0, 0, 0, 2) {
        Assignment::Group(g) => {
            assert_eq!(
                (g.rank, g.world_size, g.store.clone()),
                (0, 2, StoreRole::Host)
            );
        }
        other => panic!("{other:?}"),
    }
    match ask(s, b, 0, 0, 0, 2) {
        Assignment::Wait { reason, .. } => assert!(reason.contains("rank 0"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let publication = StorePublication {
        worker_id: a,
        generation: 1,
        port: 4242,
    };
    assert_eq!(
        reply(&s.on_event(Event::PublishStore(publication), ms(3))),
        Reply::Done
    );
    match ask(s, b, 0, 0, 0, 3) {
        Assignment::Group(g) => assert_eq!(
            g.store,
            StoreRole::Connect {
                host: "a.local".into(),
                port: 4242
            }
        ),
        other => panic!("{other:?}"),
    }
    (a, b)
}

#[test]
fn first_generation_waits_for_the_expected_workers_and_ranks_by_registration() {
    let (mut s, config) = scheduler(10, 4, 1, settings(2));
    formed_pair(&mut s, &config);
}

#[test]
fn steps_are_issued_two_ahead_and_committed_when_every_rank_reported() {
    let (mut s, config) = scheduler(10, 4, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    let Assignment::Train(t0) = ask(&mut s, a, 1, 0, 0, 4) else {
        panic!()
    };
    assert_eq!((t0.step, t0.shard.len(), t0.global_patients), (0, 2, 4));
    let Assignment::Train(t1) = ask(&mut s, a, 1, 0, 1, 4) else {
        panic!()
    };
    assert_eq!(t1.step, 1);
    // Step 2 is beyond the window until step 0 commits.
    assert!(matches!(
        ask(&mut s, a, 1, 0, 2, 4),
        Assignment::Wait { .. }
    ));
    assert!(commits(&s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5))).is_empty());
    let done = commits(&s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5)));
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0]
            .ranks
            .iter()
            .map(|r| r.patients.len())
            .sum::<usize>(),
        4
    );
    assert!(matches!(ask(&mut s, a, 1, 1, 2, 6), Assignment::Train(_)));
}

/// A report is accepted once per (worker, generation, step): a replay, even one
/// with another checksum, is `Stale` and cannot fail or change the job.
#[test]
fn a_replayed_report_is_rejected_and_changes_nothing() {
    let (mut s, config) = scheduler(10, 4, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    ask(&mut s, a, 1, 0, 1, 4);
    assert_eq!(
        reply(&s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5))),
        Reply::Done
    );
    // Before the commit: a replay with a forged checksum would fail the job.
    let replay = s.on_event(Event::Report(report(a, 1, 0, 0, 0xbad)), ms(5));
    match reply(&replay) {
        Reply::Error(ApiError::Stale(m)) => assert!(m.contains("already reported step 0"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(commits(&replay).is_empty());
    let done = commits(&s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5)));
    assert_eq!(
        done.len(),
        1,
        "the step commits with the first report's checksum"
    );
    assert_eq!(s.state(), JobState::Running);
    // After the commit: the same replay again, and an older step.
    for step in [0, 0] {
        let again = s.on_event(Event::Report(report(b, 1, 1, step, 7)), ms(6));
        assert!(
            matches!(reply(&again), Reply::Error(ApiError::Stale(_))),
            "{again:?}"
        );
        assert!(commits(&again).is_empty());
    }
    assert_eq!(s.committed(), 1);
}

#[test]
fn a_report_of_another_generation_is_rejected_and_changes_nothing() {
    let (mut s, config) = scheduler(10, 4, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    for generation in [0, 2, 99] {
        let stale = s.on_event(Event::Report(report(a, generation, 0, 0, 0xbad)), ms(5));
        match reply(&stale) {
            Reply::Error(ApiError::Stale(m)) => {
                assert!(m.contains("is not the current one (1)"), "{m}")
            }
            other => panic!("generation {generation}: {other:?}"),
        }
    }
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    let done = commits(&s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5)));
    assert_eq!(done.len(), 1);
    assert_eq!(s.state(), JobState::Running);
}

/// Rank 0 writes checkpoints in the background and names one in the report of a
/// later step, once complete: the checkpoint holds the step its directory names.
#[test]
fn a_checkpoint_reported_after_its_step_holds_the_step_its_directory_names() {
    let (mut s, config) = scheduler(10, 4, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    ask(&mut s, a, 1, 0, 1, 4);
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5));
    let dir = std::path::PathBuf::from("/out/checkpoints/step-00000001");
    let mut late = report(a, 1, 0, 1, 8);
    late.checkpoint_dir = Some(dir.clone());
    s.on_event(Event::Report(late), ms(6));
    assert_eq!(s.latest_checkpoint(), Some(&(dir, 1)));
}

#[test]
fn checksum_mismatch_fails_the_job_loudly() {
    let (mut s, config) = scheduler(10, 4, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    s.on_event(Event::Report(report(a, 1, 0, 0, 0xaa)), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 0xbb)), ms(5));
    assert_eq!(s.state(), JobState::Failed);
    let message = s.failure().unwrap().to_owned();
    assert!(message.contains("step 0"), "{message}");
    assert!(
        message.contains("rank 0 00000000000000aa") && message.contains("rank 1 00000000000000bb"),
        "{message}"
    );
    match ask(&mut s, a, 1, 1, 1, 6) {
        Assignment::Stop {
            success,
            reason,
            resumable,
            ..
        } => {
            assert!(!success);
            assert!(!resumable, "a failed job is over: workers exit 1");
            assert_eq!(reason, message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.committed(), 0);
}

#[test]
fn a_lost_worker_regroups_from_the_newest_state_a_survivor_holds() {
    let (mut s, config) = scheduler(10, 4, 3, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    ask(&mut s, b, 1, 0, 0, 4);
    // Both all-reduced step 0; only a reports before b dies.
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    for t in (100..=1200).step_by(100) {
        s.on_event(Event::Heartbeat(a), ms(t));
        s.on_event(Event::Tick, ms(t));
    }
    assert_eq!(s.state(), JobState::Regrouping);
    // a checks in holding step 0's update: generation 2 starts at step 1, step 0 is
    // committed as recovered.
    let actions = s.on_event(
        Event::Assignment(AssignmentRequest {
            worker_id: a,
            generation: 1,
            next_step: 1,
            want_step: 1,
            group_error: None,
            held: Vec::new(),
        }),
        ms(1250),
    );
    let recovered = commits(&actions);
    assert_eq!(recovered.len(), 1);
    assert!(recovered[0].recovered && recovered[0].step == 0);
    match ask(&mut s, a, 1, 1, 1, 1260) {
        Assignment::Group(g) => {
            assert_eq!(
                (g.generation, g.world_size, g.start_step, g.broadcast_root),
                (2, 1, 1, 0)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_workers_are_told_to_register_again() {
    let (mut s, _) = scheduler(10, 4, 1, settings(1));
    match reply(&s.on_event(Event::Heartbeat(WorkerId(9)), ms(0))) {
        Reply::Error(ApiError::UnknownWorker(m)) => assert!(m.contains("register again"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_worker_with_another_config_is_refused_with_the_key() {
    let (mut s, config) = scheduler(10, 4, 1, settings(1));
    let mut other = config.clone();
    other.training.batch_size = 5;
    match reply(&s.on_event(Event::Register(registration(&other, "x")), ms(0))) {
        Reply::Error(ApiError::Refused(m)) => {
            assert!(
                m.contains("training.batch_size: worker 5, coordinator 4"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

// ---- the simulation ----

#[derive(Debug, Clone, Default)]
struct SimWorker {
    id: Option<WorkerId>,
    dead: bool,
    left: bool,
    stopped: bool,
    generation: u64,
    rank: u32,
    next_step: u64,
    /// Train assignments held, in step order.
    queue: Vec<TrainAssignment>,
    /// Arrived at the all-reduce of (generation, step).
    arrived: Option<(u64, u64)>,
    /// Steps applied but not reported yet.
    unreported: Vec<u64>,
}

/// Registers `names` at `now` and has each check in holding nothing.
fn register_and_check_in(
    s: &mut Scheduler,
    config: &Config,
    names: &[&str],
    now: u64,
) -> Vec<WorkerId> {
    let ids: Vec<WorkerId> = names.iter().map(|n| register(s, config, n, now)).collect();
    for &id in &ids {
        ask(s, id, 0, 0, 0, now);
    }
    ids
}

fn group_of(
    s: &mut Scheduler,
    worker: WorkerId,
    generation: u64,
    next_step: u64,
    now: u64,
) -> GroupAssignment {
    match ask(s, worker, generation, next_step, next_step, now) {
        Assignment::Group(g) => g,
        other => panic!("expected a group, got {other:?}"),
    }
}

fn status(s: &mut Scheduler, now: u64) -> JobStatus {
    match reply(&s.on_event(Event::Status, ms(now))) {
        Reply::Status(status) => status,
        other => panic!("{other:?}"),
    }
}

fn request(worker: WorkerId, generation: u64, next_step: u64, error: Option<&str>) -> Event {
    Event::Assignment(AssignmentRequest {
        worker_id: worker,
        generation,
        next_step,
        want_step: next_step,
        group_error: error.map(str::to_owned),
        held: Vec::new(),
    })
}

#[test]
fn the_first_generation_forms_with_min_workers_once_the_formation_wait_is_over() {
    let mut cluster = settings(3);
    cluster.min_workers = 2;
    let (mut s, config) = scheduler(10, 4, 1, cluster);
    let ids = register_and_check_in(&mut s, &config, &["a", "b"], 0);
    // 2 of 3 expected, before the 500 ms formation wait: nothing forms.
    for t in [100, 300, 499] {
        s.on_event(Event::Heartbeat(ids[0]), ms(t));
        s.on_event(Event::Heartbeat(ids[1]), ms(t));
        s.on_event(Event::Tick, ms(t));
        assert_eq!(s.state(), JobState::WaitingForWorkers, "at {t} ms");
    }
    s.on_event(Event::Tick, ms(500));
    assert_eq!(s.state(), JobState::Running);
    let g = group_of(&mut s, ids[0], 0, 0, 510);
    assert_eq!((g.generation, g.world_size, g.rank), (1, 2, 0));
}

#[test]
fn the_formation_wait_never_starts_a_job_below_min_workers() {
    let mut cluster = settings(3);
    cluster.min_workers = 2;
    let (mut s, config) = scheduler(10, 4, 1, cluster);
    let a = register_and_check_in(&mut s, &config, &["a"], 0)[0];
    for t in (100..=2000).step_by(100) {
        s.on_event(Event::Heartbeat(a), ms(t));
        s.on_event(Event::Tick, ms(t));
    }
    assert_eq!(s.state(), JobState::WaitingForWorkers);
    let message = status(&mut s, 2000).message;
    assert_eq!(message, "waiting for workers: 1 of min 2 live");
    // The second worker arrives long after the wait: the job starts at once.
    register_and_check_in(&mut s, &config, &["b"], 2050);
    assert_eq!(s.state(), JobState::Running);
}

#[test]
fn below_min_workers_the_job_pauses_and_continues_when_workers_return() {
    let mut cluster = settings(2);
    cluster.min_workers = 2;
    let (mut s, config) = scheduler(10, 2, 3, cluster);
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    ask(&mut s, b, 1, 0, 0, 4);
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5));
    assert_eq!(s.committed(), 1);
    s.on_event(Event::Leave(b, "preempted".into()), ms(10));
    // Well past the regroup wait: one worker of min two, nothing forms or trains.
    for t in (100..=3000).step_by(100) {
        s.on_event(Event::Heartbeat(a), ms(t));
        s.on_event(Event::Tick, ms(t));
    }
    match ask(&mut s, a, 1, 1, 1, 3000) {
        Assignment::Wait { reason, .. } => {
            assert_eq!(
                reason,
                "paused: 1 of min 2 workers; training continues when workers return"
            );
        }
        other => panic!("a paused job issued {other:?}"),
    }
    let paused = status(&mut s, 3000);
    assert_eq!(paused.state, JobState::Regrouping);
    assert!(
        paused.message.starts_with("paused: 1 of min 2 workers"),
        "{}",
        paused.message
    );
    assert_eq!(
        (paused.step, s.committed()),
        (1, 1),
        "the committed state is kept"
    );
    // A worker returns: the job continues from the state a holds.
    let c = register_and_check_in(&mut s, &config, &["c"], 3100)[0];
    assert_eq!(s.state(), JobState::Running);
    let g = group_of(&mut s, a, 1, 1, 3110);
    assert_eq!(
        (g.generation, g.world_size, g.start_step, g.broadcast_root),
        (2, 2, 1, 0)
    );
    assert!(status(&mut s, 3110).message.is_empty());
    let _ = c;
}

#[test]
fn a_silent_member_does_not_hold_up_the_next_generation_until_its_lease_ends() {
    let (mut s, config) = scheduler(12, 3, 2, settings(3));
    let ids = register_and_check_in(&mut s, &config, &["a", "b", "c"], 0);
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    assert_eq!(s.state(), JobState::Running);
    group_of(&mut s, a, 0, 0, 1);
    s.on_event(
        Event::PublishStore(StorePublication {
            worker_id: a,
            generation: 1,
            port: 1,
        }),
        ms(1),
    );
    group_of(&mut s, b, 0, 0, 2);
    group_of(&mut s, c, 0, 0, 2);
    // c is killed at 100 ms (its last sign of life); a's all-reduce fails at once.
    s.on_event(Event::Heartbeat(c), ms(100));
    s.on_event(request(a, 1, 0, Some("connection closed by peer")), ms(150));
    assert_eq!(s.state(), JobState::Regrouping);
    s.on_event(request(b, 1, 0, Some("connection closed by peer")), ms(160));
    // c is not silent yet (300 ms without a heartbeat): the survivors wait for it.
    s.on_event(Event::Tick, ms(390));
    assert_eq!(s.state(), JobState::Regrouping);
    // 300 ms after its last heartbeat: form without it, long before its 1000 ms
    // lease and the 1000 ms regroup wait.
    for &w in &[a, b] {
        s.on_event(Event::Heartbeat(w), ms(401));
    }
    s.on_event(Event::Tick, ms(401));
    assert_eq!(s.state(), JobState::Running);
    let g = group_of(&mut s, a, 1, 0, 410);
    assert_eq!((g.generation, g.world_size), (2, 2));
}

#[test]
fn a_live_worker_left_out_of_a_generation_is_admitted_at_the_next_boundary() {
    let (mut s, config) = scheduler(12, 3, 2, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    // b misses its heartbeats (frozen) and a's collective fails: a alone forms
    // generation 2 once b is silent.
    s.on_event(request(a, 1, 0, Some("timeout")), ms(50));
    s.on_event(Event::Heartbeat(a), ms(350));
    s.on_event(Event::Tick, ms(350));
    assert_eq!(group_of(&mut s, a, 1, 0, 360).world_size, 1);
    // b comes back before its lease ends and asks: generation 2 drains (nothing
    // was issued) and generation 3 takes both.
    s.on_event(request(b, 1, 0, None), ms(400));
    s.on_event(request(a, 2, 0, None), ms(410));
    s.on_event(request(b, 1, 0, None), ms(420));
    let g = group_of(&mut s, a, 2, 0, 430);
    assert_eq!((g.generation, g.world_size), (3, 2));
}

#[test]
fn shutdown_drains_issued_steps_then_asks_a_holder_for_the_checkpoint() {
    let (mut s, config) = scheduler(10, 2, 3, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    for w in [a, b] {
        assert!(matches!(ask(&mut s, w, 1, 0, 0, 4), Assignment::Train(_)));
        assert!(matches!(ask(&mut s, w, 1, 0, 1, 4), Assignment::Train(_)));
    }
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    s.on_event(Event::Shutdown("SIGTERM".into()), ms(6));
    assert!(s.is_shutting_down());
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Draining);
    assert!(
        status(&mut s, 6)
            .message
            .starts_with("shutting down: no new steps")
    );
    // Nothing new is issued; no one may join.
    assert!(matches!(
        ask(&mut s, a, 1, 0, 2, 7),
        Assignment::Wait { .. }
    ));
    match reply(&s.on_event(Event::Register(registration(&config, "late")), ms(7))) {
        // Unavailable (retryable): the job goes on with the next coordinator.
        Reply::Error(ApiError::Unavailable(m)) => assert!(m.contains("shutting down"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The issued steps 0 and 1 commit.
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(8));
    s.on_event(Event::Report(report(a, 1, 0, 1, 8)), ms(9));
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Draining);
    s.on_event(Event::Report(report(b, 1, 1, 1, 8)), ms(10));
    assert_eq!(s.committed(), 2);
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Writing { step: 2 });
    // The first worker holding both steps writes step-2; the other just stops.
    match ask(&mut s, b, 1, 2, 2, 11) {
        Assignment::Stop {
            success,
            reason,
            checkpoint_step,
            resumable,
        } => {
            assert!(!success);
            assert!(
                resumable,
                "a shutdown is not the job's end: workers exit 75"
            );
            assert_eq!(reason, "cancelled: SIGTERM");
            assert_eq!(checkpoint_step, Some(2));
        }
        other => panic!("{other:?}"),
    }
    match ask(&mut s, a, 1, 2, 2, 11) {
        Assignment::Stop {
            checkpoint_step, ..
        } => assert_eq!(checkpoint_step, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Writing { step: 2 });
    assert!(s.is_done(Duration::ZERO));
    s.on_event(Event::Leave(b, "checkpoint written".into()), ms(20));
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Written { step: 2 });
    assert_eq!(s.committed(), 2);
}

#[test]
fn shutdown_needs_no_checkpoint_when_rank_0_reported_one_of_the_last_step() {
    let (mut s, config) = scheduler(10, 2, 3, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    let mut with_checkpoint = report(a, 1, 0, 0, 7);
    with_checkpoint.checkpoint_dir = Some(PathBuf::from("/out/checkpoints/step-00000001"));
    s.on_event(Event::Report(with_checkpoint), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5));
    s.on_event(Event::Shutdown("SIGTERM".into()), ms(6));
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Nothing);
    match ask(&mut s, a, 1, 1, 1, 7) {
        Assignment::Stop {
            checkpoint_step, ..
        } => assert_eq!(checkpoint_step, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutdown_with_nobody_holding_the_committed_step_gives_up_on_the_checkpoint() {
    let (mut s, config) = scheduler(10, 2, 3, settings(2));
    let (a, b) = formed_pair(&mut s, &config);
    ask(&mut s, a, 1, 0, 0, 4);
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5));
    s.on_event(Event::Shutdown("SIGTERM".into()), ms(6));
    // Both claim to hold another step than the committed one (a bug or a race):
    // neither may write `step-1`.
    ask(&mut s, a, 1, 0, 0, 7);
    ask(&mut s, b, 1, 0, 0, 7);
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Unavailable { step: 1 });
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Let worker i take its next action.
    Act(usize),
    /// Time passes (ms); live workers heartbeat, then a tick.
    Advance(u64),
    /// Worker i crashes (stops talking).
    Kill(usize),
    /// Worker i leaves politely.
    Leave(usize),
    /// A new worker starts.
    Spawn,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0usize..8).prop_map(Op::Act),
        4 => (50u64..400).prop_map(Op::Advance),
        1 => (0usize..8).prop_map(Op::Kill),
        1 => (0usize..8).prop_map(Op::Leave),
        1 => Just(Op::Spawn),
    ]
}

struct Sim {
    s: Scheduler,
    config: Config,
    now: u64,
    workers: Vec<SimWorker>,
    /// (generation, step) -> ranks arrived.
    barriers: BTreeMap<(u64, u64), BTreeSet<u32>>,
    /// generation -> members (sim indices) in rank order.
    members: BTreeMap<u64, Vec<usize>>,
    ledger: Vec<Action>,
    expected: usize,
}

impl Sim {
    fn feed(&mut self, event: Event) -> Option<Reply> {
        let actions = self.s.on_event(event, ms(self.now));
        let mut reply = None;
        for action in actions {
            match action {
                Action::Reply(r) => reply = Some(r),
                Action::Commit(_) | Action::Rollback { .. } => self.ledger.push(action),
                Action::Wake | Action::Checkpoint { .. } => {}
            }
        }
        reply
    }

    fn live(&self, i: usize) -> bool {
        let w = &self.workers[i];
        !w.dead && !w.left && !w.stopped
    }

    fn act(&mut self, i: usize) {
        if i >= self.workers.len() || !self.live(i) {
            return;
        }
        let Some(id) = self.workers[i].id else {
            let registration = registration(&self.config, &format!("w{i}"));
            match self.feed(Event::Register(registration)) {
                Some(Reply::Registered(r)) => self.workers[i].id = Some(r.worker_id),
                _ => self.workers[i].stopped = true, // the job is over
            }
            return;
        };
        // Report applied steps first.
        if let Some(step) = self.workers[i].unreported.first().copied() {
            self.workers[i].unreported.remove(0);
            let w = &self.workers[i];
            let checksum = 1000 + step; // identical parameters on every rank
            let r = report(id, w.generation, w.rank, step, checksum);
            if let Some(Reply::Error(ApiError::UnknownWorker(_))) = self.feed(Event::Report(r)) {
                self.forget(i);
            }
            return;
        }
        // Waiting in an all-reduce: it completes when every rank arrived; a dead
        // rank makes it fail (sometimes reported at once, sometimes not).
        if let Some((generation, step)) = self.workers[i].arrived {
            let world = self.members[&generation].len();
            if self.barriers[&(generation, step)].len() == world {
                let w = &mut self.workers[i];
                w.arrived = None;
                w.next_step = step + 1;
                w.unreported.push(step);
                w.queue.retain(|t| t.step > step);
                return;
            }
            // A rank that never joined is usize::MAX; a peer's crash shows at once,
            // a regroup by the coordinator through the heartbeat (collective timeout).
            let peer_dead = self.members[&generation].iter().any(|&m| {
                m != usize::MAX
                    && (self.workers[m].dead
                        || self.workers[m].left
                        || self.workers[m].id.is_none())
            });
            let moved_on = match self.feed(Event::Heartbeat(id)) {
                Some(Reply::Heartbeat(h)) => {
                    h.generation != generation || h.state != JobState::Running
                }
                _ => true,
            };
            if peer_dead || moved_on {
                let w = &mut self.workers[i];
                w.arrived = None;
                w.queue.clear();
                let error = (step % 2 == 0).then(|| "peer closed the connection".to_owned());
                self.request(i, id, error);
            }
            return;
        }
        // Train the first held step.
        if let Some(train) = self.workers[i].queue.first().cloned()
            && train.step == self.workers[i].next_step
            && train.generation == self.workers[i].generation
        {
            let rank = self.workers[i].rank;
            self.barriers
                .entry((train.generation, train.step))
                .or_default()
                .insert(rank);
            self.workers[i].arrived = Some((train.generation, train.step));
            return;
        }
        self.request(i, id, None);
    }

    fn forget(&mut self, i: usize) {
        let w = &mut self.workers[i];
        // Re-register as a fresh process would (its model state is lost).
        *w = SimWorker::default();
    }

    fn request(&mut self, i: usize, id: WorkerId, group_error: Option<String>) {
        let w = &self.workers[i];
        let want = w.next_step + w.queue.len() as u64;
        if w.queue.len() >= 2 {
            return;
        }
        let request = AssignmentRequest {
            worker_id: id,
            generation: w.generation,
            next_step: w.next_step,
            want_step: want,
            group_error,
            held: Vec::new(),
        };
        match self.feed(Event::Assignment(request)) {
            Some(Reply::Assignment(Assignment::Group(g))) => {
                let members = self.members.entry(g.generation).or_default();
                if members.len() <= g.rank as usize {
                    members.resize(g.rank as usize + 1, usize::MAX);
                }
                members[g.rank as usize] = i;
                let w = &mut self.workers[i];
                w.generation = g.generation;
                w.rank = g.rank;
                // The broadcast gives every rank the root's state.
                w.next_step = g.start_step;
                w.queue.clear();
                w.arrived = None;
                w.unreported.clear();
                if g.store == StoreRole::Host {
                    self.feed(Event::PublishStore(StorePublication {
                        worker_id: id,
                        generation: g.generation,
                        port: 1,
                    }));
                }
            }
            Some(Reply::Assignment(Assignment::Train(t))) => {
                assert_eq!(t.step, want, "a train for the wanted step");
                self.workers[i].queue.push(t);
            }
            Some(Reply::Assignment(Assignment::Stop {
                success, reason, ..
            })) => {
                assert!(success, "{reason}");
                self.workers[i].stopped = true;
            }
            Some(Reply::Assignment(Assignment::Wait { .. })) => {}
            Some(Reply::Error(ApiError::UnknownWorker(_))) => self.forget(i),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Act(i) => self.act(i),
            Op::Advance(dt) => {
                self.now += dt;
                for i in 0..self.workers.len() {
                    if self.live(i)
                        && let Some(id) = self.workers[i].id
                        && let Some(Reply::Error(_)) = self.feed(Event::Heartbeat(id))
                    {
                        self.forget(i);
                    }
                }
                self.feed(Event::Tick);
            }
            Op::Kill(i) => {
                if i < self.workers.len() {
                    self.workers[i].dead = true;
                }
            }
            Op::Leave(i) => {
                if i < self.workers.len() && self.live(i) {
                    if let Some(id) = self.workers[i].id {
                        self.feed(Event::Leave(id, "scaled down".into()));
                    }
                    self.workers[i].left = true;
                }
            }
            Op::Spawn => {
                if self.workers.len() < 8 {
                    self.workers.push(SimWorker::default());
                }
            }
        }
    }

    /// Runs without faults until the job ends (bounded); spawns a worker if none is
    /// left alive.
    fn finish(&mut self) {
        for round in 0..4000 {
            if matches!(self.s.state(), JobState::Finished | JobState::Failed) {
                return;
            }
            // The first generation needs the expected number of workers: start more.
            while (0..self.workers.len()).filter(|&i| self.live(i)).count() < self.expected {
                self.workers.push(SimWorker::default());
            }
            for i in 0..self.workers.len() {
                self.act(i);
            }
            if round % 4 == 3 {
                self.apply(Op::Advance(300));
            }
        }
        panic!(
            "the job did not finish: state {:?}, committed {}/{}",
            self.s.state(),
            self.s.committed(),
            self.s.plan().total_steps
        );
    }
}

/// The ledger after rollbacks, checking that between rollbacks every step is
/// committed once, in order.
fn effective_ledger(actions: &[Action]) -> Vec<LedgerEntry> {
    let mut entries: Vec<LedgerEntry> = Vec::new();
    for action in actions {
        match action {
            Action::Commit(entry) => {
                assert_eq!(
                    entry.step,
                    entries.len() as u64,
                    "steps commit once, in order"
                );
                entries.push(entry.clone());
            }
            Action::Rollback { to_step, .. } => entries.truncate(*to_step as usize),
            _ => {}
        }
    }
    entries
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_patient_once_per_epoch_whatever_happens_to_membership(
        patients in 3usize..20,
        batch in 1usize..7,
        epochs in 1usize..3,
        start in 1usize..4,
        ops in proptest::collection::vec(op(), 0..250),
    ) {
        let mut cluster = settings(start);
        cluster.min_workers = 1;
        let (s, config) = scheduler(patients, batch, epochs, cluster);
        let mut sim = Sim {
            s,
            config,
            now: 0,
            workers: vec![SimWorker::default(); start],
            barriers: BTreeMap::new(),
            members: BTreeMap::new(),
            ledger: Vec::new(),
            expected: start,
        };
        for op in ops {
            sim.apply(op);
        }
        sim.finish();
        prop_assert_eq!(sim.s.state(), JobState::Finished, "{:?}", sim.s.failure());
        let plan = sim.s.plan().clone();
        let ledger = effective_ledger(&sim.ledger);
        prop_assert_eq!(ledger.len() as u64, plan.total_steps);
        let mut by_epoch: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for entry in &ledger {
            let step_plan = plan.plan(entry.step);
            prop_assert_eq!(entry.epoch, step_plan.epoch);
            let sizes: Vec<usize> = entry.ranks.iter().map(|r| r.patients.len()).collect();
            prop_assert_eq!(sizes.iter().sum::<usize>(), step_plan.patients.len());
            prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1), "{:?}", sizes);
            let consumed: Vec<usize> = entry.ranks.iter().flat_map(|r| r.patients.clone()).collect();
            let planned: Vec<usize> = step_plan.patients.iter().map(|p| p.patient).collect();
            prop_assert_eq!(&consumed, &planned);
            by_epoch.entry(entry.epoch).or_default().extend(consumed);
        }
        for (epoch, consumed) in by_epoch {
            prop_assert_eq!(consumed, epoch_order(&plan.balanced, plan.seed, epoch));
        }
    }
}

/// Trains the whole job with the formed pair `a` (rank 0), `b`; rank 0's report of
/// the last step names the final checkpoint when `final_checkpoint`. Returns the
/// number of steps.
fn train_to_the_end(
    s: &mut Scheduler,
    (a, b): (WorkerId, WorkerId),
    final_checkpoint: bool,
) -> u64 {
    let total = s.plan().total_steps;
    for step in 0..total {
        for w in [a, b] {
            assert!(matches!(ask(s, w, 1, step, step, 4), Assignment::Train(_)));
        }
        let mut first = report(a, 1, 0, step, 7);
        if step + 1 == total {
            first.checkpoint_dir = final_checkpoint
                .then(|| PathBuf::from(format!("/out/checkpoints/step-{total:08}")));
        }
        s.on_event(Event::Report(first), ms(5));
        s.on_event(Event::Report(report(b, 1, 1, step, 7)), ms(5));
    }
    assert_eq!(s.committed(), total);
    assert_eq!(s.state(), JobState::Finished);
    total
}

#[test]
fn a_job_that_ends_without_its_final_checkpoint_has_a_holder_write_it() {
    // Rank 0 died after the last all-reduce (its report, naming the final
    // checkpoint, never came): the first worker holding the last step writes it.
    let (mut s, config) = scheduler(4, 2, 1, settings(2));
    let pair = formed_pair(&mut s, &config);
    let total = train_to_the_end(&mut s, pair, false);
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Writing { step: total });
    match ask(&mut s, pair.1, 1, total, total, 6) {
        Assignment::Stop {
            success,
            checkpoint_step,
            ..
        } => {
            assert!(success, "the job itself succeeded");
            assert_eq!(checkpoint_step, Some(total));
        }
        other => panic!("{other:?}"),
    }
    match ask(&mut s, pair.0, 1, total, total, 6) {
        Assignment::Stop {
            checkpoint_step, ..
        } => assert_eq!(checkpoint_step, None, "one writer is enough"),
        other => panic!("{other:?}"),
    }
    s.on_event(Event::Leave(pair.1, "checkpoint written".into()), ms(7));
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Written { step: total });
}

#[test]
fn a_job_whose_rank_0_reported_the_final_checkpoint_asks_for_none() {
    let (mut s, config) = scheduler(4, 2, 1, settings(2));
    let pair = formed_pair(&mut s, &config);
    let total = train_to_the_end(&mut s, pair, true);
    assert_eq!(s.checkpoint_wait(), CheckpointWait::Nothing);
    match ask(&mut s, pair.1, 1, total, total, 6) {
        Assignment::Stop {
            checkpoint_step, ..
        } => assert_eq!(checkpoint_step, None),
        other => panic!("{other:?}"),
    }
}

/// `hsat_job_state` follows the job: forming, training, paused below
/// `min_workers`, finishing on a shutdown; `hsat_workers_alive` counts the live.
#[test]
fn the_metrics_view_names_each_phase_and_counts_live_workers() {
    let mut cluster = settings(2);
    cluster.min_workers = 2;
    let (mut s, config) = scheduler(10, 2, 3, cluster);
    let view = s.metrics_view(ms(0));
    assert_eq!(
        (view.phase, view.workers_alive, view.generation),
        (JobPhase::Forming, 0, 0)
    );
    let (a, b) = formed_pair(&mut s, &config);
    let view = s.metrics_view(ms(5));
    assert_eq!((view.phase, view.workers_alive), (JobPhase::Training, 2));
    assert_eq!(view.generation, 1);
    ask(&mut s, a, 1, 0, 0, 4);
    ask(&mut s, b, 1, 0, 0, 4);
    s.on_event(Event::Report(report(a, 1, 0, 0, 7)), ms(5));
    s.on_event(Event::Report(report(b, 1, 1, 0, 7)), ms(5));
    assert_eq!(s.metrics_view(ms(5)).committed, 1);
    s.on_event(Event::Leave(b, "preempted".into()), ms(10));
    for t in (100..=3000).step_by(100) {
        s.on_event(Event::Heartbeat(a), ms(t));
        s.on_event(Event::Tick, ms(t));
    }
    let view = s.metrics_view(ms(3000));
    assert_eq!((view.phase, view.workers_alive), (JobPhase::Paused, 1));
    s.on_event(Event::Shutdown("SIGTERM".into()), ms(3010));
    assert_eq!(s.metrics_view(ms(3010)).phase, JobPhase::Finishing);
    // A worker silent for longer than 3 heartbeats is not counted as alive.
    assert_eq!(s.metrics_view(ms(4000)).workers_alive, 0);
}
