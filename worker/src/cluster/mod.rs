//! The worker process of a distributed job: it joins the coordinator, trains the
//! shards of the steps it is given, averages gradients with the other ranks of its
//! generation, and reports every step.
//!
//! ```text
//!   register ──> next_assignment ──┬─ Group  -> rendezvous (TCPStore, c10d group),
//!       ^             ^            │            broadcast root's state, new loader
//!       │             │            ├─ Train  -> feed the shard's plan to the loader
//!   heartbeats        │            │            (up to two steps ahead: loading of
//!   (own task)        │            │            step s+1 overlaps training of s)
//!                     │            ├─ Wait   -> train what is queued, or sleep
//!                     │            └─ Stop   -> (write the checkpoint asked for),
//!                     │                         leave, exit
//!                     └── train front step (train::distributed): PGD, loss,
//!                         backward, all-reduce, AdamW, sync BN or rank 0's BN
//!                         buffers, checksum, report
//! ```
//!
//! Training runs on the calling thread (libtorch work is blocking); RPCs go through
//! a small tokio runtime owned by [`run_worker`], with heartbeats on their own task so
//! a long step never loses the lease. A failed collective (a peer died or hung) drops
//! the group, its loader and the queued steps, and tells the coordinator, which forms
//! the next generation; the model keeps the last update it applied, which the
//! coordinator uses to pick the state everyone continues from.
//!
//! Shutdown (SIGTERM, the `shutdown` flag): the step being trained finishes (or is
//! abandoned when its collective fails), a trained step is still reported, then the
//! worker leaves. A coordinator that shuts down may ask, in the `Stop`, for a
//! checkpoint of the last committed step: the worker writes it before leaving.
//!
//! The protocol's rules (what to ask next, the lookahead, the group error, when to
//! stop prefetching) are [`hsat_proto::worker_protocol`]'s, shared with the
//! simulated workers; this module is its I/O shell. Every call to the coordinator
//! is retried with backoff while it fails with a retryable error (unreachable,
//! restarting, too slow), up to `WorkerOptions::rpc_retry_deadline`.
//!
//! Rank 0 writes the checkpoints: it copies the state to host memory at the step
//! boundary and writes it in the background (`training.async_checkpoints`) while
//! training goes on. A step report names a checkpoint only once its write completed
//! (the report of a later step, or of the last step, which waits for it), so the
//! coordinator never learns of a checkpoint that is not complete on disk; the
//! coordinator takes the checkpoint's step from its directory name.
//!
//! A coordinator that answers `UnknownWorker` (it was restarted, or it expired this
//! worker's lease) gets a new registration: the collective and the queued steps are
//! dropped, the model is kept, and the next check-in tells the coordinator the step
//! it holds and the checksums of its last steps, from which a restarted
//! coordinator continues the job without restarting any worker.
//!
//! - [`checksum`]: the parameter fingerprint sent with each report.
//! - [`device`]: `--device auto|cpu|cuda|cuda:N`, `HSAT_DEVICE`, `LOCAL_RANK`: which
//!   device a worker trains on.
//! - [`exit`]: the exit status each way a worker ends maps to.

pub mod checksum;
pub mod device;
pub mod exit;

use std::future::Future;
use std::net::{ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use hsat_core::config::Config;
use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::StepPlan;
use hsat_proto::ApiError;
use hsat_proto::client::CoordinatorClient;
use hsat_proto::domain::{
    Assignment, GroupAssignment, Registration, StoreRole, TrainAssignment, WorkerId,
};
use hsat_proto::retry::{Backoff, RetryError, retry};
use hsat_proto::worker_protocol::{Action, Event, LOOKAHEAD, StepOutcome, WorkerProtocol};
use tch::Device;
use tokio::runtime::Runtime;

use crate::checkpoint::CheckpointWriter;
use crate::checkpoint::writer::WriterOptions;
use crate::collective::{Backend, GradientSync, ProcessGroup, Store, broadcast_state};
use crate::data::{BatchSource, FileSource};
use crate::error::{Result, WorkerError};
use crate::metrics::WorkerMetrics;
use crate::train::distributed::{RankCollectives, train_rank_shard};
use crate::train::trainer::{ShardStep, Trainer};
use hsat_data::loader::LoaderSpec;

/// How a worker process is set up.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `host:port` or `http://host:port` of the coordinator.
    pub coordinator: String,
    /// The job token every call carries (`None`: the coordinator runs
    /// `--insecure`).
    pub token: Option<hsat_proto::auth::Token>,
    /// TLS to the coordinator (`security.tls_ca`, ...); `None`: plain HTTP/2.
    pub tls: Option<hsat_proto::tls::ClientTlsConfig>,
    /// The job's config (must equal the coordinator's but for worker-local keys).
    pub config: Config,
    /// Name shown in the coordinator's status (pod or host name).
    pub name: String,
    /// Host other ranks reach this worker at; `None`: the address of the interface
    /// that routes to the coordinator.
    pub advertise_host: Option<String>,
    /// Where to train.
    pub device: Device,
    /// Bound on rendezvous and every collective; a dead peer surfaces sooner.
    pub collective_timeout: Duration,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: usize,
    /// How long to keep trying to reach the coordinator at start-up.
    pub connect_deadline: Duration,
    /// How long each call to the coordinator keeps being retried (backoff 100 ms
    /// doubling to 1 s) while it fails with retryable errors (unreachable,
    /// restarting, too slow); zero: fail at the first error.
    pub rpc_retry_deadline: Duration,
    /// Where to serve the worker's metrics (`None`: nowhere); the bound address is
    /// printed on stdout as `hsat worker NAME: metrics on http://ADDR/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What the worker did, for its exit message.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSummary {
    /// The id the coordinator gave it.
    pub worker_id: u64,
    /// Steps it trained (its shards).
    pub steps_trained: u64,
    /// Generations it joined.
    pub generations: u64,
    /// Why it stopped.
    pub reason: String,
    /// The coordinator said the job finished (`Stop { success: true }`): the only
    /// end a worker exits 0 with. False: the worker was shut down (SIGTERM) or its
    /// coordinator stopped before the job's end; the job goes on without it (exit
    /// 75, see [`hsat_core::exit`]).
    pub job_finished: bool,
}

impl hsat_core::exit::ExitClass for WorkerSummary {
    fn exit(&self) -> hsat_core::exit::Exit {
        if self.job_finished {
            hsat_core::exit::Exit::Success
        } else {
            hsat_core::exit::Exit::Retryable
        }
    }
}

/// How the protocol loop ended without an error.
struct Ended {
    reason: String,
    job_finished: bool,
}

/// Runs a worker until the coordinator says stop (`Ok`), the job fails or is refused
/// (`Err` with the coordinator's message), or `shutdown` is set (leaves cleanly).
pub fn run_worker(options: WorkerOptions, shutdown: Arc<AtomicBool>) -> Result<WorkerSummary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hsat-rpc")
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    let metrics = Arc::new(WorkerMetrics::new());
    let _endpoint = match options.metrics_listen {
        Some(address) => {
            let endpoint = runtime
                .block_on(async {
                    let listener = hsat_metrics::http::bind(&address.to_string()).await?;
                    let exposition: Arc<dyn hsat_metrics::Exposition> = Arc::clone(&metrics) as _;
                    Ok(hsat_metrics::MetricsServer::spawn(listener, exposition))
                })
                .map_err(WorkerError::Metrics)?;
            println!(
                "hsat worker {}: metrics on {}",
                options.name,
                endpoint.url()
            );
            // Whoever reads our output (hsat run, a test) learns the port now.
            let _ = std::io::Write::flush(&mut std::io::stdout());
            Some(endpoint)
        }
        None => None,
    };
    let index = DatasetIndex::load(&options.config.data).map_err(WorkerError::Dataset)?;
    let client = runtime
        .block_on(connect_with_backoff(
            &options.coordinator,
            options.tls.as_ref(),
            options.connect_deadline,
            &shutdown,
        ))?
        .with_token(options.token.as_ref());
    let advertise_host = match &options.advertise_host {
        Some(host) => host.clone(),
        None => route_to(&options.coordinator),
    };
    let registration = Registration {
        worker_name: options.name.clone(),
        config: options.config.to_json_value(),
        dataset_fingerprint: index.fingerprint.clone(),
        advertise_host: advertise_host.clone(),
        hsat_version: hsat_proto::HSAT_VERSION.to_owned(),
    };
    let trainer = Trainer::new(options.config.clone(), options.device)?;
    let writer = CheckpointWriter::new(WriterOptions {
        root: trainer.checkpoint_root(),
        asynchronous: options.config.training.async_checkpoints,
        // The coordinator decides which checkpoints the job still needs.
        retention: None,
    });
    let mut worker = Worker {
        runtime: &runtime,
        client: client.clone(),
        advertise_host,
        index: Arc::new(index),
        trainer,
        writer,
        unreported_checkpoint: None,
        options: &options,
        protocol: WorkerProtocol::new(registration),
        session: None,
        heartbeats: None,
        lost: Arc::new(AtomicBool::new(false)),
        steps_per_epoch: 1,
        metrics,
    };
    worker
        .trainer
        .set_dataset_fingerprint(worker.index.fingerprint.clone());
    let outcome = worker.run(&shutdown);
    // A checkpoint still being written completes before the process goes; its
    // failure is the run's failure unless the run failed first.
    let outcome = match (outcome, worker.writer.finish()) {
        (Ok(_), Err(err)) => Err(err),
        (outcome, _) => outcome,
    };
    let worker_id = worker.protocol.worker_id();
    let summary = WorkerSummary {
        worker_id: worker_id.map_or(0, |id| id.0),
        steps_trained: worker.protocol.steps_trained(),
        generations: worker.protocol.generations(),
        reason: match &outcome {
            Ok(ended) => ended.reason.clone(),
            Err(err) => crate::error::error_chain(err),
        },
        job_finished: outcome.as_ref().is_ok_and(|ended| ended.job_finished),
    };
    if let Some(heartbeats) = worker.heartbeats.take() {
        heartbeats.abort();
    }
    drop(worker);
    // Leave in every case: after a stop too, so that a coordinator waiting for a
    // checkpoint this worker was asked to write knows at once that it is done.
    if let Some(worker_id) = worker_id {
        let reason = if shutdown.load(Ordering::SeqCst) {
            "worker shut down".to_owned()
        } else {
            summary.reason.clone()
        };
        // Best effort: the lease expiry covers a coordinator we cannot reach.
        let _ = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), client.leave(worker_id, &reason)).await
        });
    }
    outcome.map(|_| summary)
}

/// One generation's collective and loader (the steps fed to the loader are the
/// protocol's queue).
///
/// Fields drop in order: the plan sender before the loader (whose planner thread
/// waits on it), the group before the store it rendezvoused through.
struct Session {
    group: GroupAssignment,
    /// Synchronised batch norm on `process_group` (`training.sync_bn`, world > 1);
    /// installed in the model only while a step trains.
    batch_norm: Option<Arc<crate::collective::BatchNormSync>>,
    plans: Sender<StepPlan>,
    loader: FileSource,
    process_group: ProcessGroup,
    /// Kept alive for the group's lifetime (rank 0 hosts it).
    _store: Store,
    gradients: GradientSync,
}

/// The I/O shell around [`WorkerProtocol`]: RPCs (with retries), rendezvous, the
/// loader, training, checksums and checkpoints.
struct Worker<'a> {
    runtime: &'a Runtime,
    client: CoordinatorClient,
    advertise_host: String,
    index: Arc<DatasetIndex>,
    trainer: Trainer,
    /// Rank 0's checkpoint writer (other ranks never submit).
    writer: CheckpointWriter,
    /// A checkpoint whose write completed but that no report has named yet.
    unreported_checkpoint: Option<PathBuf>,
    options: &'a WorkerOptions,
    protocol: WorkerProtocol,
    /// The collective and loader of the generation the protocol is a member of;
    /// dropped whenever the protocol leaves it.
    session: Option<Session>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    /// Set by the heartbeat task when the coordinator no longer knows this worker.
    lost: Arc<AtomicBool>,
    /// Steps per epoch of the job, from the last group (for checkpoint metadata).
    steps_per_epoch: u64,
    metrics: Arc<WorkerMetrics>,
}

impl Worker<'_> {
    /// The protocol loop; returns the coordinator's reason to stop.
    fn run(&mut self, shutdown: &AtomicBool) -> Result<Ended> {
        loop {
            let action = self.protocol.next_action();
            // A step already trained is reported first: its update is in every
            // rank's model, and the report lets the step commit without a regroup.
            if shutdown.load(Ordering::SeqCst) && !matches!(action, Action::Report(_)) {
                return Ok(Ended {
                    reason: "shut down on request before the job finished".into(),
                    job_finished: false,
                });
            }
            if self.lost.swap(false, Ordering::SeqCst)
                && !matches!(self.protocol.next_action(), Action::Register(_))
            {
                let event = self.forget();
                self.protocol.on_event(event)?;
                self.session = None;
                continue;
            }
            let event = match action {
                Action::Register(registration) => {
                    // A coordinator that is still starting (indexing its dataset)
                    // answers UNAVAILABLE: give it the start-up time a coordinator
                    // that does not listen yet gets (`connect_timeout_s`), not only
                    // the retry deadline of a running job's calls.
                    let patience = self
                        .options
                        .rpc_retry_deadline
                        .max(self.options.connect_deadline);
                    let registered =
                        self.call_within(patience, "register with the coordinator", || {
                            self.client.register(registration.clone())
                        })?;
                    tracing::info!(worker_id = %registered.worker_id, coordinator = %self.options.coordinator, "registered");
                    self.heartbeats = Some(self.runtime.spawn(heartbeat_loop(
                        self.client.clone(),
                        registered.worker_id,
                        registered.heartbeat,
                        Arc::clone(&self.lost),
                    )));
                    Event::Registered(registered)
                }
                Action::Ask(request) => match self.call("ask the coordinator for work", || {
                    self.client.next_assignment(request.clone())
                }) {
                    Ok(assignment) => Event::Assigned(assignment),
                    Err(err) if is_forgotten(&err) => self.forget(),
                    Err(err) => return Err(err),
                },
                Action::FormGroup(group) => self.join(group)?,
                Action::Train(train) => self.train(&train)?,
                Action::Report(report) => {
                    match self.call("report a step", || self.client.report_step(report.clone())) {
                        Ok(()) => Event::Reported,
                        // Already reported (a retry whose first attempt got through)
                        // or of a generation that is over: the coordinator has what
                        // it needs from this report.
                        Err(WorkerError::Rpc {
                            source: ApiError::Stale(reason),
                            ..
                        }) => {
                            tracing::debug!(%reason, "the coordinator had this report already or no longer needs it");
                            Event::Reported
                        }
                        Err(err) if is_forgotten(&err) => self.forget(),
                        Err(err) => return Err(err),
                    }
                }
                Action::Sleep(duration) => {
                    tracing::debug!(?duration, "waiting for work");
                    std::thread::sleep(duration);
                    Event::Slept
                }
                Action::Stop {
                    success,
                    reason,
                    checkpoint_step,
                    resumable,
                } => {
                    self.session = None;
                    if let Some(step) = checkpoint_step {
                        self.write_stop_checkpoint(step);
                    }
                    return match (success, resumable) {
                        (true, _) => Ok(Ended {
                            reason,
                            job_finished: true,
                        }),
                        // The coordinator shut down; the job resumes with the next.
                        (false, true) => Ok(Ended {
                            reason: format!(
                                "the coordinator stopped before the job finished ({reason}); \
                                 the job resumes when a coordinator is back"
                            ),
                            job_finished: false,
                        }),
                        (false, false) => Err(WorkerError::JobFailed { reason }),
                    };
                }
            };
            let given = match &event {
                Event::Assigned(Assignment::Train(train)) => Some(train.clone()),
                _ => None,
            };
            self.protocol.on_event(event)?;
            // A new group, a stop or a failed collective: the old collective and its
            // loader go at once (a new store may reuse their resources).
            if self.protocol.group().is_none() {
                self.session = None;
            }
            if let Some(train) = given {
                self.feed_loader(&train)?;
            }
        }
    }

    /// The coordinator does not know this worker (restarted, or the lease expired):
    /// stop heartbeating under the old id; the protocol registers again keeping
    /// the model.
    fn forget(&mut self) -> Event {
        tracing::warn!(
            next_step = self.protocol.next_step(),
            "the coordinator no longer knows this worker (restarted, or the lease expired): \
             registering again, keeping the model"
        );
        if let Some(heartbeats) = self.heartbeats.take() {
            heartbeats.abort();
        }
        self.lost.store(false, Ordering::SeqCst);
        Event::Forgotten
    }

    /// Runs `call` on the RPC runtime, retrying retryable errors with backoff up to
    /// the retry deadline.
    fn call<T, Fut>(&self, action: &'static str, call: impl FnMut() -> Fut) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, ApiError>>,
    {
        self.call_within(self.options.rpc_retry_deadline, action, call)
    }

    /// [`Self::call`] retrying for up to `deadline`.
    fn call_within<T, Fut>(
        &self,
        deadline: Duration,
        action: &'static str,
        call: impl FnMut() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, ApiError>>,
    {
        let backoff = Backoff::until(deadline);
        self.runtime
            .block_on(retry(action, backoff, call))
            .map_err(WorkerError::rpc(action))
    }

    /// Joins `group` (any older generation was left when it was assigned):
    /// rendezvous, take the root's state, start a loader for the plans to come.
    fn join(&mut self, group: GroupAssignment) -> Result<Event> {
        debug_assert!(self.session.is_none(), "the old generation was left first");
        let timeout = self.options.collective_timeout;
        let world = group.world_size as usize;
        let rank = group.rank as usize;
        let generation = group.generation;
        tracing::info!(
            generation,
            rank,
            world,
            start_step = group.start_step,
            "joining generation"
        );
        let store = match &group.store {
            StoreRole::Host => {
                let store = Store::host(&self.advertise_host, 0, world, timeout)?;
                let worker = self.worker_id();
                match self.call("publish the rendezvous store", || {
                    self.client.publish_store(worker, generation, store.port())
                }) {
                    Ok(()) => {}
                    Err(err) if is_forgotten(&err) => return Ok(self.forget()),
                    Err(err) => return Err(err),
                }
                store
            }
            StoreRole::Connect { host, port } => Store::connect(host, *port, world, timeout)?,
        };
        let backend = if self.options.device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        };
        let prefix = format!("gen-{generation}");
        let process_group = match ProcessGroup::new(&store, &prefix, rank, world, backend, timeout)
        {
            Ok(process_group) => process_group,
            Err(err) => {
                tracing::warn!(error = %err, "rendezvous failed; asking the coordinator to regroup");
                return Ok(Event::GroupFailed {
                    generation,
                    error: err.to_string(),
                });
            }
        };
        if rank == group.broadcast_root as usize
            && let Some(dir) = &group.resume_checkpoint
        {
            // The complete state (model, AdamW moments and counter, position),
            // verified first; the broadcast hands it to every rank.
            self.trainer.restore(dir)?;
        }
        let bucket = self.options.bucket_bytes;
        if let Err(err) = broadcast_state(
            &process_group,
            &self.trainer.replicated_state(),
            group.broadcast_root as usize,
            bucket,
        ) {
            tracing::warn!(error = %err, "state broadcast failed; asking the coordinator to regroup");
            return Ok(Event::GroupFailed {
                generation,
                error: err.to_string(),
            });
        }
        let batch_norm = match RankCollectives::batch_norm_for(
            &process_group,
            self.options.config.training.sync_bn,
        ) {
            Ok(batch_norm) => batch_norm,
            Err(WorkerError::Collective(err)) => {
                return Ok(Event::GroupFailed {
                    generation,
                    error: err.to_string(),
                });
            }
            Err(err) => return Err(err),
        };
        self.trainer.set_position(group.start_step);
        self.steps_per_epoch = group.steps_per_epoch;
        let (plans, plans_rx) = bounded(LOOKAHEAD + 1);
        let loader = FileSource::start_with_plans(
            Arc::clone(&self.index),
            LoaderSpec::from_config(&self.options.config),
            group.steps_per_epoch,
            plans_rx,
        )?;
        self.session = Some(Session {
            group,
            batch_norm,
            process_group,
            _store: store,
            loader,
            plans,
            gradients: GradientSync::new(bucket),
        });
        Ok(Event::GroupFormed { generation })
    }

    /// Writes the checkpoint the coordinator asked for when it shut down (the
    /// protocol checked the model holds exactly `step` steps). A failure is logged,
    /// not fatal: the coordinator then reports that no checkpoint of the step exists.
    fn write_stop_checkpoint(&mut self, step: u64) {
        if self.trainer.position() != step {
            tracing::warn!(
                step,
                holds = self.trainer.position(),
                "asked for a checkpoint of a step the model does not hold; not writing it"
            );
            return;
        }
        let epoch = step.saturating_sub(1) / self.steps_per_epoch.max(1);
        let started = Instant::now();
        // A background write still in flight completes first (checkpoints stay in
        // order); the requested one is then written before the process leaves.
        let written = self.writer.finish().and_then(|_| {
            let snapshot = self.trainer.snapshot(epoch, None, None)?;
            crate::checkpoint::write_checkpoint(&self.trainer.checkpoint_root(), &snapshot)
        });
        match written {
            Ok(dir) => tracing::info!(
                step,
                checkpoint = %dir.display(),
                seconds = started.elapsed().as_secs_f64(),
                "wrote the checkpoint of the last committed step the coordinator asked for"
            ),
            Err(err) => tracing::error!(
                step,
                error = %crate::error::error_chain(&err),
                "cannot write the checkpoint the coordinator asked for"
            ),
        }
    }

    fn worker_id(&self) -> WorkerId {
        // Groups and steps come only after registration.
        self.protocol.worker_id().unwrap_or(WorkerId(0))
    }

    /// Hands a step's shard to the loader (it starts decoding at once); the
    /// protocol checked it is the next step of this generation.
    fn feed_loader(&mut self, train: &TrainAssignment) -> Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let plan = StepPlan {
            step: train.step,
            epoch: train.epoch,
            patients: train.shard.clone(),
        };
        session
            .plans
            .send(plan)
            .map_err(|_| WorkerError::LoaderStopped)
    }

    /// Trains the front step: `Trained` with what the report needs, or
    /// `CollectiveFailed` when a peer is gone.
    fn train(&mut self, train: &TrainAssignment) -> Result<Event> {
        debug_assert_eq!(self.trainer.position(), train.step);
        let Some(session) = self.session.as_mut() else {
            return Err(WorkerError::Protocol(
                hsat_proto::worker_protocol::ProtocolError::TrainBeforeGroup { step: train.step },
            ));
        };
        let started = Instant::now();
        let batch = session.loader.batch(train.step)?;
        let images = batch.images.f_to_device(self.trainer.model().device())?;
        let data_wait = started.elapsed().as_secs_f64();
        let local = images.size().first().copied().unwrap_or(0);
        let first_row = train.shard.first().map_or(0, |draw| draw.slot as i64);
        let trained = train_rank_shard(
            &mut self.trainer,
            RankCollectives {
                group: &session.process_group,
                gradients: &mut session.gradients,
                batch_norm: session.batch_norm.clone(),
                bucket_bytes: self.options.bucket_bytes,
            },
            ShardStep {
                step: train.step,
                epoch: train.epoch,
                total_steps: train.total_steps,
                images: &images,
                global_patients: train.global_patients as i64,
                first_row,
            },
        );
        let (losses, telemetry) = match trained {
            Ok(result) => result,
            Err(WorkerError::Collective(err)) => {
                tracing::warn!(step = train.step, error = %err, "collective failed; asking the coordinator to regroup");
                return Ok(Event::CollectiveFailed {
                    error: err.to_string(),
                });
            }
            Err(err) => return Err(err),
        };
        let step_seconds = started.elapsed().as_secs_f64();
        let rank = session.group.rank;
        let checksum = checksum::parameter_checksum(
            &self
                .trainer
                .model()
                .parameters()
                .into_iter()
                .map(|(_, p)| p)
                .collect::<Vec<_>>(),
        )?;
        let interval = self.options.config.training.save_checkpoint_interval as u64;
        let done = train.step + 1;
        let checkpoint_due =
            (interval > 0 && done.is_multiple_of(interval)) || done == train.total_steps;
        let checkpoint_dir = if rank == 0 {
            self.checkpoint_after(train, losses, checkpoint_due)?
        } else {
            None
        };
        self.metrics
            .on_step(losses, &telemetry, step_seconds, data_wait);
        if let Some(write) = self.writer.take_last_write() {
            self.metrics.on_checkpoint(&write);
        }
        Ok(Event::Trained(StepOutcome {
            local_patients: local as u64,
            losses: losses.unwrap_or_default(),
            param_checksum: checksum,
            step_seconds,
            data_wait_seconds: data_wait,
            checkpoint_dir,
            telemetry,
        }))
    }
}

impl Worker<'_> {
    /// Rank 0 after a step: submits a checkpoint when one is due and returns the
    /// newest checkpoint completed since the last report, for this report. The last
    /// step of the job waits for its checkpoint, so the final report names it.
    fn checkpoint_after(
        &mut self,
        train: &TrainAssignment,
        losses: Option<hsat_core::losses::StepLosses>,
        due: bool,
    ) -> Result<Option<PathBuf>> {
        let completed = if due {
            let snapshot = self
                .trainer
                .snapshot(train.epoch, losses, losses.map(|l| l.total))?;
            self.writer.submit(snapshot)?
        } else {
            self.writer.poll()?
        };
        if completed.is_some() {
            self.unreported_checkpoint = completed;
        }
        if train.step + 1 == train.total_steps
            && let Some(last) = self.writer.finish()?
        {
            self.unreported_checkpoint = Some(last);
        }
        Ok(self.unreported_checkpoint.take())
    }
}

/// The coordinator answered `UnknownWorker`: register again.
fn is_forgotten(err: &WorkerError) -> bool {
    matches!(
        err,
        WorkerError::Rpc {
            source: ApiError::UnknownWorker(_),
            ..
        }
    )
}

async fn connect_with_backoff(
    address: &str,
    tls: Option<&hsat_proto::tls::ClientTlsConfig>,
    deadline: Duration,
    shutdown: &AtomicBool,
) -> Result<CoordinatorClient> {
    let backoff = Backoff::until(deadline);
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let err = match CoordinatorClient::connect_tls(address, tls).await {
            Ok(client) => return Ok(client),
            Err(err) if err.is_retryable() => err,
            Err(err) => {
                return Err(WorkerError::rpc("connect to the coordinator")(
                    RetryError::Fatal(err),
                ));
            }
        };
        attempt += 1;
        let delay = backoff
            .delay(attempt, started.elapsed())
            .filter(|_| !shutdown.load(Ordering::SeqCst));
        let Some(delay) = delay else {
            return Err(WorkerError::RetriesExhausted {
                action: "connect to the coordinator",
                attempts: attempt,
                elapsed: started.elapsed(),
                source: err,
            });
        };
        tracing::info!(error = %err, retry_in = ?delay, "coordinator not reachable yet");
        tokio::time::sleep(delay).await;
    }
}

async fn heartbeat_loop(
    client: CoordinatorClient,
    worker: WorkerId,
    every: Duration,
    lost: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match client.heartbeat(worker).await {
            // A broken generation reaches this worker through its failed collective
            // (or the coordinator's answer to its next request), not through here.
            Ok(_) => {}
            Err(ApiError::UnknownWorker(message)) => {
                tracing::warn!(%message, "the coordinator does not know this worker");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}

/// The local address of the interface that routes to the coordinator: what other
/// ranks (next to the coordinator) can reach this worker at. No packet is sent.
fn route_to(coordinator: &str) -> String {
    let authority = coordinator
        .split("://")
        .last()
        .unwrap_or(coordinator)
        .trim_end_matches('/');
    let local = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .and_then(|remote| {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            socket.connect(remote).ok()?;
            socket.local_addr().ok()
        });
    local.map_or_else(|| "127.0.0.1".to_owned(), |addr| addr.ip().to_string())
}
