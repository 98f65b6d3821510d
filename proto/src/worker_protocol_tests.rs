//! Every transition of [`WorkerProtocol`], including the protocol errors the real
//! worker checks.

use super::*;
use crate::domain::StoreRole;

const ID: WorkerId = WorkerId(7);

fn registration() -> Registration {
    Registration {
        worker_name: "w".into(),
        config: serde_json::json!({}),
        dataset_fingerprint: "f".into(),
        advertise_host: "127.0.0.1".into(),
        hsat_version: "0".into(),
    }
}

fn group(generation: u64, start_step: u64, total_steps: u64) -> GroupAssignment {
    GroupAssignment {
        generation,
        rank: 1,
        world_size: 2,
        store: StoreRole::Host,
        broadcast_root: 0,
        start_step,
        total_steps,
        steps_per_epoch: 4,
        resume_checkpoint: None,
    }
}

fn train(generation: u64, step: u64) -> TrainAssignment {
    TrainAssignment {
        generation,
        step,
        epoch: 0,
        global_patients: 4,
        shard: Vec::new(),
        total_steps: 10,
    }
}

fn wait() -> Assignment {
    Assignment::Wait {
        retry: Duration::from_secs(5),
        reason: "w".into(),
    }
}

fn ask(protocol: &WorkerProtocol) -> AssignmentRequest {
    match protocol.next_action() {
        Action::Ask(request) => request,
        other => panic!("expected Ask, got {other:?}"),
    }
}

fn registered() -> WorkerProtocol {
    let mut p = WorkerProtocol::new(registration());
    assert_eq!(p.next_action(), Action::Register(registration()));
    p.on_event(Event::Registered(Registered {
        worker_id: ID,
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(10),
    }))
    .unwrap();
    p
}

/// Registered and a formed member of generation 1 starting at `start`.
fn member(start: u64, total: u64) -> WorkerProtocol {
    let mut p = registered();
    p.on_event(Event::Assigned(Assignment::Group(group(1, start, total))))
        .unwrap();
    assert_eq!(p.next_action(), Action::FormGroup(group(1, start, total)));
    p.on_event(Event::GroupFormed { generation: 1 }).unwrap();
    p
}

#[test]
fn registers_first_then_asks_with_its_id_and_no_generation() {
    let p = registered();
    assert_eq!(p.worker_id(), Some(ID));
    assert_eq!(
        ask(&p),
        AssignmentRequest {
            worker_id: ID,
            generation: 0,
            next_step: 0,
            want_step: 0,
            group_error: None,
            held: Vec::new(),
        }
    );
}

#[test]
fn a_formed_group_sets_the_position_and_the_generation_of_requests() {
    let p = member(3, 10);
    assert_eq!(p.next_step(), 3);
    assert_eq!(p.generations(), 1);
    let request = ask(&p);
    assert_eq!(
        (request.generation, request.next_step, request.want_step),
        (1, 3, 3)
    );
}

#[test]
fn holds_two_steps_ahead_then_trains_reports_and_asks_for_the_next() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    // One held: prefetch the next.
    assert_eq!(ask(&p).want_step, 1);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 1))))
        .unwrap();
    assert_eq!(p.queued(), LOOKAHEAD);
    assert_eq!(p.next_action(), Action::Train(train(1, 0)));
    p.on_event(Event::Trained(StepOutcome {
        local_patients: 2,
        param_checksum: 9,
        ..StepOutcome::default()
    }))
    .unwrap();
    let Action::Report(report) = p.next_action() else {
        panic!("expected a report, got {:?}", p.next_action())
    };
    assert_eq!(
        (
            report.worker_id,
            report.generation,
            report.step,
            report.rank,
            report.local_patients,
            report.param_checksum
        ),
        (ID, 1, 0, 1, 2, 9)
    );
    p.on_event(Event::Reported).unwrap();
    assert_eq!(p.next_step(), 1);
    assert_eq!(p.steps_trained(), 1);
    let request = ask(&p);
    assert_eq!((request.next_step, request.want_step), (1, 2));
}

#[test]
fn a_wait_with_nothing_queued_sleeps_at_most_a_second() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(wait())).unwrap();
    assert_eq!(p.next_action(), Action::Sleep(MAX_WAIT));
    p.on_event(Event::Slept).unwrap();
    assert_eq!(ask(&p).want_step, 0);
    p.on_event(Event::Assigned(Assignment::Wait {
        retry: Duration::from_millis(20),
        reason: "w".into(),
    }))
    .unwrap();
    assert_eq!(p.next_action(), Action::Sleep(Duration::from_millis(20)));
}

#[test]
fn a_wait_with_a_step_queued_trains_it_before_asking_again() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    p.on_event(Event::Assigned(wait())).unwrap();
    assert_eq!(p.next_action(), Action::Train(train(1, 0)));
    p.on_event(Event::Trained(StepOutcome::default())).unwrap();
    p.on_event(Event::Reported).unwrap();
    assert_eq!(ask(&p).want_step, 1);
}

#[test]
fn past_the_last_step_it_does_not_prefetch() {
    let mut p = member(8, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 8))))
        .unwrap();
    assert_eq!(ask(&p).want_step, 9, "step 9 exists: prefetch it");
    p.on_event(Event::Assigned(Assignment::Train(train(1, 9))))
        .unwrap();
    p.on_event(Event::Trained(StepOutcome::default())).unwrap();
    p.on_event(Event::Reported).unwrap();
    // Step 9 is held and is the last: train it rather than ask for step 10.
    assert_eq!(p.next_action(), Action::Train(train(1, 9)));
    p.on_event(Event::Trained(StepOutcome::default())).unwrap();
    p.on_event(Event::Reported).unwrap();
    // Nothing held: ask (the coordinator answers Stop or Wait).
    assert_eq!(ask(&p).want_step, 10);
}

#[test]
fn a_failed_rendezvous_is_told_to_the_coordinator_once_with_its_generation() {
    let mut p = registered();
    p.on_event(Event::Assigned(Assignment::Group(group(4, 0, 10))))
        .unwrap();
    p.on_event(Event::GroupFailed {
        generation: 4,
        error: "peer gone".into(),
    })
    .unwrap();
    assert!(p.group().is_none());
    let request = ask(&p);
    assert_eq!(
        (request.generation, request.group_error.as_deref()),
        (4, Some("peer gone"))
    );
    // Asking again (a retried RPC) still carries it; the answer clears it.
    assert_eq!(ask(&p), request);
    p.on_event(Event::Assigned(wait())).unwrap();
    p.on_event(Event::Slept).unwrap();
    let request = ask(&p);
    assert_eq!((request.generation, request.group_error), (0, None));
}

#[test]
fn a_failed_collective_drops_the_group_and_its_queue_and_keeps_the_position() {
    let mut p = member(5, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 5))))
        .unwrap();
    p.on_event(Event::Assigned(Assignment::Train(train(1, 6))))
        .unwrap();
    p.on_event(Event::CollectiveFailed {
        error: "connection closed by peer".into(),
    })
    .unwrap();
    assert_eq!((p.queued(), p.next_step(), p.steps_trained()), (0, 5, 0));
    assert!(p.group().is_none());
    let request = ask(&p);
    assert_eq!(
        (
            request.generation,
            request.next_step,
            request.want_step,
            request.group_error.as_deref()
        ),
        (1, 5, 5, Some("connection closed by peer"))
    );
}

#[test]
fn a_new_group_drops_the_queued_steps_of_the_old_one() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    p.on_event(Event::Assigned(Assignment::Group(group(2, 0, 10))))
        .unwrap();
    assert_eq!(p.queued(), 0);
    assert!(p.group().is_none(), "the old collective is left first");
    p.on_event(Event::GroupFormed { generation: 2 }).unwrap();
    assert_eq!(p.generations(), 2);
    assert_eq!(ask(&p).generation, 2);
}

#[test]
fn stop_is_final_and_says_whether_the_job_finished() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Stop {
        success: false,
        reason: "job failed: x".into(),
        checkpoint_step: None,
        resumable: false,
    }))
    .unwrap();
    assert_eq!(
        p.next_action(),
        Action::Stop {
            success: false,
            reason: "job failed: x".into(),
            checkpoint_step: None,
            resumable: false,
        }
    );
    let err = p.on_event(Event::Assigned(wait())).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::UnexpectedEvent {
            event: "Assigned",
            expected: "nothing (stopped)"
        }
    );
}

#[test]
fn a_train_before_any_group_is_a_protocol_error() {
    let mut p = registered();
    let err = p
        .on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap_err();
    assert_eq!(err, ProtocolError::TrainBeforeGroup { step: 0 });
    assert!(err.to_string().contains("before any group"), "{err}");
}

#[test]
fn a_train_for_the_wrong_step_is_a_protocol_error() {
    let mut p = member(0, 10);
    let err = p
        .on_event(Event::Assigned(Assignment::Train(train(1, 1))))
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::UnexpectedStep {
            step: 1,
            generation: 1,
            expected_step: 0,
            expected_generation: 1
        }
    );
}

#[test]
fn a_train_for_the_wrong_generation_is_a_protocol_error() {
    let mut p = member(0, 10);
    let err = p
        .on_event(Event::Assigned(Assignment::Train(train(2, 0))))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the coordinator sent step 0 of generation 2, expected step 0 of generation 1: a protocol error"
    );
}

#[test]
fn events_the_protocol_did_not_ask_for_are_driver_bugs() {
    let mut p = registered();
    assert_eq!(
        p.on_event(Event::Trained(StepOutcome::default()))
            .unwrap_err(),
        ProtocolError::UnexpectedEvent {
            event: "Trained",
            expected: "Assigned"
        }
    );
    p.on_event(Event::Assigned(Assignment::Group(group(3, 0, 10))))
        .unwrap();
    // The outcome of another generation's rendezvous.
    assert_eq!(
        p.on_event(Event::GroupFormed { generation: 2 })
            .unwrap_err(),
        ProtocolError::UnexpectedEvent {
            event: "GroupFormed",
            expected: "GroupFormed or GroupFailed of its generation"
        }
    );
    // Still forming generation 3.
    assert_eq!(p.next_action(), Action::FormGroup(group(3, 0, 10)));
}

#[test]
fn a_stop_asks_for_a_checkpoint_only_from_a_model_holding_that_step() {
    // The coordinator shuts down with 4 steps committed: a worker holding 4 steps
    // writes `step-4`; one holding 3 (it missed a step) must not write a checkpoint
    // that claims 4.
    let stop = |step| {
        Event::Assigned(Assignment::Stop {
            success: false,
            reason: "cancelled".into(),
            checkpoint_step: Some(step),
            resumable: true,
        })
    };
    let mut holds_four = member(4, 10);
    holds_four.on_event(stop(4)).unwrap();
    assert_eq!(
        holds_four.next_action(),
        Action::Stop {
            success: false,
            reason: "cancelled".into(),
            checkpoint_step: Some(4),
            resumable: true,
        }
    );
    let mut holds_three = member(3, 10);
    holds_three.on_event(stop(4)).unwrap();
    assert!(
        matches!(
            holds_three.next_action(),
            Action::Stop {
                checkpoint_step: None,
                ..
            }
        ),
        "{:?}",
        holds_three.next_action()
    );
}

/// Trains and reports the front step with checksum `checksum` (a `Wait` first,
/// so the worker trains instead of prefetching).
fn train_and_report(p: &mut WorkerProtocol, checksum: u64) {
    if matches!(p.next_action(), Action::Ask(_)) {
        p.on_event(Event::Assigned(wait())).unwrap();
    }
    p.on_event(Event::Trained(StepOutcome {
        param_checksum: checksum,
        ..StepOutcome::default()
    }))
    .unwrap();
    p.on_event(Event::Reported).unwrap();
}

#[test]
fn requests_carry_the_last_trained_steps_with_generation_rank_and_checksum() {
    let mut p = member(0, 10);
    for step in 0..(HELD_HISTORY as u64 + 2) {
        p.on_event(Event::Assigned(Assignment::Train(train(1, step))))
            .unwrap();
        train_and_report(&mut p, 100 + step);
    }
    let held = ask(&p).held;
    assert_eq!(held.len(), HELD_HISTORY, "only the newest are kept");
    let last = held.last().unwrap();
    assert_eq!(
        (
            last.step,
            last.generation,
            last.world_size,
            last.rank,
            last.checksum
        ),
        (5, 1, 2, 1, 105)
    );
    assert_eq!(held.first().unwrap().step, 2);
}

#[test]
fn forgotten_reregisters_keeping_the_model_and_dropping_the_group() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    train_and_report(&mut p, 42);
    // Step 1 queued when the coordinator restarts.
    p.on_event(Event::Assigned(Assignment::Train(train(1, 1))))
        .unwrap();
    p.on_event(Event::Forgotten).unwrap();
    assert_eq!(p.next_action(), Action::Register(registration()));
    assert_eq!(p.group(), None);
    assert_eq!(p.queued(), 0);
    assert_eq!(p.worker_id(), None);
    p.on_event(Event::Registered(Registered {
        worker_id: WorkerId(1 << 32 | 1),
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(10),
    }))
    .unwrap();
    assert_eq!(p.registrations(), 2);
    let request = ask(&p);
    assert_eq!(
        (request.generation, request.next_step, request.want_step),
        (0, 1, 1),
        "it checks in with the step its model holds, in no generation"
    );
    assert_eq!(
        request.held.last().map(|h| (h.step, h.checksum)),
        Some((0, 42))
    );
}

#[test]
fn forgotten_while_reporting_keeps_the_trained_step() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    p.on_event(Event::Assigned(wait())).unwrap();
    p.on_event(Event::Trained(StepOutcome {
        param_checksum: 7,
        ..StepOutcome::default()
    }))
    .unwrap();
    assert!(matches!(p.next_action(), Action::Report(_)));
    p.on_event(Event::Forgotten).unwrap();
    assert_eq!(p.next_step(), 1);
    assert_eq!(p.held().map(|h| h.checksum).collect::<Vec<_>>(), [7]);
    assert!(matches!(p.next_action(), Action::Register(_)));
}

#[test]
fn a_group_starting_elsewhere_forgets_the_held_steps() {
    let mut p = member(0, 10);
    p.on_event(Event::Assigned(Assignment::Train(train(1, 0))))
        .unwrap();
    train_and_report(&mut p, 5);
    // Same position: the broadcast state is the one it trained, keep its record.
    p.on_event(Event::Assigned(Assignment::Group(group(2, 1, 10))))
        .unwrap();
    p.on_event(Event::GroupFormed { generation: 2 }).unwrap();
    assert_eq!(p.held().count(), 1);
    // Another position: the model is someone else's state now.
    p.on_event(Event::Assigned(Assignment::Group(group(3, 4, 10))))
        .unwrap();
    p.on_event(Event::GroupFormed { generation: 3 }).unwrap();
    assert_eq!(p.held().count(), 0);
    assert_eq!(p.next_step(), 4);
}

#[test]
fn a_stopped_worker_cannot_be_forgotten() {
    let mut p = registered();
    p.on_event(Event::Assigned(Assignment::Stop {
        success: true,
        reason: "done".into(),
        checkpoint_step: None,
        resumable: false,
    }))
    .unwrap();
    let err = p.on_event(Event::Forgotten).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::UnexpectedEvent {
                event: "Forgotten",
                ..
            }
        ),
        "{err}"
    );
}
