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
//!                     │            └─ Stop   -> leave, exit
//!                     └── train front step: PGD, loss, backward, all-reduce,
//!                         AdamW, rank 0's BN buffers, checksum, report
//! ```
//!
//! Training runs on the calling thread (libtorch work is blocking); RPCs go through
//! a small tokio runtime owned by [`run_worker`], with heartbeats on their own task so
//! a long step never loses the lease. A failed collective (a peer died or hung) drops
//! the group, its loader and the queued steps, and tells the coordinator, which forms
//! the next generation; the model keeps the last update it applied, which the
//! coordinator uses to pick the state everyone continues from.
//!
//! - [`checksum`]: the parameter fingerprint sent with each report.

pub mod checksum;

use std::collections::VecDeque;
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
    Assignment, AssignmentRequest, GroupAssignment, Registration, StepReport, StoreRole,
    TrainAssignment, WorkerId,
};
use tch::Device;
use tokio::runtime::Runtime;

use crate::collective::{Backend, GradientSync, ProcessGroup, Store, broadcast_state};
use crate::data::{BatchSource, FileSource};
use crate::error::{Result, WorkerError};
use crate::train::trainer::{ShardStep, Trainer};
use hsat_data::loader::LoaderSpec;

/// Steps a worker holds ahead of the one it trains (the coordinator's window).
const LOOKAHEAD: usize = 2;

/// How a worker process is set up.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `host:port` or `http://host:port` of the coordinator.
    pub coordinator: String,
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
}

/// Runs a worker until the coordinator says stop (`Ok`), the job fails or is refused
/// (`Err` with the coordinator's message), or `shutdown` is set (leaves cleanly).
pub fn run_worker(options: WorkerOptions, shutdown: Arc<AtomicBool>) -> Result<WorkerSummary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hsat-rpc")
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Unsupported(format!("cannot start the RPC runtime: {e}")))?;
    let index = DatasetIndex::load(&options.config.data).map_err(|e| {
        WorkerError::Unsupported(format!(
            "cannot index the dataset: {e}; distributed runs need a dataset on disk (make one with `hsat synth`)"
        ))
    })?;
    let client = runtime.block_on(connect_with_backoff(
        &options.coordinator,
        options.connect_deadline,
        &shutdown,
    ))?;
    let advertise_host = match &options.advertise_host {
        Some(host) => host.clone(),
        None => route_to(&options.coordinator),
    };
    let registered = runtime
        .block_on(client.register(Registration {
            worker_name: options.name.clone(),
            config: options.config.to_json_value(),
            dataset_fingerprint: index.fingerprint.clone(),
            advertise_host: advertise_host.clone(),
            hsat_version: hsat_proto::HSAT_VERSION.to_owned(),
        }))
        .map_err(|e| rpc_error("register with the coordinator", e))?;
    let worker_id = registered.worker_id;
    tracing::info!(%worker_id, coordinator = %options.coordinator, "registered");

    let lost = Arc::new(AtomicBool::new(false));
    let heartbeats = runtime.spawn(heartbeat_loop(
        client.clone(),
        worker_id,
        registered.heartbeat,
        Arc::clone(&lost),
    ));

    let mut worker = Worker {
        runtime: &runtime,
        client: client.clone(),
        worker_id,
        advertise_host,
        index: Arc::new(index),
        trainer: Trainer::new(options.config.clone(), options.device)?,
        options: &options,
        session: None,
        group_error: None,
        steps_trained: 0,
        generations: 0,
    };
    worker
        .trainer
        .set_dataset_fingerprint(worker.index.fingerprint.clone());
    let outcome = worker.run(&shutdown, &lost);
    let summary = WorkerSummary {
        worker_id: worker_id.0,
        steps_trained: worker.steps_trained,
        generations: worker.generations,
        reason: match &outcome {
            Ok(reason) => reason.clone(),
            Err(err) => err.to_string(),
        },
    };
    drop(worker);
    heartbeats.abort();
    if shutdown.load(Ordering::SeqCst) || outcome.is_err() {
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

/// One generation's collective and loader, and the steps fed to that loader.
///
/// Fields drop in order: the plan sender before the loader (whose planner thread
/// waits on it), the group before the store it rendezvoused through.
struct Session {
    group: GroupAssignment,
    plans: Sender<StepPlan>,
    loader: FileSource,
    process_group: ProcessGroup,
    /// Kept alive for the group's lifetime (rank 0 hosts it).
    _store: Store,
    queued: VecDeque<TrainAssignment>,
    gradients: GradientSync,
}

struct Worker<'a> {
    runtime: &'a Runtime,
    client: CoordinatorClient,
    worker_id: WorkerId,
    advertise_host: String,
    index: Arc<DatasetIndex>,
    trainer: Trainer,
    options: &'a WorkerOptions,
    session: Option<Session>,
    /// A collective error to tell the coordinator with the next request, and the
    /// generation it happened in.
    group_error: Option<(u64, String)>,
    steps_trained: u64,
    generations: u64,
}

impl Worker<'_> {
    /// The assignment loop; returns the coordinator's reason to stop.
    fn run(&mut self, shutdown: &AtomicBool, lost: &AtomicBool) -> Result<String> {
        loop {
            if shutdown.load(Ordering::SeqCst) {
                return Ok("shut down on request".into());
            }
            if lost.load(Ordering::SeqCst) {
                return Err(WorkerError::Unsupported(
                    "the coordinator no longer knows this worker (its lease expired); restart the worker to join again".into(),
                ));
            }
            let queued = self.session.as_ref().map_or(0, |s| s.queued.len());
            // Past the job's last step there is nothing to prefetch: asking would
            // only be held by the coordinator's long poll.
            let beyond_end = self
                .session
                .as_ref()
                .is_some_and(|s| self.trainer.position() + queued as u64 >= s.group.total_steps);
            if queued < LOOKAHEAD && !(queued > 0 && beyond_end) {
                let failure = self.group_error.take();
                let generation = match (&failure, &self.session) {
                    (Some((generation, _)), _) => *generation,
                    (None, Some(session)) => session.group.generation,
                    (None, None) => 0,
                };
                let request = AssignmentRequest {
                    worker_id: self.worker_id,
                    generation,
                    next_step: self.trainer.position(),
                    want_step: self.trainer.position() + queued as u64,
                    group_error: failure.map(|(_, message)| message),
                };
                let assignment = self
                    .runtime
                    .block_on(self.client.next_assignment(request))
                    .map_err(|e| rpc_error("ask the coordinator for work", e))?;
                match assignment {
                    Assignment::Wait { retry, reason } => {
                        if queued == 0 {
                            tracing::debug!(%reason, "waiting");
                            std::thread::sleep(retry.min(Duration::from_secs(1)));
                            continue;
                        }
                    }
                    Assignment::Stop { success, reason } => {
                        self.session = None;
                        return if success {
                            Ok(reason)
                        } else {
                            Err(WorkerError::Unsupported(format!(
                                "the coordinator stopped the job: {reason}"
                            )))
                        };
                    }
                    Assignment::Group(group) => {
                        self.join(group)?;
                        continue;
                    }
                    Assignment::Train(train) => {
                        self.enqueue(train)?;
                        continue;
                    }
                }
            }
            self.train_next()?;
        }
    }

    /// Leaves any older generation and joins `group`: rendezvous, take the root's
    /// state, start a loader for the plans to come.
    fn join(&mut self, group: GroupAssignment) -> Result<()> {
        // Drop the old loader and collective first: a new store may reuse resources.
        self.session = None;
        let timeout = self.options.collective_timeout;
        let world = group.world_size as usize;
        let rank = group.rank as usize;
        tracing::info!(
            generation = group.generation,
            rank,
            world,
            start_step = group.start_step,
            "joining generation"
        );
        let store = match &group.store {
            StoreRole::Host => {
                let store = Store::host(&self.advertise_host, 0, world, timeout)?;
                self.runtime
                    .block_on(self.client.publish_store(
                        self.worker_id,
                        group.generation,
                        store.port(),
                    ))
                    .map_err(|e| rpc_error("publish the rendezvous store", e))?;
                store
            }
            StoreRole::Connect { host, port } => Store::connect(host, *port, world, timeout)?,
        };
        let backend = if self.options.device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        };
        let prefix = format!("gen-{}", group.generation);
        let formed = ProcessGroup::new(&store, &prefix, rank, world, backend, timeout).map(
            |process_group| {
                let resume = (rank == group.broadcast_root as usize)
                    .then(|| group.resume_checkpoint.clone())
                    .flatten();
                (process_group, resume)
            },
        );
        let (process_group, resume) = match formed {
            Ok(formed) => formed,
            Err(err) => {
                self.group_error = Some((group.generation, err.to_string()));
                tracing::warn!(error = %err, "rendezvous failed; asking the coordinator to regroup");
                return Ok(());
            }
        };
        if let Some(dir) = resume {
            self.trainer.load_checkpoint(&dir)?;
        }
        let bucket = self.options.bucket_bytes;
        if let Err(err) = broadcast_state(
            &process_group,
            &self.trainer.replicated_state(),
            group.broadcast_root as usize,
            bucket,
        ) {
            self.group_error = Some((group.generation, err.to_string()));
            tracing::warn!(error = %err, "state broadcast failed; asking the coordinator to regroup");
            return Ok(());
        }
        self.trainer.set_position(group.start_step);
        let (plans, plans_rx) = bounded(LOOKAHEAD + 1);
        let loader = FileSource::start_with_plans(
            Arc::clone(&self.index),
            LoaderSpec::from_config(&self.options.config),
            group.steps_per_epoch,
            plans_rx,
        )?;
        self.generations += 1;
        self.session = Some(Session {
            group,
            process_group,
            _store: store,
            loader,
            plans,
            queued: VecDeque::new(),
            gradients: GradientSync::new(bucket),
        });
        Ok(())
    }

    /// Hands a step's shard to the loader (it starts decoding at once) and queues it.
    fn enqueue(&mut self, train: TrainAssignment) -> Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Err(WorkerError::Unsupported(format!(
                "the coordinator sent step {} before any group: a protocol error, restart the job",
                train.step
            )));
        };
        let expected = self.trainer.position() + session.queued.len() as u64;
        if train.generation != session.group.generation || train.step != expected {
            return Err(WorkerError::Unsupported(format!(
                "the coordinator sent step {} of generation {}, expected step {expected} of generation {}: a protocol error",
                train.step, train.generation, session.group.generation
            )));
        }
        let plan = StepPlan {
            step: train.step,
            epoch: train.epoch,
            patients: train.shard.clone(),
        };
        session
            .plans
            .send(plan)
            .map_err(|_| WorkerError::Unsupported("the loader threads stopped".into()))?;
        session.queued.push_back(train);
        Ok(())
    }

    /// Trains the first queued step and reports it.
    fn train_next(&mut self) -> Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let Some(train) = session.queued.pop_front() else {
            return Ok(());
        };
        let started = Instant::now();
        let batch = session.loader.batch(train.step)?;
        let images = batch.images.f_to_device(self.trainer.model().device())?;
        let data_wait = started.elapsed().as_secs_f64();
        let local = images.size().first().copied().unwrap_or(0);
        let first_row = train.shard.first().map_or(0, |draw| draw.slot as i64);
        let global = train.global_patients as f64;
        let process_group = &session.process_group;
        let gradients = &mut session.gradients;
        let mut sync = |params: &[(String, tch::Tensor)]| -> Result<()> {
            let tensors: Vec<tch::Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            gradients.average(process_group, &tensors, local as f64, global)?;
            Ok(())
        };
        let trained = self.trainer.train_shard(
            ShardStep {
                step: train.step,
                epoch: train.epoch,
                total_steps: train.total_steps,
                images: &images,
                global_patients: train.global_patients as i64,
                first_row,
            },
            &mut sync,
        );
        let trained = trained.and_then(|result| {
            // Each rank's batch-norm statistics come from its own shard; take rank 0's,
            // as DDP does, so that all ranks stay identical.
            broadcast_state(
                process_group,
                &self.trainer.buffers(),
                0,
                self.options.bucket_bytes,
            )?;
            Ok(result)
        });
        let (losses, _lr, _eps) = match trained {
            Ok(result) => result,
            Err(WorkerError::Collective(err)) => {
                tracing::warn!(step = train.step, error = %err, "collective failed; asking the coordinator to regroup");
                self.group_error = Some((session.group.generation, err.to_string()));
                self.session = None;
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let step_seconds = started.elapsed().as_secs_f64();
        self.steps_trained += 1;
        let rank = session.group.rank;
        let generation = session.group.generation;
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
        let checkpoint_dir: Option<PathBuf> = if rank == 0 && checkpoint_due {
            Some(self.trainer.write_checkpoint(train.epoch, losses)?)
        } else {
            None
        };
        let report = StepReport {
            worker_id: self.worker_id,
            generation,
            step: train.step,
            rank,
            local_patients: local as u64,
            losses: losses.unwrap_or_default(),
            param_checksum: checksum,
            step_seconds,
            data_wait_seconds: data_wait,
            checkpoint_dir,
        };
        self.runtime
            .block_on(self.client.report_step(report))
            .map_err(|e| rpc_error("report a step", e))?;
        Ok(())
    }
}

async fn connect_with_backoff(
    address: &str,
    deadline: Duration,
    shutdown: &AtomicBool,
) -> Result<CoordinatorClient> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match CoordinatorClient::connect(address).await {
            Ok(client) => return Ok(client),
            Err(err)
                if started.elapsed() + delay < deadline && !shutdown.load(Ordering::SeqCst) =>
            {
                tracing::info!(error = %err, retry_in = ?delay, "coordinator not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                return Err(WorkerError::Unsupported(format!(
                    "{err} (gave up after {:.0} s)",
                    started.elapsed().as_secs_f64()
                )));
            }
        }
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
                tracing::error!(%message, "the coordinator dropped this worker");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}

fn rpc_error(action: &str, err: ApiError) -> WorkerError {
    WorkerError::Unsupported(format!("cannot {action}: {err}"))
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
