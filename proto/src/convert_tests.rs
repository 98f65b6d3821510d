//! Property tests of the wire <-> domain conversion (`convert`): every message the
//! server or the client converts is fed (a) arbitrary bytes, decoded with prost, and
//! (b) structured wire values with hostile fields (zeros, extremes, NaN, empty text).
//! The properties:
//!
//! - conversion never panics;
//! - a rejection is `ApiError::InvalidArgument` whose message names one of the
//!   message's fields (so the sender knows what to fix);
//! - what is accepted is a fixed point: domain -> wire -> domain gives it back;
//! - valid domain values (generated within the invariants written on the domain
//!   types) round-trip domain -> wire -> domain unchanged.
//!
//! Each run is a few hundred cases per message (well under a second each), so the
//! suite runs in CI as ordinary tests. Adding a field to a message: extend its
//! `wire_*` generator (the `..Default::default()` keeps it compiling meanwhile),
//! its domain generator, and the field list in [`fields`] if the field can be
//! rejected.

// The wire generators end with `..Default::default()` on purpose: a field added to
// a message keeps them compiling (at its default) until the generator covers it.
#![allow(clippy::needless_update)]

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use prost::Message;

use crate::ApiError;
use crate::convert::StorePublication;
use crate::domain::*;
use crate::pb;

/// Cases per property: a few hundred keep the whole file well under a minute.
fn config() -> ProptestConfig {
    // `PROPTEST_CASES=100000` hunts deeper by hand; CI keeps the default.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(300);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Field names (as in `hsat.proto`) a rejection of `message` may name.
fn fields(message: &str) -> &'static [&'static str] {
    match message {
        "RegisterRequest" => &["config_json", "advertise_host"],
        "RegisterResponse" => &["worker_id", "heartbeat_ms", "lease_ms"],
        "HeartbeatRequest" | "LeaveRequest" => &["worker_id"],
        "HeartbeatResponse" => &["state"],
        "AssignmentRequest" => &["worker_id", "want_step", "next_step", "held"],
        "Assignment" => &[
            "kind",
            "rank",
            "world_size",
            "broadcast_root",
            "generation",
            "store_port",
            "store_host",
            "global_patients",
            "shard",
            "patient",
            "label",
            "slot",
            "slide",
            "patch",
        ],
        "PublishStoreRequest" => &["worker_id", "port"],
        "StepReport" => &[
            "worker_id",
            "generation",
            "step_seconds",
            "data_wait_seconds",
        ],
        "JobStatus" => &["state", "worker_id"],
        other => panic!("no field list for {other}"),
    }
}

/// The conversion of `message` either succeeded or failed with `InvalidArgument`
/// naming one of its fields.
fn check_rejection<T: Debug>(message: &str, result: &Result<T, ApiError>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(ApiError::InvalidArgument(text)) => {
            if fields(message).iter().any(|field| text.contains(field)) {
                Ok(())
            } else {
                Err(format!(
                    "{message}: rejection `{text}` names none of {:?}",
                    fields(message)
                ))
            }
        }
        Err(other) => Err(format!(
            "{message}: rejected with {other:?}, expected InvalidArgument"
        )),
    }
}

/// Debug text, so values holding NaN losses compare equal to themselves.
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

// ---- wire-side conversions that the crate does inline (mirrors of client.rs) ----

fn heartbeat_request(worker: WorkerId) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        worker_id: worker.0,
    }
}

fn publish_store_request(p: StorePublication) -> pb::PublishStoreRequest {
    pb::PublishStoreRequest {
        worker_id: p.worker_id.0,
        generation: p.generation,
        port: u32::from(p.port),
    }
}

fn leave_request((worker, reason): (WorkerId, String)) -> pb::LeaveRequest {
    pb::LeaveRequest {
        worker_id: worker.0,
        reason,
    }
}

// ---- generic properties ----

/// Decodes `bytes` as `W`; when that works, converts it and checks the rejection
/// rule and the fixed point.
fn bytes_property<W, D>(
    message: &str,
    bytes: &[u8],
    back: impl Fn(D) -> W,
) -> Result<(), TestCaseError>
where
    W: Message + Default + Clone,
    D: TryFrom<W, Error = ApiError> + Debug + Clone,
{
    let Ok(wire) = W::decode(bytes) else {
        return Ok(()); // not a message: prost refuses it before any conversion
    };
    wire_property(message, wire, back)
}

/// Converts `wire`: a rejection names a field; an accepted value is a fixed point
/// of domain -> wire -> domain.
fn wire_property<W, D>(message: &str, wire: W, back: impl Fn(D) -> W) -> Result<(), TestCaseError>
where
    D: TryFrom<W, Error = ApiError> + Debug + Clone,
{
    let result = D::try_from(wire);
    check_rejection(message, &result).map_err(TestCaseError::fail)?;
    if let Ok(domain) = result {
        let again = D::try_from(back(domain.clone()));
        match again {
            Ok(again) => prop_assert!(
                same(&domain, &again),
                "{message}: {domain:?} came back as {again:?}"
            ),
            Err(err) => prop_assert!(false, "{message}: {domain:?} was accepted, then {err}"),
        }
    }
    Ok(())
}

/// A valid domain value comes back unchanged from domain -> wire -> domain.
fn round_trip<W, D>(message: &str, domain: D, to_wire: impl Fn(D) -> W) -> Result<(), TestCaseError>
where
    D: TryFrom<W, Error = ApiError> + Debug + Clone,
{
    match D::try_from(to_wire(domain.clone())) {
        Ok(back) => prop_assert!(same(&domain, &back), "{message}: {domain:?} -> {back:?}"),
        Err(err) => prop_assert!(false, "{message}: valid {domain:?} was refused: {err}"),
    }
    Ok(())
}

// ---- value generators ----

/// Integers that find edge cases: zero, one, small, around u32, the maximum.
fn edgy_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1u64),
        0u64..100,
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
    .boxed()
}

fn edgy_u32() -> BoxedStrategy<u32> {
    prop_oneof![
        Just(0u32),
        Just(1u32),
        0u32..8,
        Just(65535),
        Just(65536),
        Just(u32::MAX),
        any::<u32>()
    ]
    .boxed()
}

fn edgy_f64() -> BoxedStrategy<f64> {
    prop_oneof![
        Just(0.0),
        Just(-0.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        0.0f64..1000.0,
        any::<f64>(),
    ]
    .boxed()
}

fn edgy_text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_owned()),
        Just("\t\n".to_owned()),
        "[a-z0-9.-]{1,12}",
        any::<String>(),
    ]
    .boxed()
}

fn edgy_json() -> BoxedStrategy<String> {
    prop_oneof![
        Just("{}".to_owned()),
        Just("[1]".to_owned()),
        Just("null".to_owned()),
        Just(String::new()),
        Just("{\"training\":{\"batch_size\":4}}".to_owned()),
        Just("[".repeat(200)),
        any::<String>(),
    ]
    .boxed()
}

fn wire_level_losses() -> BoxedStrategy<pb::LevelLosses> {
    (edgy_f64(), edgy_f64(), edgy_f64(), edgy_f64())
        .prop_map(|(patient, slide, patch, total)| pb::LevelLosses {
            patient,
            slide,
            patch,
            total,
        })
        .boxed()
}

// ---- wire generators (hostile values; new fields: add them here) ----

fn wire_register_request() -> BoxedStrategy<pb::RegisterRequest> {
    (
        edgy_text(),
        edgy_json(),
        edgy_text(),
        edgy_text(),
        edgy_text(),
    )
        .prop_map(
            |(worker_name, config_json, dataset_fingerprint, advertise_host, hsat_version)| {
                pb::RegisterRequest {
                    worker_name,
                    config_json,
                    dataset_fingerprint,
                    advertise_host,
                    hsat_version,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

fn wire_register_response() -> BoxedStrategy<pb::RegisterResponse> {
    (edgy_u64(), edgy_u64(), edgy_u64())
        .prop_map(|(worker_id, heartbeat_ms, lease_ms)| pb::RegisterResponse {
            worker_id,
            heartbeat_ms,
            lease_ms,
            ..Default::default()
        })
        .boxed()
}

fn wire_heartbeat_response() -> BoxedStrategy<pb::HeartbeatResponse> {
    (edgy_u64(), -2i32..8)
        .prop_map(|(generation, state)| pb::HeartbeatResponse {
            generation,
            state,
            ..Default::default()
        })
        .boxed()
}

fn wire_held_step() -> BoxedStrategy<pb::HeldStep> {
    (edgy_u64(), edgy_u64(), edgy_u32(), edgy_u32(), any::<u64>())
        .prop_map(
            |(step, generation, world_size, rank, checksum)| pb::HeldStep {
                step,
                generation,
                world_size,
                rank,
                checksum,
            },
        )
        .boxed()
}

fn wire_assignment_request() -> BoxedStrategy<pb::AssignmentRequest> {
    (
        edgy_u64(),
        edgy_u64(),
        edgy_u64(),
        proptest::option::of(edgy_u64()),
        proptest::option::of(edgy_text()),
        prop::collection::vec(wire_held_step(), 0..4),
    )
        .prop_map(
            |(worker_id, generation, next_step, want_step, group_error, held)| {
                pb::AssignmentRequest {
                    worker_id,
                    generation,
                    next_step,
                    want_step,
                    group_error,
                    held,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

fn wire_patient_draw() -> BoxedStrategy<pb::PatientDraw> {
    let slide = (edgy_u64(), prop::collection::vec(edgy_u64(), 0..3))
        .prop_map(|(slide, patches)| pb::SlideDraw { slide, patches });
    (
        edgy_u64(),
        edgy_u64(),
        edgy_u64(),
        prop::collection::vec(slide, 0..3),
    )
        .prop_map(|(patient, label, slot, slides)| pb::PatientDraw {
            patient,
            label,
            slot,
            slides,
        })
        .boxed()
}

fn wire_assignment() -> BoxedStrategy<pb::Assignment> {
    use pb::assignment::Kind;
    let wait = (edgy_u64(), edgy_text())
        .prop_map(|(retry_ms, reason)| Kind::Wait(pb::Wait { retry_ms, reason }));
    let group = (
        (edgy_u64(), edgy_u32(), edgy_u32(), any::<bool>()),
        (edgy_text(), edgy_u32(), edgy_u32()),
        (edgy_u64(), edgy_u64(), edgy_u64()),
        proptest::option::of(edgy_text()),
    )
        .prop_map(
            |(
                (generation, rank, world_size, host_store),
                (store_host, store_port, broadcast_root),
                (start_step, total_steps, steps_per_epoch),
                resume_checkpoint,
            )| {
                Kind::Group(pb::Group {
                    generation,
                    rank,
                    world_size,
                    host_store,
                    store_host,
                    store_port,
                    broadcast_root,
                    start_step,
                    total_steps,
                    steps_per_epoch,
                    resume_checkpoint,
                })
            },
        );
    let train = (
        (edgy_u64(), edgy_u64(), edgy_u64(), edgy_u64(), edgy_u64()),
        prop::collection::vec(wire_patient_draw(), 0..4),
    )
        .prop_map(
            |((generation, step, epoch, global_patients, total_steps), shard)| {
                Kind::Train(pb::Train {
                    generation,
                    step,
                    epoch,
                    global_patients,
                    shard,
                    total_steps,
                })
            },
        );
    let stop = (
        any::<bool>(),
        edgy_text(),
        proptest::option::of(edgy_u64()),
        any::<bool>(),
    )
        .prop_map(|(success, reason, checkpoint_step, resumable)| {
            Kind::Stop(pb::Stop {
                success,
                reason,
                checkpoint_step,
                resumable,
            })
        });
    proptest::option::weighted(0.95, prop_oneof![wait, group, train, stop])
        .prop_map(|kind| pb::Assignment { kind })
        .boxed()
}

fn wire_publish_store_request() -> BoxedStrategy<pb::PublishStoreRequest> {
    (edgy_u64(), edgy_u64(), edgy_u32())
        .prop_map(|(worker_id, generation, port)| pb::PublishStoreRequest {
            worker_id,
            generation,
            port,
        })
        .boxed()
}

fn wire_step_report() -> BoxedStrategy<pb::StepReport> {
    (
        (edgy_u64(), edgy_u64(), edgy_u64(), edgy_u32(), edgy_u64()),
        (
            edgy_f64(),
            proptest::option::of(wire_level_losses()),
            proptest::option::of(wire_level_losses()),
        ),
        (
            any::<u64>(),
            edgy_f64(),
            edgy_f64(),
            proptest::option::of(edgy_text()),
        ),
    )
        .prop_map(
            |(
                (worker_id, generation, step, rank, local_patients),
                (total_loss, clean, adversarial),
                (param_checksum, step_seconds, data_wait_seconds, checkpoint_dir),
            )| pb::StepReport {
                worker_id,
                generation,
                step,
                rank,
                local_patients,
                total_loss,
                clean,
                adversarial,
                param_checksum,
                step_seconds,
                data_wait_seconds,
                checkpoint_dir,
                ..Default::default()
            },
        )
        .boxed()
}

fn wire_job_status() -> BoxedStrategy<pb::JobStatus> {
    let worker = (
        edgy_u64(),
        edgy_text(),
        proptest::option::of(edgy_u32()),
        edgy_u64(),
        edgy_text(),
    )
        .prop_map(
            |(worker_id, name, rank, last_heartbeat_age_ms, state)| pb::WorkerStatus {
                worker_id,
                name,
                rank,
                last_heartbeat_age_ms,
                state,
            },
        );
    (
        (
            -2i32..8,
            edgy_text(),
            edgy_u64(),
            edgy_u64(),
            edgy_u64(),
            edgy_u64(),
        ),
        prop::collection::vec(worker, 0..3),
        (
            edgy_f64(),
            edgy_f64(),
            proptest::option::of(edgy_f64()),
            proptest::option::of(wire_level_losses()),
            proptest::option::of(wire_level_losses()),
        ),
    )
        .prop_map(
            |(
                (state, message, step, total_steps, epoch, generation),
                workers,
                (
                    steps_per_second,
                    patients_per_second,
                    last_total_loss,
                    last_clean,
                    last_adversarial,
                ),
            )| pb::JobStatus {
                state,
                message,
                step,
                total_steps,
                epoch,
                generation,
                workers,
                steps_per_second,
                patients_per_second,
                last_total_loss,
                last_clean,
                last_adversarial,
                ..Default::default()
            },
        )
        .boxed()
}

// ---- valid domain generators (within the invariants of `domain`) ----

fn worker_id() -> BoxedStrategy<WorkerId> {
    prop_oneof![1u64..64, Just(u64::MAX)]
        .prop_map(WorkerId)
        .boxed()
}

/// Durations travel in whole milliseconds.
fn millis() -> BoxedStrategy<Duration> {
    prop_oneof![0u64..10_000, Just(u64::MAX)]
        .prop_map(Duration::from_millis)
        .boxed()
}

/// Paths travel as UTF-8 text; an empty path means "none" on the wire.
fn path() -> BoxedStrategy<PathBuf> {
    "[a-z0-9/._-]{1,24}".prop_map(PathBuf::from).boxed()
}

fn level_losses() -> BoxedStrategy<LevelLosses> {
    wire_level_losses().prop_map(LevelLosses::from).boxed()
}

fn step_losses() -> BoxedStrategy<StepLosses> {
    (
        edgy_f64(),
        proptest::option::of(level_losses()),
        proptest::option::of(level_losses()),
    )
        .prop_map(|(total, clean, adversarial)| StepLosses {
            total,
            clean,
            adversarial,
        })
        .boxed()
}

fn non_negative_seconds() -> BoxedStrategy<f64> {
    prop_oneof![Just(0.0), Just(f64::MAX), 0.0f64..1e6].boxed()
}

fn job_state() -> BoxedStrategy<JobState> {
    prop_oneof![
        Just(JobState::WaitingForWorkers),
        Just(JobState::Running),
        Just(JobState::Regrouping),
        Just(JobState::Finished),
        Just(JobState::Failed),
    ]
    .boxed()
}

fn registration() -> BoxedStrategy<Registration> {
    let config = prop_oneof![
        Just(serde_json::json!({})),
        Just(hsat_core::config::Config::default().to_json_value()),
        (any::<String>(), any::<i64>()).prop_map(|(k, v)| serde_json::json!({ k: v })),
    ];
    (
        any::<String>(),
        config,
        any::<String>(),
        "[a-z0-9.-]{1,20}",
        any::<String>(),
    )
        .prop_map(
            |(worker_name, config, dataset_fingerprint, advertise_host, hsat_version)| {
                Registration {
                    worker_name,
                    config,
                    dataset_fingerprint,
                    advertise_host,
                    hsat_version,
                }
            },
        )
        .boxed()
}

fn registered() -> BoxedStrategy<Registered> {
    (worker_id(), 1u64..10_000, 1u64..10_000)
        .prop_map(|(worker_id, heartbeat, extra)| Registered {
            worker_id,
            heartbeat: Duration::from_millis(heartbeat),
            lease: Duration::from_millis(heartbeat + extra),
        })
        .boxed()
}

fn assignment_request() -> BoxedStrategy<AssignmentRequest> {
    let held = (0u64..100, 1u64..10, 1u32..8, any::<u64>()).prop_flat_map(
        |(step, generation, world_size, checksum)| {
            (0..world_size).prop_map(move |rank| HeldStep {
                step,
                generation,
                world_size,
                rank,
                checksum,
            })
        },
    );
    (
        worker_id(),
        edgy_u64(),
        100u64..200,
        0u64..3,
        proptest::option::of(any::<String>()),
        prop::collection::vec(held, 0..4),
    )
        .prop_map(
            |(worker_id, generation, next_step, ahead, group_error, held)| AssignmentRequest {
                worker_id,
                generation,
                next_step,
                want_step: next_step + ahead,
                group_error,
                held,
            },
        )
        .boxed()
}

fn assignment() -> BoxedStrategy<Assignment> {
    let wait =
        (millis(), any::<String>()).prop_map(|(retry, reason)| Assignment::Wait { retry, reason });
    let store = prop_oneof![
        Just(StoreRole::Host),
        ("[a-z0-9.-]{1,20}", 1u16..).prop_map(|(host, port)| StoreRole::Connect { host, port }),
    ];
    let group = (1u32..16)
        .prop_flat_map(move |world_size| {
            (
                (1u64..100, 0..world_size, Just(world_size), 0..world_size),
                store.clone(),
                (edgy_u64(), edgy_u64(), edgy_u64()),
                proptest::option::of(path()),
            )
        })
        .prop_map(
            |(
                (generation, rank, world_size, broadcast_root),
                store,
                (start_step, total_steps, steps_per_epoch),
                resume_checkpoint,
            )| {
                Assignment::Group(GroupAssignment {
                    generation,
                    rank,
                    world_size,
                    store,
                    broadcast_root,
                    start_step,
                    total_steps,
                    steps_per_epoch,
                    resume_checkpoint,
                })
            },
        );
    let draw = (
        0usize..1000,
        0usize..10,
        0usize..64,
        prop::collection::vec(
            (0usize..100, prop::collection::vec(0usize..100, 0..3))
                .prop_map(|(slide, patches)| SlideDraw { slide, patches }),
            0..3,
        ),
    )
        .prop_map(|(patient, label, slot, slides)| PatientDraw {
            patient,
            label,
            slot,
            slides,
        });
    let train = (
        (edgy_u64(), edgy_u64(), edgy_u64(), edgy_u64(), 0u64..3),
        prop::collection::vec(draw, 0..4),
    )
        .prop_map(|((generation, step, epoch, total_steps, spare), shard)| {
            Assignment::Train(TrainAssignment {
                generation,
                step,
                epoch,
                global_patients: shard.len() as u64 + spare,
                shard,
                total_steps,
            })
        });
    let stop = (
        any::<bool>(),
        any::<String>(),
        proptest::option::of(edgy_u64()),
        any::<bool>(),
    )
        .prop_map(
            |(success, reason, checkpoint_step, resumable)| Assignment::Stop {
                success,
                reason,
                checkpoint_step,
                resumable,
            },
        );
    prop_oneof![wait, group, train, stop].boxed()
}

fn store_publication() -> BoxedStrategy<StorePublication> {
    (worker_id(), edgy_u64(), 1u16..)
        .prop_map(|(worker_id, generation, port)| StorePublication {
            worker_id,
            generation,
            port,
        })
        .boxed()
}

fn step_report() -> BoxedStrategy<StepReport> {
    (
        (worker_id(), 1u64..1000, edgy_u64(), edgy_u32(), edgy_u64()),
        (
            step_losses(),
            any::<u64>(),
            non_negative_seconds(),
            non_negative_seconds(),
        ),
        proptest::option::of(path()),
        step_telemetry(),
    )
        .prop_map(
            |(
                (worker_id, generation, step, rank, local_patients),
                (losses, param_checksum, step_seconds, data_wait_seconds),
                checkpoint_dir,
                telemetry,
            )| StepReport {
                worker_id,
                generation,
                step,
                rank,
                local_patients,
                losses,
                param_checksum,
                step_seconds,
                data_wait_seconds,
                checkpoint_dir,
                telemetry,
            },
        )
        .boxed()
}

fn step_telemetry() -> BoxedStrategy<StepTelemetry> {
    (
        proptest::option::of(-1e6f64..1e6),
        non_negative_seconds(),
        non_negative_seconds(),
        non_negative_seconds(),
        non_negative_seconds(),
        any::<u64>(),
    )
        .prop_map(
            |(attack_gain, eps, lr, attack_seconds, allreduce_seconds, patches)| StepTelemetry {
                attack_gain,
                eps,
                lr,
                attack_seconds,
                allreduce_seconds,
                patches,
            },
        )
        .boxed()
}

fn job_status() -> BoxedStrategy<JobStatus> {
    let worker = (
        worker_id(),
        any::<String>(),
        proptest::option::of(any::<u32>()),
        millis(),
        any::<String>(),
    )
        .prop_map(
            |(worker_id, name, rank, last_heartbeat_age, state)| WorkerStatus {
                worker_id,
                name,
                rank,
                last_heartbeat_age,
                state,
            },
        );
    (
        (
            job_state(),
            any::<String>(),
            edgy_u64(),
            edgy_u64(),
            edgy_u64(),
            edgy_u64(),
        ),
        prop::collection::vec(worker, 0..3),
        (edgy_f64(), edgy_f64(), proptest::option::of(step_losses())),
    )
        .prop_map(
            |(
                (state, message, step, total_steps, epoch, generation),
                workers,
                (steps_per_second, patients_per_second, last_losses),
            )| JobStatus {
                state,
                message,
                step,
                total_steps,
                epoch,
                generation,
                workers,
                steps_per_second,
                patients_per_second,
                last_losses,
            },
        )
        .boxed()
}

// ---- the properties, message by message ----

/// Bytes shaped like protobuf: mostly short, sometimes a valid message of another
/// type (so field numbers and wire types line up more often than pure noise).
fn bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        wire_step_report().prop_map(|m| m.encode_to_vec()),
        wire_assignment().prop_map(|m| m.encode_to_vec()),
        wire_job_status().prop_map(|m| m.encode_to_vec()),
        wire_register_request().prop_map(|m| m.encode_to_vec()),
        wire_assignment_request().prop_map(|m| m.encode_to_vec()),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_and_rejections_name_a_field(bytes in bytes()) {
        bytes_property::<pb::RegisterRequest, Registration>("RegisterRequest", &bytes, pb::RegisterRequest::from)?;
        bytes_property::<pb::RegisterResponse, Registered>("RegisterResponse", &bytes, pb::RegisterResponse::from)?;
        bytes_property::<pb::HeartbeatRequest, WorkerId>("HeartbeatRequest", &bytes, heartbeat_request)?;
        bytes_property::<pb::HeartbeatResponse, HeartbeatReply>("HeartbeatResponse", &bytes, pb::HeartbeatResponse::from)?;
        bytes_property::<pb::AssignmentRequest, AssignmentRequest>("AssignmentRequest", &bytes, pb::AssignmentRequest::from)?;
        bytes_property::<pb::Assignment, Assignment>("Assignment", &bytes, pb::Assignment::from)?;
        bytes_property::<pb::PublishStoreRequest, StorePublication>("PublishStoreRequest", &bytes, publish_store_request)?;
        bytes_property::<pb::StepReport, StepReport>("StepReport", &bytes, pb::StepReport::from)?;
        bytes_property::<pb::LeaveRequest, (WorkerId, String)>("LeaveRequest", &bytes, leave_request)?;
        bytes_property::<pb::JobStatus, JobStatus>("JobStatus", &bytes, pb::JobStatus::from)?;
    }

    #[test]
    fn hostile_register_messages(request in wire_register_request(), response in wire_register_response()) {
        wire_property::<_, Registration>("RegisterRequest", request, pb::RegisterRequest::from)?;
        wire_property::<_, Registered>("RegisterResponse", response, pb::RegisterResponse::from)?;
    }

    #[test]
    fn hostile_heartbeat_and_leave_messages(
        worker in edgy_u64(),
        reason in edgy_text(),
        response in wire_heartbeat_response(),
    ) {
        wire_property::<_, WorkerId>("HeartbeatRequest", pb::HeartbeatRequest { worker_id: worker }, heartbeat_request)?;
        wire_property::<_, HeartbeatReply>("HeartbeatResponse", response, pb::HeartbeatResponse::from)?;
        wire_property::<_, (WorkerId, String)>("LeaveRequest", pb::LeaveRequest { worker_id: worker, reason }, leave_request)?;
    }

    #[test]
    fn hostile_assignment_messages(request in wire_assignment_request(), assignment in wire_assignment()) {
        wire_property::<_, AssignmentRequest>("AssignmentRequest", request, pb::AssignmentRequest::from)?;
        wire_property::<_, Assignment>("Assignment", assignment, pb::Assignment::from)?;
    }

    #[test]
    fn hostile_store_reports_and_status(
        publication in wire_publish_store_request(),
        report in wire_step_report(),
        status in wire_job_status(),
    ) {
        wire_property::<_, StorePublication>("PublishStoreRequest", publication, publish_store_request)?;
        wire_property::<_, StepReport>("StepReport", report, pb::StepReport::from)?;
        wire_property::<_, JobStatus>("JobStatus", status, pb::JobStatus::from)?;
    }

    #[test]
    fn valid_domain_values_round_trip(
        registration in registration(),
        registered in registered(),
        worker in worker_id(),
        reason in any::<String>(),
        (generation, state) in (edgy_u64(), job_state()),
        request in assignment_request(),
        assignment in assignment(),
        publication in store_publication(),
        report in step_report(),
        status in job_status(),
    ) {
        round_trip("RegisterRequest", registration, pb::RegisterRequest::from)?;
        round_trip("RegisterResponse", registered, pb::RegisterResponse::from)?;
        round_trip("HeartbeatRequest", worker, heartbeat_request)?;
        round_trip("HeartbeatResponse", HeartbeatReply { generation, state }, pb::HeartbeatResponse::from)?;
        round_trip("LeaveRequest", (worker, reason), leave_request)?;
        round_trip("AssignmentRequest", request, pb::AssignmentRequest::from)?;
        round_trip("Assignment", assignment, pb::Assignment::from)?;
        round_trip("PublishStoreRequest", publication, publish_store_request)?;
        round_trip("StepReport", report, pb::StepReport::from)?;
        round_trip("JobStatus", status, pb::JobStatus::from)?;
    }
}
