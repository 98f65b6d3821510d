//! Wire <-> domain conversion: `From<domain> for pb` for what we send, `TryFrom<pb>
//! for domain` (with the reason of a rejection) for what we receive. Both the server
//! adapter and the client use these, so every message is checked the same way.

use std::path::PathBuf;
use std::time::Duration;

use crate::ApiError;
use crate::domain::*;
use crate::pb;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

fn usize_of(value: u64, field: &str) -> Result<usize, ApiError> {
    usize::try_from(value)
        .map_err(|_| invalid(format!("{field} {value} does not fit this machine")))
}

fn worker_id(raw: u64) -> Result<WorkerId, ApiError> {
    if raw == 0 {
        return Err(invalid(
            "worker_id is 0: register first and use the id it returns",
        ));
    }
    Ok(WorkerId(raw))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn finite_non_negative(value: f64, field: &str) -> Result<f64, ApiError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(invalid(format!(
            "{field} is {value}: expected a finite number >= 0"
        )))
    }
}

fn optional_path(text: Option<String>) -> Option<PathBuf> {
    text.filter(|t| !t.is_empty()).map(PathBuf::from)
}

// ---- register ----

impl From<Registration> for pb::RegisterRequest {
    fn from(r: Registration) -> Self {
        Self {
            worker_name: r.worker_name,
            config_json: r.config.to_string(),
            dataset_fingerprint: r.dataset_fingerprint,
            advertise_host: r.advertise_host,
            hsat_version: r.hsat_version,
        }
    }
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ApiError;
    fn try_from(r: pb::RegisterRequest) -> Result<Self, ApiError> {
        let config: serde_json::Value = serde_json::from_str(&r.config_json)
            .map_err(|err| invalid(format!("config_json is not JSON: {err}")))?;
        if !config.is_object() {
            return Err(invalid(
                "config_json must be a JSON object (Config::to_json_value)",
            ));
        }
        if r.advertise_host.trim().is_empty() {
            return Err(invalid(
                "advertise_host is empty: give the host other workers reach this one at",
            ));
        }
        Ok(Self {
            worker_name: r.worker_name,
            config,
            dataset_fingerprint: r.dataset_fingerprint,
            advertise_host: r.advertise_host,
            hsat_version: r.hsat_version,
        })
    }
}

impl From<Registered> for pb::RegisterResponse {
    fn from(r: Registered) -> Self {
        Self {
            worker_id: r.worker_id.0,
            heartbeat_ms: millis(r.heartbeat),
            lease_ms: millis(r.lease),
            // The server adapter fills it in (it owns the sessions).
            session_token: String::new(),
        }
    }
}

impl TryFrom<pb::RegisterResponse> for Registered {
    type Error = ApiError;
    fn try_from(r: pb::RegisterResponse) -> Result<Self, ApiError> {
        if r.heartbeat_ms == 0 || r.lease_ms <= r.heartbeat_ms {
            return Err(invalid(format!(
                "heartbeat_ms {} / lease_ms {}: expected 0 < heartbeat < lease",
                r.heartbeat_ms, r.lease_ms
            )));
        }
        Ok(Self {
            worker_id: worker_id(r.worker_id)?,
            heartbeat: Duration::from_millis(r.heartbeat_ms),
            lease: Duration::from_millis(r.lease_ms),
        })
    }
}

// ---- heartbeat ----

impl From<JobState> for pb::JobStateKind {
    fn from(s: JobState) -> Self {
        match s {
            JobState::WaitingForWorkers => Self::WaitingForWorkers,
            JobState::Running => Self::Running,
            JobState::Regrouping => Self::Regrouping,
            JobState::Finished => Self::Finished,
            JobState::Failed => Self::Failed,
        }
    }
}

fn job_state(raw: i32) -> Result<JobState, ApiError> {
    match pb::JobStateKind::try_from(raw) {
        Ok(pb::JobStateKind::WaitingForWorkers) => Ok(JobState::WaitingForWorkers),
        Ok(pb::JobStateKind::Running) => Ok(JobState::Running),
        Ok(pb::JobStateKind::Regrouping) => Ok(JobState::Regrouping),
        Ok(pb::JobStateKind::Finished) => Ok(JobState::Finished),
        Ok(pb::JobStateKind::Failed) => Ok(JobState::Failed),
        _ => Err(invalid(format!("unknown job state {raw}"))),
    }
}

impl TryFrom<pb::HeartbeatRequest> for WorkerId {
    type Error = ApiError;
    fn try_from(r: pb::HeartbeatRequest) -> Result<Self, ApiError> {
        worker_id(r.worker_id)
    }
}

impl From<HeartbeatReply> for pb::HeartbeatResponse {
    fn from(r: HeartbeatReply) -> Self {
        Self {
            generation: r.generation,
            state: pb::JobStateKind::from(r.state).into(),
        }
    }
}

impl TryFrom<pb::HeartbeatResponse> for HeartbeatReply {
    type Error = ApiError;
    fn try_from(r: pb::HeartbeatResponse) -> Result<Self, ApiError> {
        Ok(Self {
            generation: r.generation,
            state: job_state(r.state)?,
        })
    }
}

// ---- assignments ----

impl From<AssignmentRequest> for pb::AssignmentRequest {
    fn from(r: AssignmentRequest) -> Self {
        Self {
            worker_id: r.worker_id.0,
            generation: r.generation,
            next_step: r.next_step,
            want_step: Some(r.want_step),
            group_error: r.group_error,
            held: r
                .held
                .into_iter()
                .map(|h| pb::HeldStep {
                    step: h.step,
                    generation: h.generation,
                    world_size: h.world_size,
                    rank: h.rank,
                    checksum: h.checksum,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::AssignmentRequest> for AssignmentRequest {
    type Error = ApiError;
    fn try_from(r: pb::AssignmentRequest) -> Result<Self, ApiError> {
        let want_step = r.want_step.unwrap_or(r.next_step);
        if want_step < r.next_step {
            return Err(invalid(format!(
                "want_step {want_step} is before next_step {}: a worker asks for steps it has not trained",
                r.next_step
            )));
        }
        let held = r
            .held
            .into_iter()
            .map(|h| {
                if h.world_size == 0 || h.rank >= h.world_size || h.generation == 0 {
                    return Err(invalid(format!(
                        "held step {}: rank {} of world size {} in generation {} is impossible",
                        h.step, h.rank, h.world_size, h.generation
                    )));
                }
                if h.step >= r.next_step {
                    return Err(invalid(format!(
                        "held step {} is not before next_step {}: a worker lists steps its model trained",
                        h.step, r.next_step
                    )));
                }
                Ok(HeldStep {
                    step: h.step,
                    generation: h.generation,
                    world_size: h.world_size,
                    rank: h.rank,
                    checksum: h.checksum,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(Self {
            worker_id: worker_id(r.worker_id)?,
            generation: r.generation,
            next_step: r.next_step,
            want_step,
            group_error: r.group_error,
            held,
        })
    }
}

impl From<SlideDraw> for pb::SlideDraw {
    fn from(s: SlideDraw) -> Self {
        Self {
            slide: s.slide as u64,
            patches: s.patches.into_iter().map(|p| p as u64).collect(),
        }
    }
}

impl From<PatientDraw> for pb::PatientDraw {
    fn from(p: PatientDraw) -> Self {
        Self {
            patient: p.patient as u64,
            label: p.label as u64,
            slot: p.slot as u64,
            slides: p.slides.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::PatientDraw> for PatientDraw {
    type Error = ApiError;
    fn try_from(p: pb::PatientDraw) -> Result<Self, ApiError> {
        let slides = p
            .slides
            .into_iter()
            .map(|s| {
                Ok(SlideDraw {
                    slide: usize_of(s.slide, "slide")?,
                    patches: s
                        .patches
                        .into_iter()
                        .map(|x| usize_of(x, "patch"))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(Self {
            patient: usize_of(p.patient, "patient")?,
            label: usize_of(p.label, "label")?,
            slot: usize_of(p.slot, "slot")?,
            slides,
        })
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        use pb::assignment::Kind;
        let kind = match a {
            Assignment::Wait { retry, reason } => Kind::Wait(pb::Wait {
                retry_ms: millis(retry),
                reason,
            }),
            Assignment::Group(g) => {
                let (host_store, store_host, store_port) = match g.store {
                    StoreRole::Host => (true, String::new(), 0),
                    StoreRole::Connect { host, port } => (false, host, u32::from(port)),
                };
                Kind::Group(pb::Group {
                    generation: g.generation,
                    rank: g.rank,
                    world_size: g.world_size,
                    host_store,
                    store_host,
                    store_port,
                    broadcast_root: g.broadcast_root,
                    start_step: g.start_step,
                    total_steps: g.total_steps,
                    steps_per_epoch: g.steps_per_epoch,
                    resume_checkpoint: g
                        .resume_checkpoint
                        .map(|p| p.to_string_lossy().into_owned()),
                })
            }
            Assignment::Train(t) => Kind::Train(pb::Train {
                generation: t.generation,
                step: t.step,
                epoch: t.epoch,
                global_patients: t.global_patients,
                shard: t.shard.into_iter().map(Into::into).collect(),
                total_steps: t.total_steps,
            }),
            Assignment::Stop {
                success,
                reason,
                checkpoint_step,
                resumable,
            } => Kind::Stop(pb::Stop {
                success,
                reason,
                checkpoint_step,
                resumable,
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = ApiError;
    fn try_from(a: pb::Assignment) -> Result<Self, ApiError> {
        use pb::assignment::Kind;
        match a.kind {
            None => Err(invalid("assignment without a kind")),
            Some(Kind::Wait(w)) => Ok(Assignment::Wait {
                retry: Duration::from_millis(w.retry_ms),
                reason: w.reason,
            }),
            Some(Kind::Stop(s)) => Ok(Assignment::Stop {
                success: s.success,
                reason: s.reason,
                checkpoint_step: s.checkpoint_step,
                resumable: s.resumable,
            }),
            Some(Kind::Group(g)) => {
                if g.world_size == 0 || g.rank >= g.world_size || g.broadcast_root >= g.world_size {
                    return Err(invalid(format!(
                        "group rank {} / broadcast_root {} / world_size {}: expected ranks < world_size",
                        g.rank, g.broadcast_root, g.world_size
                    )));
                }
                if g.generation == 0 {
                    return Err(invalid("group of generation 0"));
                }
                let store = if g.host_store {
                    StoreRole::Host
                } else {
                    let port = u16::try_from(g.store_port)
                        .ok()
                        .filter(|&p| p > 0)
                        .ok_or_else(|| {
                            invalid(format!("store_port {} is not a port", g.store_port))
                        })?;
                    if g.store_host.is_empty() {
                        return Err(invalid("store_host is empty for a rank that connects"));
                    }
                    StoreRole::Connect {
                        host: g.store_host,
                        port,
                    }
                };
                Ok(Assignment::Group(GroupAssignment {
                    generation: g.generation,
                    rank: g.rank,
                    world_size: g.world_size,
                    store,
                    broadcast_root: g.broadcast_root,
                    start_step: g.start_step,
                    total_steps: g.total_steps,
                    steps_per_epoch: g.steps_per_epoch,
                    resume_checkpoint: optional_path(g.resume_checkpoint),
                }))
            }
            Some(Kind::Train(t)) => {
                let shard = t
                    .shard
                    .into_iter()
                    .map(PatientDraw::try_from)
                    .collect::<Result<Vec<_>, _>>()?;
                if shard.len() as u64 > t.global_patients {
                    return Err(invalid(format!(
                        "shard of {} patients in a step of {}",
                        shard.len(),
                        t.global_patients
                    )));
                }
                Ok(Assignment::Train(TrainAssignment {
                    generation: t.generation,
                    step: t.step,
                    epoch: t.epoch,
                    global_patients: t.global_patients,
                    shard,
                    total_steps: t.total_steps,
                }))
            }
        }
    }
}

// ---- store, reports, leave ----

/// `PublishStore`'s content: who, which generation, which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorePublication {
    /// Rank 0 of `generation`.
    pub worker_id: WorkerId,
    /// The generation whose store this is.
    pub generation: u64,
    /// The store's port; > 0.
    pub port: u16,
}

impl TryFrom<pb::PublishStoreRequest> for StorePublication {
    type Error = ApiError;
    fn try_from(r: pb::PublishStoreRequest) -> Result<Self, ApiError> {
        let port = u16::try_from(r.port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| invalid(format!("port {} is not a TCP port (1..=65535)", r.port)))?;
        Ok(Self {
            worker_id: worker_id(r.worker_id)?,
            generation: r.generation,
            port,
        })
    }
}

impl From<LevelLosses> for pb::LevelLosses {
    fn from(l: LevelLosses) -> Self {
        Self {
            patient: l.patient,
            slide: l.slide,
            patch: l.patch,
            total: l.total,
        }
    }
}

impl From<pb::LevelLosses> for LevelLosses {
    fn from(l: pb::LevelLosses) -> Self {
        Self {
            patient: l.patient,
            slide: l.slide,
            patch: l.patch,
            total: l.total,
        }
    }
}

impl From<StepReport> for pb::StepReport {
    fn from(r: StepReport) -> Self {
        Self {
            worker_id: r.worker_id.0,
            generation: r.generation,
            step: r.step,
            rank: r.rank,
            local_patients: r.local_patients,
            total_loss: r.losses.total,
            clean: r.losses.clean.map(Into::into),
            adversarial: r.losses.adversarial.map(Into::into),
            param_checksum: r.param_checksum,
            step_seconds: r.step_seconds,
            data_wait_seconds: r.data_wait_seconds,
            checkpoint_dir: r.checkpoint_dir.map(|p| p.to_string_lossy().into_owned()),
            telemetry: Some(pb::StepTelemetry {
                attack_gain: r.telemetry.attack_gain,
                eps: r.telemetry.eps,
                lr: r.telemetry.lr,
                attack_seconds: r.telemetry.attack_seconds,
                allreduce_seconds: r.telemetry.allreduce_seconds,
                patches: r.telemetry.patches,
            }),
        }
    }
}

impl TryFrom<pb::StepTelemetry> for StepTelemetry {
    type Error = ApiError;
    fn try_from(t: pb::StepTelemetry) -> Result<Self, ApiError> {
        // The attack gain is reported, not judged (NaN when training diverges);
        // durations and schedules feed histograms and gauges and must be sane.
        Ok(Self {
            attack_gain: t.attack_gain,
            eps: finite_non_negative(t.eps, "telemetry.eps")?,
            lr: finite_non_negative(t.lr, "telemetry.lr")?,
            attack_seconds: finite_non_negative(t.attack_seconds, "telemetry.attack_seconds")?,
            allreduce_seconds: finite_non_negative(
                t.allreduce_seconds,
                "telemetry.allreduce_seconds",
            )?,
            patches: t.patches,
        })
    }
}

impl TryFrom<pb::StepReport> for StepReport {
    type Error = ApiError;
    fn try_from(r: pb::StepReport) -> Result<Self, ApiError> {
        if r.generation == 0 {
            return Err(invalid(
                "step report of generation 0: train only what a Train assignment names",
            ));
        }
        Ok(Self {
            worker_id: worker_id(r.worker_id)?,
            generation: r.generation,
            step: r.step,
            rank: r.rank,
            local_patients: r.local_patients,
            // Losses may be NaN when training diverges: they are reported, not judged here.
            losses: StepLosses {
                total: r.total_loss,
                clean: r.clean.map(Into::into),
                adversarial: r.adversarial.map(Into::into),
            },
            param_checksum: r.param_checksum,
            step_seconds: finite_non_negative(r.step_seconds, "step_seconds")?,
            data_wait_seconds: finite_non_negative(r.data_wait_seconds, "data_wait_seconds")?,
            checkpoint_dir: optional_path(r.checkpoint_dir),
            telemetry: r
                .telemetry
                .map(StepTelemetry::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl TryFrom<pb::LeaveRequest> for (WorkerId, String) {
    type Error = ApiError;
    fn try_from(r: pb::LeaveRequest) -> Result<Self, ApiError> {
        Ok((worker_id(r.worker_id)?, r.reason))
    }
}

// ---- status ----

impl From<JobStatus> for pb::JobStatus {
    fn from(s: JobStatus) -> Self {
        Self {
            state: pb::JobStateKind::from(s.state).into(),
            message: s.message,
            step: s.step,
            total_steps: s.total_steps,
            epoch: s.epoch,
            generation: s.generation,
            workers: s
                .workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker_id.0,
                    name: w.name,
                    rank: w.rank,
                    last_heartbeat_age_ms: millis(w.last_heartbeat_age),
                    state: w.state,
                })
                .collect(),
            steps_per_second: s.steps_per_second,
            patients_per_second: s.patients_per_second,
            last_total_loss: s.last_losses.map(|l| l.total),
            last_clean: s.last_losses.and_then(|l| l.clean).map(Into::into),
            last_adversarial: s.last_losses.and_then(|l| l.adversarial).map(Into::into),
        }
    }
}

impl TryFrom<pb::JobStatus> for JobStatus {
    type Error = ApiError;
    fn try_from(s: pb::JobStatus) -> Result<Self, ApiError> {
        Ok(Self {
            state: job_state(s.state)?,
            message: s.message,
            step: s.step,
            total_steps: s.total_steps,
            epoch: s.epoch,
            generation: s.generation,
            workers: s
                .workers
                .into_iter()
                .map(|w| {
                    Ok(WorkerStatus {
                        worker_id: worker_id(w.worker_id)?,
                        name: w.name,
                        rank: w.rank,
                        last_heartbeat_age: Duration::from_millis(w.last_heartbeat_age_ms),
                        state: w.state,
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            steps_per_second: s.steps_per_second,
            patients_per_second: s.patients_per_second,
            last_losses: s.last_total_loss.map(|total| StepLosses {
                total,
                clean: s.last_clean.map(Into::into),
                adversarial: s.last_adversarial.map(Into::into),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_steps_round_trip_and_impossible_ones_are_refused() {
        let request = AssignmentRequest {
            worker_id: WorkerId(9),
            generation: 0,
            next_step: 6,
            want_step: 6,
            group_error: None,
            held: vec![HeldStep {
                step: 5,
                generation: 4,
                world_size: 2,
                rank: 1,
                checksum: 77,
            }],
        };
        let wire = pb::AssignmentRequest::from(request.clone());
        assert_eq!(AssignmentRequest::try_from(wire.clone()).unwrap(), request);
        let mut ahead = wire.clone();
        ahead.held[0].step = 6;
        let err = AssignmentRequest::try_from(ahead).unwrap_err();
        assert!(
            err.to_string()
                .contains("held step 6 is not before next_step 6"),
            "{err}"
        );
        let mut rank = wire;
        rank.held[0].rank = 2;
        let err = AssignmentRequest::try_from(rank).unwrap_err();
        assert!(err.to_string().contains("rank 2 of world size 2"), "{err}");
    }

    #[test]
    fn assignments_round_trip() {
        let group = Assignment::Group(GroupAssignment {
            generation: 3,
            rank: 1,
            world_size: 2,
            store: StoreRole::Connect {
                host: "10.0.0.1".into(),
                port: 29500,
            },
            broadcast_root: 0,
            start_step: 7,
            total_steps: 10,
            steps_per_epoch: 5,
            resume_checkpoint: None,
        });
        let train = Assignment::Train(TrainAssignment {
            generation: 3,
            step: 7,
            epoch: 1,
            global_patients: 3,
            shard: vec![PatientDraw {
                patient: 4,
                label: 1,
                slot: 2,
                slides: vec![SlideDraw {
                    slide: 0,
                    patches: vec![1, 0],
                }],
            }],
            total_steps: 10,
        });
        for a in [group, train] {
            let wire = pb::Assignment::from(a.clone());
            assert_eq!(Assignment::try_from(wire).unwrap(), a);
        }
    }

    #[test]
    fn bad_fields_are_invalid_arguments_with_the_reason() {
        let err = StorePublication::try_from(pb::PublishStoreRequest {
            worker_id: 1,
            generation: 1,
            port: 70000,
        })
        .unwrap_err();
        assert!(err.to_string().contains("70000"), "{err}");
        let err = AssignmentRequest::try_from(pb::AssignmentRequest {
            worker_id: 1,
            generation: 0,
            next_step: 5,
            want_step: Some(4),
            group_error: None,
            held: Vec::new(),
        })
        .unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidArgument(m) if m.contains("want_step 4 is before next_step 5")),
            "{err}"
        );
        let err = Registration::try_from(pb::RegisterRequest {
            config_json: "[1]".into(),
            advertise_host: "h".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("JSON object"), "{err}");
    }

    fn report_with(telemetry: StepTelemetry) -> StepReport {
        StepReport {
            worker_id: WorkerId(3),
            generation: 2,
            step: 7,
            rank: 1,
            local_patients: 4,
            losses: StepLosses::default(),
            param_checksum: 11,
            step_seconds: 1.5,
            data_wait_seconds: 0.25,
            checkpoint_dir: None,
            telemetry,
        }
    }

    #[test]
    fn step_telemetry_round_trips_and_a_bad_duration_names_its_field() {
        let telemetry = StepTelemetry {
            attack_gain: Some(-0.5),
            eps: 8.0 / 255.0,
            lr: 1e-4,
            attack_seconds: 0.75,
            allreduce_seconds: 0.125,
            patches: 96,
        };
        let report = report_with(telemetry);
        let back = StepReport::try_from(pb::StepReport::from(report.clone())).unwrap();
        assert_eq!(back, report);
        // An older worker sends no telemetry: zeros, not a refusal.
        let mut wire = pb::StepReport::from(report.clone());
        wire.telemetry = None;
        let back = StepReport::try_from(wire).unwrap();
        assert_eq!(back.telemetry, StepTelemetry::default());
        let mut wire = pb::StepReport::from(report);
        if let Some(t) = wire.telemetry.as_mut() {
            t.attack_seconds = f64::NAN;
        }
        let err = StepReport::try_from(wire).unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidArgument(m) if m.contains("telemetry.attack_seconds")),
            "{err}"
        );
    }
}
