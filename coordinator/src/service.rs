//! The async shell around the [`Scheduler`]: gRPC handlers feed events into it and
//! carry out its actions (reply, ledger, waking long polls); a timer feeds lease
//! ticks; [`serve`] runs the job until it ends or `shutdown` fires, then drains.
//!
//! The scheduler sits behind a std mutex: every event is a few microseconds of pure
//! work and nothing awaits while holding it. Ledger lines are queued under the lock
//! (so they keep commit order) and written by the ledger thread.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hsat_proto::domain::{
    Assignment, AssignmentRequest, HeartbeatReply, JobStatus, LevelLosses, Registered,
    Registration, StepReport, WorkerId,
};
use hsat_proto::server::{CoordinatorHandler, Limits, ServerOptions, routes};
use hsat_proto::{ApiError, HSAT_VERSION, StorePublication};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::instrument;

use crate::checkpoints::{self, Retention};
use crate::durable::{self, JobStart, StartMode};
use crate::identity::JobIdentity;
use crate::ledger::{self, EndOutcome, EndRecord, LedgerWriter};
use crate::metrics::{CoordinatorMetrics, RefusalReason};
use crate::scheduler::{
    Action, CheckpointCheck, CheckpointWait, ClusterSettings, Event, LedgerEntry, Reply, Scheduler,
};
use crate::{CoordinatorError, Job};

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Every step committed.
    Finished,
    /// The job failed (checksum mismatch, ...); the message says why.
    Failed(String),
    /// Stopped by the shutdown signal before it finished (preemption): issued steps
    /// were drained and, when the grace allowed, a checkpoint of the last committed
    /// step exists ([`JobOutcome::last_checkpoint`]). The job can be resumed.
    Cancelled(String),
}

/// The end of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// How it ended.
    pub kind: OutcomeKind,
    /// Committed steps.
    pub committed_steps: u64,
    /// Steps of the job.
    pub total_steps: u64,
    /// The newest checkpoint rank 0 reported, or the one written for the shutdown.
    pub last_checkpoint: Option<PathBuf>,
    /// The ledger file.
    pub ledger: PathBuf,
    /// The job's id (ledger header).
    pub job_id: String,
    /// The job had finished before this coordinator started: nothing was trained
    /// and the ledger was left untouched.
    pub already_finished: bool,
}

impl JobOutcome {
    /// Every step committed.
    pub fn is_success(&self) -> bool {
        self.kind == OutcomeKind::Finished
    }
}

/// The exit status of a job's end ([`hsat_core::exit`]): finished 0, failed 1,
/// cancelled (SIGTERM, every worker gone in `hsat run --workers`) 75: the job is
/// not over and a restarted coordinator resumes it.
impl hsat_core::exit::ExitClass for JobOutcome {
    fn exit(&self) -> hsat_core::exit::Exit {
        match self.kind {
            OutcomeKind::Finished => hsat_core::exit::Exit::Success,
            OutcomeKind::Failed(_) => hsat_core::exit::Exit::Failed,
            OutcomeKind::Cancelled(_) => hsat_core::exit::Exit::Retryable,
        }
    }
}

struct Shared {
    scheduler: Mutex<Scheduler>,
    wake: Notify,
    /// `None` for a job that had already finished (its ledger stays untouched).
    ledger: Option<LedgerWriter>,
    started: Instant,
    long_poll: Duration,
    /// Where checkpoints go and how many to keep.
    checkpoint_root: PathBuf,
    retention: Retention,
    metrics: Arc<CoordinatorMetrics>,
    /// `<out_dir>/metrics.jsonl`, appended to on the ledger thread.
    metrics_log: Option<Arc<Mutex<hsat_metrics::MetricsLog>>>,
    /// What a registration must match (to tell why one was refused).
    identity: JobIdentity,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Scheduler> {
        // A panic while holding the lock leaves a scheduler that is still
        // consistent data; keep serving.
        self.scheduler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds `event` to the scheduler and carries out its actions; returns the reply.
    fn apply(&self, event: Event) -> Option<Reply> {
        let now = self.started.elapsed();
        let mut wake = false;
        let mut reply = None;
        {
            let mut scheduler = self.lock();
            for action in scheduler.on_event(event, now) {
                match action {
                    Action::Reply(r) => reply = Some(r),
                    Action::Wake => wake = true,
                    Action::Commit(entry) => {
                        self.append(&ledger_record(&entry));
                        tracing::info!("{}", progress_line(&entry));
                        self.metrics.on_commit(&entry);
                        self.append_metrics_line(&entry);
                    }
                    Action::Rollback {
                        to_step,
                        checkpoint,
                    } => {
                        self.append(&ledger::rollback_record(to_step, checkpoint.as_deref()));
                    }
                    Action::Checkpoint { step, dir } => {
                        self.metrics
                            .on_checkpoint(step, std::time::SystemTime::now());
                        self.append(&ledger::checkpoint_record(step, &dir));
                        self.apply_retention(scheduler.committed());
                    }
                }
            }
        }
        if wake {
            self.wake.notify_waiters();
        }
        reply
    }

    fn append(&self, record: &serde_json::Value) {
        if let Some(ledger) = &self.ledger {
            ledger.append(record);
        }
    }

    /// Queues the step's `metrics.jsonl` line behind its ledger line (the ledger
    /// thread writes both, in commit order, off the async threads).
    fn append_metrics_line(&self, entry: &LedgerEntry) {
        let (Some(ledger), Some(log)) = (&self.ledger, &self.metrics_log) else {
            return;
        };
        let record = crate::metrics::step_record(entry);
        let log = Arc::clone(log);
        ledger.after_writes(Box::new(move || {
            let mut log = log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(err) = log.append(&record) {
                tracing::warn!(error = %err, step = record.step, "cannot append to metrics.jsonl");
            }
        }));
    }

    /// Why `registration` was refused, for `hsat_registrations_refused_total`.
    fn refusal_reason(&self, registration: &Registration) -> RefusalReason {
        if registration.hsat_version != self.identity.hsat_version {
            RefusalReason::Version
        } else if !hsat_core::config::config_differences(
            &registration.config,
            &self.identity.config,
        )
        .is_empty()
        {
            RefusalReason::Config
        } else if registration.dataset_fingerprint != self.identity.dataset_fingerprint {
            RefusalReason::Dataset
        } else if matches!(
            self.lock().metrics_view(self.started.elapsed()).phase,
            crate::scheduler::JobPhase::Finished
                | crate::scheduler::JobPhase::Failed
                | crate::scheduler::JobPhase::Finishing
        ) {
            RefusalReason::JobFinished
        } else {
            RefusalReason::Other
        }
    }

    /// Deletes old checkpoints on the ledger thread (after the records queued so
    /// far are written), keeping what a rollback from `committed` would need.
    fn apply_retention(&self, committed: u64) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let root = self.checkpoint_root.clone();
        let retention = self.retention;
        ledger.after_writes(Box::new(move || retain(&root, retention, committed)));
    }
}

/// Retention: deletes the checkpoints under `root` that
/// [`checkpoints::to_delete`] names, protecting the newest one at or before
/// `committed` that verifies (the one a rollback would load) and every one after
/// `committed` (not yet backed by a commit).
fn retain(root: &std::path::Path, retention: Retention, committed: u64) {
    let found = checkpoints::list(root);
    let mut protect: Vec<u64> = found
        .iter()
        .map(|(step, _)| *step)
        .filter(|&step| step > committed)
        .collect();
    if let Some((step, _)) = found
        .iter()
        .rev()
        .filter(|(step, _)| *step <= committed)
        .find(|(_, dir)| checkpoints::verify(dir).is_ok())
    {
        protect.push(*step);
    }
    let steps: Vec<u64> = found.iter().map(|(step, _)| *step).collect();
    for step in checkpoints::to_delete(&steps, retention, &protect) {
        let Some((_, dir)) = found.iter().find(|(s, _)| *s == step) else {
            continue;
        };
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {
                tracing::info!(checkpoint = %dir.display(), "retention: deleted an old checkpoint")
            }
            Err(err) => {
                tracing::warn!(checkpoint = %dir.display(), error = %err, "retention: cannot delete an old checkpoint")
            }
        }
    }
}

/// The retention policy of a config: `training.keep_checkpoints` (default 3) and
/// `training.keep_checkpoint_every` (default 0), read from the config's JSON so
/// that it works whatever the config type holds.
fn retention_of(config: &serde_json::Value) -> Retention {
    let training = &config["training"];
    Retention {
        keep_last: training["keep_checkpoints"].as_u64().unwrap_or(3) as usize,
        keep_every: training["keep_checkpoint_every"].as_u64().unwrap_or(0),
    }
}

fn ledger_record(entry: &LedgerEntry) -> serde_json::Value {
    let mut record = serde_json::to_value(entry).unwrap_or_default();
    if let Some(object) = record.as_object_mut() {
        object.insert("kind".into(), "commit".into());
        if let Some(losses) = &entry.losses {
            object.insert("loss".into(), serde_json::json!(losses.total));
        }
    }
    record
}

/// `step 3/12 epoch 0 gen 1 world 2 | loss 5.1234 (clean: patient 1.1 slide 1.2 patch 1.3) | step 1.234 s`
fn progress_line(entry: &LedgerEntry) -> String {
    let levels = |name: &str, l: &LevelLosses| {
        format!(
            "{name}: patient {:.4} slide {:.4} patch {:.4}",
            l.patient, l.slide, l.patch
        )
    };
    let mut line = format!(
        "step {}/{} epoch {} gen {} world {}",
        entry.step + 1,
        entry.total_steps,
        entry.epoch,
        entry.generation,
        entry.ranks.len()
    );
    if let Some(losses) = &entry.losses {
        let mut parts = Vec::new();
        if let Some(adv) = &losses.adversarial {
            parts.push(levels("adv", adv));
        }
        if let Some(clean) = &losses.clean {
            parts.push(levels("clean", clean));
        }
        line.push_str(&format!(
            " | loss {:.4} ({})",
            losses.total,
            parts.join("; ")
        ));
    }
    line.push_str(&format!(" | step {:.3} s", entry.step_seconds));
    if entry.recovered {
        line.push_str(" | recovered at regroup");
    }
    line
}

fn expect<T>(reply: Option<Reply>, pick: impl FnOnce(Reply) -> Option<T>) -> Result<T, ApiError> {
    match reply {
        Some(Reply::Error(err)) => Err(err),
        Some(reply) => pick(reply)
            .ok_or_else(|| ApiError::Internal("the scheduler gave the wrong kind of reply".into())),
        None => Err(ApiError::Internal("the scheduler gave no reply".into())),
    }
}

struct Handler(Arc<Shared>);

impl CoordinatorHandler for Handler {
    #[instrument(level = "debug", skip_all, fields(name = %registration.worker_name))]
    async fn register(
        &self,
        registration: Registration,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Registered, ApiError> {
        let worker = registration.worker_name.clone();
        let advertised = registration.advertise_host.clone();
        let peer = peer.map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
        let presented = registration.clone();
        let result = expect(self.0.apply(Event::Register(registration)), |r| match r {
            Reply::Registered(r) => Some(r),
            _ => None,
        });
        if let Err(ApiError::Refused(_)) = &result {
            self.0.metrics.refused(self.0.refusal_reason(&presented));
        }
        // Operators see who was turned away and why here; the worker only prints it
        // on its own machine. `peer` is where the request came from, `advertised` the
        // host the worker says other ranks reach it at.
        if let Err(ApiError::Refused(reason)) = &result {
            tracing::warn!(%worker, %peer, %advertised, %reason, "registration refused");
        }
        result
    }

    #[instrument(level = "debug", skip_all, fields(worker = worker.0))]
    async fn heartbeat(&self, worker: WorkerId) -> Result<HeartbeatReply, ApiError> {
        expect(self.0.apply(Event::Heartbeat(worker)), |r| match r {
            Reply::Heartbeat(r) => Some(r),
            _ => None,
        })
    }

    #[instrument(level = "debug", skip_all, fields(worker = request.worker_id.0, want = request.want_step))]
    async fn next_assignment(&self, request: AssignmentRequest) -> Result<Assignment, ApiError> {
        let deadline = Instant::now() + self.0.long_poll;
        loop {
            let notified = self.0.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let assignment = expect(
                self.0.apply(Event::Assignment(request.clone())),
                |r| match r {
                    Reply::Assignment(a) => Some(a),
                    _ => None,
                },
            )?;
            if !matches!(assignment, Assignment::Wait { .. }) || Instant::now() >= deadline {
                return Ok(assignment);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // One last look after the long poll ran out.
                continue;
            }
        }
    }

    #[instrument(level = "debug", skip_all, fields(worker = publication.worker_id.0, port = publication.port))]
    async fn publish_store(&self, publication: StorePublication) -> Result<(), ApiError> {
        expect(self.0.apply(Event::PublishStore(publication)), |r| {
            matches!(r, Reply::Done).then_some(())
        })
    }

    #[instrument(level = "debug", skip_all, fields(worker = report.worker_id.0, step = report.step))]
    async fn report_step(&self, report: StepReport) -> Result<(), ApiError> {
        expect(self.0.apply(Event::Report(report)), |r| {
            matches!(r, Reply::Done).then_some(())
        })
    }

    #[instrument(level = "debug", skip_all, fields(worker = worker.0))]
    async fn leave(&self, worker: WorkerId, reason: String) -> Result<(), ApiError> {
        expect(self.0.apply(Event::Leave(worker, reason)), |r| {
            matches!(r, Reply::Done).then_some(())
        })
    }

    #[instrument(level = "debug", skip_all)]
    async fn status(&self) -> Result<JobStatus, ApiError> {
        expect(self.0.apply(Event::Status), |r| match r {
            Reply::Status(s) => Some(s),
            _ => None,
        })
    }
}

/// Serves `routes` on `listener` with `limits` (request timeout, global
/// concurrency limit), `tls` and the RPC metrics layer (outermost, so calls refused
/// by the limits or authentication are counted too) until `shutdown` completes.
async fn serve_routes(
    routes: tonic::service::Routes,
    limits: Limits,
    tls: Option<tonic::transport::ServerTlsConfig>,
    rpc_metrics: hsat_metrics::rpc::RpcMetricsLayer,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .tcp_nodelay(true)
        .timeout(limits.request_timeout)
        .layer(rpc_metrics)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrent_requests.max(1),
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

/// What a coordinator serves between binding its port and having its job ready
/// (indexing the dataset, reading the ledger): `grpc.health.v1` answers
/// NOT_SERVING, so a Kubernetes `startupProbe` sees a live process that is not
/// ready yet (instead of a refused connection, or a liveness probe killing it
/// mid-index), and every `hsat.v1` call gets UNAVAILABLE, which workers retry.
///
/// It serves a clone of the job's listening socket; [`StartingServer::stop`]
/// closes its clone, and connections that arrive meanwhile wait in the socket's
/// backlog for [`serve_job_with`].
pub struct StartingServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts the [`StartingServer`] on `listener` (a clone of the job's socket) with
/// the job's authentication, limits, TLS and RPC metrics.
pub async fn serve_starting(
    listener: TcpListener,
    server: &ServerOptions,
    metrics: &Arc<CoordinatorMetrics>,
) -> StartingServer {
    let (routes, health) =
        routes(Arc::new(Starting), Arc::clone(&server.auth), server.limits).await;
    health.set_serving(false).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_routes(
        routes,
        server.limits,
        server.tls.clone(),
        metrics.rpc().layer(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    StartingServer { stop, task }
}

impl StartingServer {
    /// Stops answering: the in-flight calls (health checks, refused `hsat.v1`
    /// calls) end, clients reconnect to the job's server. Bounded: a client that
    /// keeps its connection open does not hold the start back.
    pub async fn stop(self) {
        let StartingServer { stop, mut task } = self;
        let _ = stop.send(());
        match tokio::time::timeout(Duration::from_secs(2), &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "the start-up server failed"),
            Ok(Err(err)) => tracing::warn!(error = %err, "the start-up server panicked"),
            Err(_) => task.abort(),
        }
    }
}

/// The handler of the [`StartingServer`]: not ready for anything yet.
struct Starting;

impl Starting {
    fn not_yet<T>() -> Result<T, ApiError> {
        Err(ApiError::Unavailable(
            "the coordinator is starting (indexing the dataset, reading the ledger); try again shortly"
                .to_owned(),
        ))
    }
}

impl CoordinatorHandler for Starting {
    async fn register(
        &self,
        _: Registration,
        _: Option<std::net::SocketAddr>,
    ) -> Result<Registered, ApiError> {
        Self::not_yet()
    }
    async fn heartbeat(&self, _: WorkerId) -> Result<HeartbeatReply, ApiError> {
        Self::not_yet()
    }
    async fn next_assignment(&self, _: AssignmentRequest) -> Result<Assignment, ApiError> {
        Self::not_yet()
    }
    async fn publish_store(&self, _: StorePublication) -> Result<(), ApiError> {
        Self::not_yet()
    }
    async fn report_step(&self, _: StepReport) -> Result<(), ApiError> {
        Self::not_yet()
    }
    async fn leave(&self, _: WorkerId, _: String) -> Result<(), ApiError> {
        Self::not_yet()
    }
    async fn status(&self) -> Result<JobStatus, ApiError> {
        Self::not_yet()
    }
}

/// [`serve_job`] of the job in `job`'s `out_dir` as [`StartMode::Auto`] finds it:
/// a new job, the same job resumed, or a finished job reported.
pub async fn serve(
    job: Job,
    settings: ClusterSettings,
    server: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobOutcome, CoordinatorError> {
    let start = durable::prepare(&job, StartMode::Auto)?;
    serve_job(job, start, settings, server, listener, shutdown).await
}

/// [`serve_job_with`] with metrics nobody serves (`metrics.jsonl` is still written).
pub async fn serve_job(
    job: Job,
    start: JobStart,
    settings: ClusterSettings,
    server: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobOutcome, CoordinatorError> {
    let metrics = Arc::new(CoordinatorMetrics::new());
    serve_job_with(job, start, settings, server, listener, metrics, shutdown).await
}

/// Runs `job` on `listener` until every step is committed (or the job fails) and
/// every worker was told to stop, or until `shutdown` completes; then drains: the
/// health service turns NOT_SERVING, workers get `Stop`, and the server waits up to
/// `settings.shutdown_grace` for them before it returns.
///
/// `start` ([`durable::prepare`]) says whether the job is new, resumed or already
/// finished. A finished job trains nothing and leaves its ledger untouched: the
/// coordinator answers for `shutdown_grace` (workers that register get
/// `Stop { success: true }`) and returns `Finished`.
///
/// The ledger goes to `<out_dir>/coordinator/ledger.jsonl`, one line per committed
/// step to `<out_dir>/metrics.jsonl` (started over for a new job, appended to for a
/// resumed one); `metrics` are kept current (serve them with
/// [`hsat_metrics::MetricsServer`]).
pub async fn serve_job_with(
    job: Job,
    start: JobStart,
    settings: ClusterSettings,
    server: ServerOptions,
    listener: TcpListener,
    metrics: Arc<CoordinatorMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobOutcome, CoordinatorError> {
    settings.validate().map_err(CoordinatorError::Settings)?;
    let identity = JobIdentity {
        config: job.config.to_json_value(),
        dataset_fingerprint: job.dataset_fingerprint().to_owned(),
        hsat_version: HSAT_VERSION.to_owned(),
    };
    let ledger_path = job.coordinator_dir().join(ledger::LEDGER_FILE);
    let checkpoint_root = checkpoints::root(&job.config.infra.out_dir);
    let retention = retention_of(&identity.config);
    let check = CheckpointCheck::new(checkpoints::verify);
    let total_steps = job.plan.total_steps;
    let (steps_per_epoch, patients_per_step) = (job.plan.steps_per_epoch, job.plan.batch_size);
    let out_dir = job.config.infra.out_dir.clone();
    let job_identity = identity.clone();
    let new_job = matches!(start, JobStart::New { .. });
    let (scheduler, ledger, job_id, already_finished) = match start {
        JobStart::New { header } => {
            let ledger = LedgerWriter::open(&job.coordinator_dir(), Some(0))?;
            ledger.append(&ledger::header_record(&header));
            ledger.append(&ledger::start_record(0, None, 0));
            tracing::info!(job = %header.job_id, "starting a new job");
            let scheduler =
                Scheduler::new(settings.clone(), job.plan, identity).with_checkpoint_check(check);
            (scheduler, Some(ledger), header.job_id, false)
        }
        JobStart::Resume {
            header,
            state,
            restored,
        } => {
            let ledger = LedgerWriter::open(&job.coordinator_dir(), Some(state.valid_len))?;
            let checkpoint = restored
                .checkpoints
                .range(..=restored.committed)
                .next_back()
                .map(|(_, dir)| dir.clone());
            tracing::info!(
                "resuming job {} at step {} (checkpoint {})",
                header.job_id,
                restored.committed,
                checkpoint
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |d| d.display().to_string())
            );
            ledger.append(&ledger::start_record(
                restored.committed,
                checkpoint.as_deref(),
                restored.incarnation,
            ));
            let scheduler = Scheduler::resume(settings.clone(), job.plan, identity, restored)
                .with_checkpoint_check(check);
            (scheduler, Some(ledger), header.job_id, false)
        }
        JobStart::Finished { header, state } => {
            tracing::info!(
                "job {} already finished ({} steps committed): nothing to train; the ledger is left as it is",
                header.job_id,
                state.committed
            );
            let restored = durable::restored_job(&state, &checkpoint_root);
            let scheduler = Scheduler::resume(settings.clone(), job.plan, identity, restored);
            (scheduler, None, header.job_id, true)
        }
    };
    let address = listener.local_addr().ok();
    let authenticated = server.auth.is_enabled();
    let tls_on = server.tls.is_some();
    let metrics_log = ledger.as_ref().and_then(|_| {
        let opened = if new_job {
            hsat_metrics::MetricsLog::start_over(&out_dir)
        } else {
            hsat_metrics::MetricsLog::open(&out_dir)
        };
        opened
            .map_err(|err| tracing::warn!(error = %err, "metrics.jsonl will not be written"))
            .ok()
            .map(|log| Arc::new(Mutex::new(log)))
    });
    if let Some((step, dir)) = checkpoints::list(&checkpoint_root).into_iter().next_back()
        && let Ok(written) = std::fs::metadata(&dir).and_then(|m| m.modified())
    {
        metrics.on_checkpoint(step, written);
    }
    let shared = Arc::new(Shared {
        scheduler: Mutex::new(scheduler),
        wake: Notify::new(),
        ledger,
        started: Instant::now(),
        long_poll: settings.long_poll,
        checkpoint_root: checkpoint_root.clone(),
        retention,
        metrics: Arc::clone(&metrics),
        metrics_log,
        identity: job_identity,
    });
    metrics.set_view(&shared.lock().metrics_view(shared.started.elapsed()));
    let ServerOptions { auth, limits, tls } = server;
    let (routes, health) = routes(Arc::new(Handler(Arc::clone(&shared))), auth, limits).await;
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(serve_routes(
        routes,
        limits,
        tls,
        metrics.rpc().layer(),
        listener,
        async {
            let _ = server_stopped.await;
        },
    ));
    // After the health service turned SERVING and the server took the socket:
    // whoever waits for this line (a test, an operator) can call the job now.
    tracing::info!(
        address = ?address,
        total_steps,
        steps_per_epoch,
        patients_per_step,
        expected_workers = settings.expected_workers,
        authenticated,
        tls = tls_on,
        "coordinator ready: serving the job"
    );
    let tick_every = (settings.heartbeat / 2).min(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(tick_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut cancelled: Option<String> = None;
    let mut shutdown_at: Option<Instant> = None;
    let mut ended_at: Option<Instant> = None;
    let mut server_error = None;
    let mut stop_checkpoint = StopCheckpoint::default();
    loop {
        tokio::select! {
            () = &mut shutdown, if cancelled.is_none() => {
                let reason = "the coordinator was asked to shut down".to_owned();
                tracing::warn!(
                    grace_s = settings.shutdown_grace.as_secs_f64(),
                    "shutdown requested: issuing no new steps, draining, then checkpointing the last committed step"
                );
                health.set_serving(false).await;
                shutdown_at = Some(Instant::now());
                cancelled = Some(reason.clone());
                shared.apply(Event::Shutdown(reason));
            }
            _ = ticker.tick() => {
                shared.apply(Event::Tick);
                metrics.set_view(&shared.lock().metrics_view(shared.started.elapsed()));
            }
            result = &mut server => {
                server_error = Some(match result {
                    Ok(Ok(())) => "the server stopped unexpectedly".to_owned(),
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                });
                break;
            }
        }
        let (terminal, done, wait) = {
            let scheduler = shared.lock();
            (
                scheduler.failure().is_some()
                    || scheduler.state() == hsat_proto::domain::JobState::Finished,
                scheduler.is_done(shared.started.elapsed()),
                scheduler.checkpoint_wait(),
            )
        };
        let settled = stop_checkpoint.settle(wait, &checkpoint_root).await;
        if terminal {
            ended_at.get_or_insert_with(Instant::now);
        }
        // A job that finished before this start stays up for the grace period so
        // restarted workers hear `Stop { success: true }`.
        if terminal && done && settled && !already_finished {
            break;
        }
        // The grace runs from the signal (a shutdown) or from the job's end.
        if let Some(since) = shutdown_at.or(ended_at)
            && since.elapsed() >= settings.shutdown_grace
        {
            if !already_finished {
                tracing::warn!(
                    grace_s = settings.shutdown_grace.as_secs_f64(),
                    still = %describe_unsettled(terminal, done, wait),
                    "the shutdown grace is over; exiting anyway"
                );
            }
            break;
        }
    }
    health.set_serving(false).await;
    let _ = stop_server.send(());
    // In-flight calls (a held long poll at most) get what is left of a shutdown's
    // grace, between 0.5 and 5 s, so the process exits within the grace.
    let stop_within = shutdown_at.map_or(Duration::from_secs(5), |since| {
        settings
            .shutdown_grace
            .saturating_sub(since.elapsed())
            .clamp(Duration::from_millis(500), Duration::from_secs(5))
    });
    if server_error.is_none()
        && tokio::time::timeout(stop_within, &mut server)
            .await
            .is_err()
    {
        tracing::warn!(
            within_s = stop_within.as_secs_f64(),
            "the gRPC server did not stop in time"
        );
        server.abort();
    }
    let (kind, committed_steps, last_checkpoint) = {
        let scheduler = shared.lock();
        metrics.set_view(&scheduler.metrics_view(shared.started.elapsed()));
        let kind = match (scheduler.state(), scheduler.failure(), &cancelled) {
            (hsat_proto::domain::JobState::Finished, _, _) => OutcomeKind::Finished,
            (_, _, Some(reason)) => OutcomeKind::Cancelled(reason.clone()),
            (_, Some(message), None) => OutcomeKind::Failed(message.to_owned()),
            _ => OutcomeKind::Failed("the server stopped".to_owned()),
        };
        let reported = scheduler.latest_checkpoint().map(|(dir, _)| dir.clone());
        (
            kind,
            scheduler.committed(),
            stop_checkpoint.verified.clone().or(reported),
        )
    };
    let end = EndRecord {
        outcome: match &kind {
            OutcomeKind::Finished => EndOutcome::Finished,
            OutcomeKind::Failed(_) => EndOutcome::Failed,
            OutcomeKind::Cancelled(_) => EndOutcome::Cancelled,
        },
        reason: match &kind {
            OutcomeKind::Finished => String::new(),
            OutcomeKind::Failed(m) | OutcomeKind::Cancelled(m) => m.clone(),
        },
        committed: committed_steps,
    };
    shared.append(&ledger::end_record(&end));
    let shared = Arc::into_inner(shared);
    if let Some(ledger) = shared.and_then(|shared| shared.ledger) {
        ledger.close()?;
    }
    if let Some(message) = server_error {
        return Err(CoordinatorError::Server(message));
    }
    match &kind {
        OutcomeKind::Finished => tracing::info!(committed_steps, "job finished"),
        OutcomeKind::Failed(m) => tracing::error!(committed_steps, "job failed: {m}"),
        OutcomeKind::Cancelled(m) => tracing::warn!(committed_steps, "job cancelled: {m}"),
    }
    Ok(JobOutcome {
        kind,
        committed_steps,
        total_steps,
        last_checkpoint,
        ledger: ledger_path,
        job_id,
        already_finished,
    })
}

/// The shell's side of a shutdown's checkpoint: verifying on disk the checkpoint the
/// scheduler asked a worker to write ([`CheckpointWait`]).
#[derive(Debug, Default)]
struct StopCheckpoint {
    /// The verified checkpoint directory.
    verified: Option<PathBuf>,
    /// Failed verifications of the written checkpoint so far.
    failures: u32,
    /// Gave up (logged once).
    given_up: bool,
    last_check: Option<Instant>,
}

/// Verifications of a written checkpoint before giving up (the writer has left: a
/// checkpoint that does not verify now will not later, but a shared volume may show
/// the rename with a small delay).
const VERIFY_ATTEMPTS: u32 = 5;

impl StopCheckpoint {
    /// Whether nothing about the checkpoint is left to wait for; verifies a written
    /// one (off the async threads: it hashes every file).
    async fn settle(&mut self, wait: CheckpointWait, root: &std::path::Path) -> bool {
        match wait {
            CheckpointWait::Nothing => true,
            CheckpointWait::Draining | CheckpointWait::Writing { .. } => false,
            CheckpointWait::Unavailable { step } => {
                if !self.given_up {
                    self.given_up = true;
                    tracing::warn!(
                        step,
                        "no live worker holds the last committed step: no checkpoint of it was written; \
                         the job will resume from the newest earlier checkpoint"
                    );
                }
                true
            }
            CheckpointWait::Written { step } => {
                if self.verified.is_some() || self.given_up {
                    return true;
                }
                if self
                    .last_check
                    .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
                {
                    return false;
                }
                self.last_check = Some(Instant::now());
                let dir = root.join(hsat_core::checkpoint::checkpoint_dir_name(step));
                let checked = dir.clone();
                let result =
                    tokio::task::spawn_blocking(move || hsat_core::checkpoint::verify(&checked))
                        .await;
                match result {
                    Ok(Ok(_)) => {
                        tracing::info!(
                            step,
                            checkpoint = %dir.display(),
                            "the checkpoint of the last committed step is written and verifies"
                        );
                        self.verified = Some(dir);
                        true
                    }
                    Ok(Err(err)) => {
                        self.failures += 1;
                        if self.failures >= VERIFY_ATTEMPTS {
                            self.given_up = true;
                            tracing::warn!(
                                step,
                                checkpoint = %dir.display(),
                                error = %err,
                                "the checkpoint of the last committed step does not verify; the job \
                                 will resume from the newest earlier checkpoint"
                            );
                            return true;
                        }
                        false
                    }
                    Err(join) => {
                        self.given_up = true;
                        tracing::warn!(error = %join, "checking the shutdown checkpoint failed");
                        true
                    }
                }
            }
        }
    }
}

/// What a coordinator cut short by its grace was still waiting for.
fn describe_unsettled(terminal: bool, done: bool, wait: CheckpointWait) -> String {
    match wait {
        CheckpointWait::Draining => "issued steps had not committed".to_owned(),
        CheckpointWait::Writing { step } => {
            format!("the checkpoint of step {step} was not written yet")
        }
        CheckpointWait::Written { step } => {
            format!("the checkpoint of step {step} did not verify yet")
        }
        _ if !terminal => "the job had not ended".to_owned(),
        _ if !done => "not every worker got its stop".to_owned(),
        _ => "nothing".to_owned(),
    }
}
