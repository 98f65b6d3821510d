//! Simulated workers (feature `sim`): the real worker protocol
//! ([`hsat_proto::worker_protocol`]) over real gRPC, with fake training: no
//! libtorch, instant steps unless the hooks pace them, a deterministic checksum
//! every rank agrees on. The coordinator's in-process harness and
//! `hsat bench control-plane` both run these; what differs between them (how the
//! collective is modelled, pacing, latency recording, crashing) is a [`SimHooks`].
//!
//! Like the real worker, a simulated worker answered `UnknownWorker` (its
//! coordinator restarted) registers again and keeps its "model" (the steps it
//! holds and their checksums).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsat_proto::ApiError;
use hsat_proto::client::CoordinatorClient;
use hsat_proto::domain::{
    AssignmentRequest, GroupAssignment, LevelLosses, Registration, StepLosses, StepTelemetry,
    StoreRole, TrainAssignment, WorkerId,
};
use hsat_proto::retry::{Backoff, RetryError, retry};
use hsat_proto::worker_protocol::{Action, Event, ProtocolError, StepOutcome, WorkerProtocol};

/// The port a simulated rank 0 publishes for its (nonexistent) store.
pub const FAKE_STORE_PORT: u16 = 29500;

/// The parameter checksum of a simulated step: equal on every rank, as real
/// replicas' are.
pub fn fake_checksum(step: u64) -> u64 {
    0xfeed + step
}

/// The losses a simulated step reports (falling with the step, like training).
pub fn fake_losses(step: u64) -> StepLosses {
    StepLosses {
        total: 1.0 / (1.0 + step as f64),
        clean: Some(LevelLosses {
            patient: 0.1,
            slide: 0.2,
            patch: 0.3,
            total: 0.6,
        }),
        adversarial: None,
    }
}

/// The telemetry a simulated step reports: a fixed attack gain, eps and lr, and
/// one patch per patient.
pub fn fake_telemetry(patients: u64) -> StepTelemetry {
    StepTelemetry {
        attack_gain: Some(0.5),
        eps: 8.0 / 255.0,
        lr: 1e-3,
        attack_seconds: 0.0,
        allreduce_seconds: 0.0,
        patches: patients,
    }
}

/// How a simulated "training" step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimStep {
    /// The update was applied: report it.
    Trained,
    /// The collective failed (a peer is gone): tell the coordinator.
    CollectiveFailed(String),
    /// The worker dies on the spot: no report, no leave, no more heartbeats.
    Crash,
}

/// A control-plane call a simulated worker made successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `register`.
    Register,
    /// `heartbeat`.
    Heartbeat,
    /// `next_assignment`; `waited`: the answer was `Wait`.
    Ask {
        /// The answer was `Wait`.
        waited: bool,
    },
    /// `report_step`.
    Report,
}

/// Who a simulated step trains for.
#[derive(Debug, Clone, Copy)]
pub struct SimContext<'a> {
    /// The connection (a modelled collective may heartbeat over it).
    pub client: &'a CoordinatorClient,
    /// The worker's id.
    pub worker: WorkerId,
    /// Its generation.
    pub group: &'a GroupAssignment,
}

/// What makes one simulation differ from another.
pub trait SimHooks: Send + Sync + 'static {
    /// "Trains" `step`: models the collective and paces the step.
    fn train(
        &self,
        context: SimContext<'_>,
        step: &TrainAssignment,
    ) -> impl Future<Output = SimStep> + Send;

    /// Called before each `next_assignment` (to pace requests).
    fn before_ask(&self, _request: &AssignmentRequest) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// A call that succeeded, begun at `begun` (to record latencies).
    fn observe(&self, _rpc: Rpc, _begun: Instant) {}

    /// How long after registering the first heartbeat goes out (spreads many
    /// workers' heartbeats over the period); default: one period.
    fn first_heartbeat(&self, _worker: WorkerId, period: Duration) -> Duration {
        period
    }
}

/// How a simulated worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimExit {
    /// The coordinator said stop.
    Stopped {
        /// The job finished.
        success: bool,
        /// The coordinator's reason.
        reason: String,
    },
    /// [`SimStep::Crash`] killed it.
    Crashed,
}

/// Why a simulated worker failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A call to the coordinator failed.
    #[error("simulated worker cannot {action}: {source}")]
    Rpc {
        /// What it tried.
        action: &'static str,
        /// The coordinator's error.
        #[source]
        source: ApiError,
    },
    /// The coordinator broke the protocol.
    #[error("simulated worker: {0}")]
    Protocol(#[from] ProtocolError),
}

impl SimError {
    /// The coordinator's error, if a call failed.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Rpc { source, .. } => Some(source),
            Self::Protocol(_) => None,
        }
    }
}

fn rpc(action: &'static str) -> impl FnOnce(ApiError) -> SimError {
    move |source| SimError::Rpc { action, source }
}

/// How long a simulated worker retries a call failing with a retryable error (its
/// coordinator restarting or unreachable), as the real worker does.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// `call`, retried with backoff while it fails with a retryable error.
async fn call<T, F, Fut>(action: &'static str, call: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    retry(action, Backoff::until(RETRY_DEADLINE), call)
        .await
        .map_err(|err| match err {
            RetryError::Fatal(err) | RetryError::GaveUp { last: err, .. } => err,
        })
}

/// `Ok(Some(value))`, or `Ok(None)` when the coordinator does not know the worker
/// (it registers again), or the error.
fn known<T>(result: Result<T, ApiError>, action: &'static str) -> Result<Option<T>, SimError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(ApiError::UnknownWorker(_)) => Ok(None),
        Err(source) => Err(SimError::Rpc { action, source }),
    }
}

/// Heartbeats until the task is aborted or a heartbeat fails.
async fn heartbeat_loop<H: SimHooks>(
    client: CoordinatorClient,
    worker: WorkerId,
    period: Duration,
    hooks: Arc<H>,
) {
    tokio::time::sleep(hooks.first_heartbeat(worker, period)).await;
    loop {
        let begun = Instant::now();
        if client.heartbeat(worker).await.is_err() {
            return;
        }
        hooks.observe(Rpc::Heartbeat, begun);
        tokio::time::sleep(period).await;
    }
}

/// Runs one simulated worker until the coordinator says stop, a hook crashes it,
/// or a call fails.
pub async fn run_simulated_worker<H: SimHooks>(
    client: CoordinatorClient,
    registration: Registration,
    hooks: Arc<H>,
) -> Result<SimExit, SimError> {
    let mut protocol = WorkerProtocol::new(registration);
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    let exit = drive(&client, &mut protocol, &hooks, &mut heartbeat).await;
    if let Some(task) = heartbeat {
        task.abort();
    }
    if let (Ok(SimExit::Stopped { .. }), Some(worker)) = (&exit, protocol.worker_id()) {
        let _ = client.leave(worker, "done").await;
    }
    exit
}

async fn drive<H: SimHooks>(
    client: &CoordinatorClient,
    protocol: &mut WorkerProtocol,
    hooks: &Arc<H>,
    heartbeat: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<SimExit, SimError> {
    loop {
        let event = match protocol.next_action() {
            Action::Register(registration) => {
                let begun = Instant::now();
                let registered = call("register", || client.register(registration.clone()))
                    .await
                    .map_err(rpc("register"))?;
                hooks.observe(Rpc::Register, begun);
                if let Some(old) = heartbeat.take() {
                    old.abort();
                }
                *heartbeat = Some(tokio::spawn(heartbeat_loop(
                    client.clone(),
                    registered.worker_id,
                    registered.heartbeat,
                    Arc::clone(hooks),
                )));
                Event::Registered(registered)
            }
            Action::Ask(request) => {
                hooks.before_ask(&request).await;
                let begun = Instant::now();
                let asked = call("ask for work", || client.next_assignment(request.clone())).await;
                let Some(assignment) = known(asked, "ask for work")? else {
                    protocol.on_event(Event::Forgotten)?;
                    continue;
                };
                let waited = matches!(assignment, hsat_proto::domain::Assignment::Wait { .. });
                hooks.observe(Rpc::Ask { waited }, begun);
                Event::Assigned(assignment)
            }
            Action::FormGroup(group) => {
                if group.store == StoreRole::Host
                    && let Some(worker) = protocol.worker_id()
                {
                    let published = call("publish the rendezvous store", || {
                        client.publish_store(worker, group.generation, FAKE_STORE_PORT)
                    })
                    .await;
                    let published = known(published, "publish the rendezvous store")?;
                    if published.is_none() {
                        protocol.on_event(Event::Forgotten)?;
                        continue;
                    }
                }
                Event::GroupFormed {
                    generation: group.generation,
                }
            }
            Action::Train(step) => {
                let (Some(group), Some(worker)) = (protocol.group(), protocol.worker_id()) else {
                    // The protocol trains only as a formed member; let it say so.
                    protocol.on_event(Event::Trained(StepOutcome::default()))?;
                    continue;
                };
                let context = SimContext {
                    client,
                    worker,
                    group,
                };
                let begun = Instant::now();
                match hooks.train(context, &step).await {
                    SimStep::Trained => Event::Trained(StepOutcome {
                        local_patients: step.shard.len() as u64,
                        losses: fake_losses(step.step),
                        param_checksum: fake_checksum(step.step),
                        step_seconds: begun.elapsed().as_secs_f64(),
                        data_wait_seconds: 0.0,
                        checkpoint_dir: None,
                        telemetry: fake_telemetry(step.shard.len() as u64),
                    }),
                    SimStep::CollectiveFailed(error) => Event::CollectiveFailed { error },
                    SimStep::Crash => return Ok(SimExit::Crashed),
                }
            }
            Action::Report(report) => {
                let begun = Instant::now();
                let reported = call("report a step", || client.report_step(report.clone())).await;
                if known(reported, "report a step")?.is_none() {
                    protocol.on_event(Event::Forgotten)?;
                    continue;
                }
                hooks.observe(Rpc::Report, begun);
                Event::Reported
            }
            Action::Sleep(duration) => {
                tokio::time::sleep(duration).await;
                Event::Slept
            }
            Action::Stop {
                success, reason, ..
            } => return Ok(SimExit::Stopped { success, reason }),
        };
        protocol.on_event(event)?;
    }
}
