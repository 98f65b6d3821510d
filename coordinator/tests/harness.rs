//! In-process cluster harness: the coordinator on 127.0.0.1:0 and fake async
//! workers (`hsat_coordinator::sim`, no libtorch) over real gRPC. Fake workers model the collective as a
//! barrier shared between them, report identical checksums, and read the ledger
//! at the end.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsat_coordinator::sim::{SimContext, SimExit, SimHooks, SimStep, run_simulated_worker};
use hsat_coordinator::{ClusterSettings, Job, OutcomeKind, serve};
use hsat_core::config::Config;
use hsat_core::dataset::DatasetIndex;
use hsat_core::sampler::epoch_order;
use hsat_proto::auth::Token;
use hsat_proto::client::CoordinatorClient;
use hsat_proto::domain::*;
use hsat_proto::server::ServerOptions;
use hsat_proto::{ApiError, HSAT_VERSION};
use tokio::sync::Notify;

/// The job token of every coordinator the harness starts (secured, as by default).
fn job_token() -> Token {
    Token::parse("harness-job-token-0123456789", "harness").unwrap()
}

/// A manifest dataset of `patients` patients (empty tile files; the index never
/// opens images).
fn dataset(dir: &Path, patients: usize) -> DatasetIndex {
    let mut csv = String::from("patient,slide,path,label,split\n");
    for p in 0..patients {
        for s in 0..2 {
            let path = format!("tiles/p{p}_s{s}.png");
            std::fs::create_dir_all(dir.join("tiles")).unwrap();
            std::fs::write(dir.join(&path), b"").unwrap();
            let split = if p % 4 == 3 { "val" } else { "train" };
            csv.push_str(&format!(
                "P{p:02},S{s},{path},{},{split}\n",
                ["a", "b"][p % 2]
            ));
        }
    }
    std::fs::write(dir.join("manifest.csv"), csv).unwrap();
    DatasetIndex::load_manifest(&dir.join("manifest.csv"), None).unwrap()
}

fn job_config(out: &Path, manifest: &Path) -> Config {
    Config::from_toml_str(&format!(
        "[infra]\nout_dir = {:?}\n[data]\nsource = \"manifest\"\nmanifest = {:?}\n\
         [data.hidisc]\nnum_slide_samples = 1\nnum_patch_samples = 1\n\
         [training]\nbatch_size = 5\nnum_epochs = 3\n",
        out.display().to_string(),
        manifest.display().to_string()
    ))
    .unwrap()
}

fn settings(workers: usize) -> ClusterSettings {
    let mut s = ClusterSettings::new(workers);
    s.heartbeat = Duration::from_millis(50);
    s.silent_after = Duration::from_millis(150);
    s.lease = Duration::from_millis(400);
    s.regroup_wait = Duration::from_millis(400);
    s.long_poll = Duration::from_millis(200);
    s.shutdown_grace = Duration::from_secs(5);
    s
}

/// Collectives shared by the fake workers of one test: (generation, step) ->
/// ranks arrived; a barrier completes when every rank of the generation arrived.
#[derive(Default)]
struct Fabric {
    barriers: Mutex<HashMap<(u64, u64), usize>>,
    changed: Notify,
}

impl Fabric {
    /// Waits until `world` ranks arrived at (generation, step), or `give_up` fires
    /// (the worker's generation moved on, like a collective timing out).
    async fn all_reduce(
        &self,
        generation: u64,
        step: u64,
        world: usize,
        client: &CoordinatorClient,
        id: WorkerId,
    ) -> bool {
        *self
            .barriers
            .lock()
            .unwrap()
            .entry((generation, step))
            .or_default() += 1;
        self.changed.notify_waiters();
        loop {
            let notified = self.changed.notified();
            if self.barriers.lock().unwrap()[&(generation, step)] >= world {
                return true;
            }
            match client.heartbeat(id).await {
                Ok(h) if h.generation == generation && h.state == JobState::Running => {}
                _ => return false,
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }
}

/// The harness's simulation: the collective is the shared [`Fabric`]; the worker
/// crashes (no report, no leave, no heartbeats) after `die_after` reports.
struct FabricHooks {
    fabric: Arc<Fabric>,
    die_after: Option<usize>,
    reports: AtomicUsize,
    /// How long each step "trains".
    pace: Duration,
}

impl SimHooks for FabricHooks {
    async fn train(&self, context: SimContext<'_>, step: &TrainAssignment) -> SimStep {
        let world = context.group.world_size as usize;
        if !self
            .fabric
            .all_reduce(
                step.generation,
                step.step,
                world,
                context.client,
                context.worker,
            )
            .await
        {
            return SimStep::CollectiveFailed("the generation moved on".into());
        }
        tokio::time::sleep(self.pace).await;
        if self.die_after == Some(self.reports.fetch_add(1, Ordering::SeqCst)) {
            return SimStep::Crash;
        }
        SimStep::Trained
    }
}

/// A fake worker: the shared simulated worker (registers, heartbeats, follows
/// assignments through the worker protocol, reports identical checksums) over
/// this test's fabric. `die_after` = stop everything (no leave, no heartbeats)
/// after that many reports. True: the job finished.
async fn fake_worker(
    address: String,
    config: Config,
    fingerprint: String,
    name: String,
    fabric: Arc<Fabric>,
    die_after: Option<usize>,
) -> Result<bool, ApiError> {
    paced_worker(
        address,
        config,
        fingerprint,
        name,
        fabric,
        die_after,
        Duration::ZERO,
    )
    .await
}

/// [`fake_worker`] whose steps take `pace` each.
async fn paced_worker(
    address: String,
    config: Config,
    fingerprint: String,
    name: String,
    fabric: Arc<Fabric>,
    die_after: Option<usize>,
    pace: Duration,
) -> Result<bool, ApiError> {
    let client = CoordinatorClient::connect(&address)
        .await?
        .with_token(Some(&job_token()));
    worker_with(client, config, fingerprint, name, fabric, die_after, pace).await
}

/// [`paced_worker`] over an existing client (e.g. a TLS one).
async fn worker_with(
    client: CoordinatorClient,
    config: Config,
    fingerprint: String,
    name: String,
    fabric: Arc<Fabric>,
    die_after: Option<usize>,
    pace: Duration,
) -> Result<bool, ApiError> {
    let registration = Registration {
        worker_name: name,
        config: config.to_json_value(),
        dataset_fingerprint: fingerprint,
        advertise_host: "127.0.0.1".into(),
        hsat_version: HSAT_VERSION.into(),
    };
    let hooks = Arc::new(FabricHooks {
        fabric,
        die_after,
        reports: AtomicUsize::new(0),
        pace,
    });
    match run_simulated_worker(client, registration, hooks).await {
        Ok(SimExit::Stopped { success, .. }) => Ok(success),
        Ok(SimExit::Crashed) => Ok(false),
        Err(err) => match err.api_error() {
            Some(api) => Err(api.clone()),
            None => panic!("{err}"),
        },
    }
}

/// Reads the ledger and checks that each epoch consumed exactly its balanced order.
fn check_ledger(path: &Path, job: &Job) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut entries: Vec<serde_json::Value> = Vec::new();
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        match record["kind"].as_str().unwrap() {
            "rollback" => entries.truncate(record["rollback_to"].as_u64().unwrap() as usize),
            "commit" => {
                assert_eq!(record["step"].as_u64().unwrap(), entries.len() as u64);
                entries.push(record);
            }
            "header" | "start" | "end" | "checkpoint" => {}
            other => panic!("unknown record kind {other}: {line}"),
        }
    }
    assert_eq!(
        text.lines()
            .next()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|h| h["kind"].clone()),
        Some("header".into()),
        "the ledger starts with its header"
    );
    assert_eq!(entries.len() as u64, job.plan.total_steps);
    let mut by_epoch: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for entry in &entries {
        let patients = by_epoch
            .entry(entry["epoch"].as_u64().unwrap())
            .or_default();
        for rank in entry["ranks"].as_array().unwrap() {
            patients.extend(
                rank["patients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap() as usize),
            );
        }
    }
    for (epoch, patients) in by_epoch {
        assert_eq!(
            patients,
            epoch_order(&job.plan.balanced, job.plan.seed, epoch),
            "epoch {epoch}"
        );
    }
    entries
}

struct Cluster {
    _dir: tempfile::TempDir,
    job: Job,
    address: String,
    server: tokio::task::JoinHandle<
        Result<hsat_coordinator::JobOutcome, hsat_coordinator::CoordinatorError>,
    >,
}

async fn start(workers: usize) -> Cluster {
    start_with(workers, ServerOptions::secured(job_token())).await
}

async fn start_with(workers: usize, server_options: ServerOptions) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let index = dataset(dir.path(), 10);
    let config = job_config(&dir.path().join("out"), &dir.path().join("manifest.csv"));
    let job = Job::from_index(config, index);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(serve(
        job.clone(),
        settings(workers),
        server_options,
        listener,
        std::future::pending(),
    ));
    Cluster {
        _dir: dir,
        job,
        address,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_workers_train_every_step_to_completion() {
    let cluster = start(3).await;
    let fabric = Arc::new(Fabric::default());
    let workers: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(fake_worker(
                cluster.address.clone(),
                cluster.job.config.clone(),
                cluster.job.dataset_fingerprint().to_owned(),
                format!("w{i}"),
                Arc::clone(&fabric),
                None,
            ))
        })
        .collect();
    for worker in workers {
        assert!(
            worker.await.unwrap().unwrap(),
            "every worker gets Stop{{success}}"
        );
    }
    let outcome = cluster.server.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    assert_eq!(outcome.committed_steps, cluster.job.plan.total_steps);
    let entries = check_ledger(&outcome.ledger, &cluster.job);
    assert!(
        entries
            .iter()
            .all(|e| e["ranks"].as_array().unwrap().len() == 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_expires_is_regrouped_out_and_the_job_completes() {
    let cluster = start(3).await;
    let fabric = Arc::new(Fabric::default());
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let die = (i == 1).then_some(2);
            tokio::spawn(fake_worker(
                cluster.address.clone(),
                cluster.job.config.clone(),
                cluster.job.dataset_fingerprint().to_owned(),
                format!("w{i}"),
                Arc::clone(&fabric),
                die,
            ))
        })
        .collect();
    let results: Vec<bool> = futures_join(workers).await;
    assert_eq!(results, vec![true, false, true]);
    let outcome = cluster.server.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    let entries = check_ledger(&outcome.ledger, &cluster.job);
    let generations: std::collections::BTreeSet<u64> = entries
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert!(
        generations.len() >= 2,
        "a regroup happened: {generations:?}"
    );
    assert_eq!(
        entries.last().unwrap()["ranks"].as_array().unwrap().len(),
        2
    );
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<Result<bool, ApiError>>>) -> Vec<bool> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_config_or_dataset_is_refused_with_a_clear_message() {
    let cluster = start(1).await;
    let client = CoordinatorClient::connect(&cluster.address)
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    let mut other = cluster.job.config.clone();
    other.training.optimizer.learn_rate = 0.0001;
    let registration = |config: &Config, fingerprint: &str| Registration {
        worker_name: "x".into(),
        config: config.to_json_value(),
        dataset_fingerprint: fingerprint.into(),
        advertise_host: "127.0.0.1".into(),
        hsat_version: HSAT_VERSION.into(),
    };
    let err = client
        .register(registration(&other, cluster.job.dataset_fingerprint()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ApiError::Refused(
            "config differs from the coordinator's at training.learn_rate: worker 0.0001, coordinator 0.001; \
             start the worker with the job's config file"
                .into()
        )
    );
    let err = client
        .register(registration(&cluster.job.config, "0123"))
        .await
        .unwrap_err();
    let ApiError::Refused(message) = err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("worker fingerprint 0123")
            && message.contains(cluster.job.dataset_fingerprint()),
        "{message}"
    );
    assert!(client.serving().await.unwrap());
    let status = client.status().await.unwrap();
    assert_eq!(status.state, JobState::WaitingForWorkers);
    cluster.server.abort();
}

#[test]
fn synthetic_data_is_refused_for_distributed_runs() {
    let err = hsat_coordinator::load_job(Config::default()).unwrap_err();
    assert!(err.to_string().contains("hsat synth"), "{err}");
}

/// Serves `job` on a fresh listener at `address` (SO_REUSEADDR: the port of a
/// coordinator that just died), retrying while the old socket lets go.
async fn serve_at(
    job: Job,
    workers: usize,
    address: std::net::SocketAddr,
) -> Result<hsat_coordinator::JobOutcome, hsat_coordinator::CoordinatorError> {
    let mut attempts = 0;
    let listener = loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket.bind(address).and_then(|()| socket.listen(128)) {
            Ok(listener) => break listener,
            Err(err) if attempts < 100 => {
                attempts += 1;
                let _ = err;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot listen on {address} again: {err}"),
        }
    };
    serve(
        job,
        settings(workers),
        ServerOptions::secured(job_token()),
        listener,
        std::future::pending(),
    )
    .await
}

/// The committed steps the ledger at `path` shows so far (commits minus rollbacks).
fn committed_in(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut committed = 0;
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match record["kind"].as_str() {
            Some("commit") => committed += 1,
            Some("rollback") => committed = record["rollback_to"].as_u64().unwrap() as usize,
            _ => {}
        }
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_mid_job_continues_with_the_same_workers() {
    let dir = tempfile::tempdir().unwrap();
    // 12 steps: enough left after the restart for the second incarnation to train.
    let index = dataset(dir.path(), 20);
    let config = job_config(&dir.path().join("out"), &dir.path().join("manifest.csv"));
    let job = Job::from_index(config, index);
    let ledger = job.coordinator_dir().join("ledger.jsonl");
    let address: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    // The first coordinator runs on a runtime of its own: shutting that runtime
    // down drops every task of it at once (server, timers, listener) like a
    // `kill -9`, without an end record.
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    first.spawn(serve_at(job.clone(), 2, address));
    // The workers connect once (no retry of the first connection): wait for the port.
    while tokio::net::TcpStream::connect(address).await.is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fabric = Arc::new(Fabric::default());
    let workers: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(paced_worker(
                address.to_string(),
                job.config.clone(),
                job.dataset_fingerprint().to_owned(),
                format!("w{i}"),
                Arc::clone(&fabric),
                None,
                Duration::from_millis(100),
            ))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while committed_in(&ledger) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 3 commits in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Dropping the tasks drops the ledger writer, which writes what was queued
    // before it goes (a real `kill -9` takes its thread with it): wait for that,
    // so no line of the first coordinator lands after the second opened the ledger.
    tokio::task::block_in_place(|| first.shutdown_timeout(Duration::from_secs(10)));
    let before = committed_in(&ledger);
    assert!(
        (before as u64) < job.plan.total_steps,
        "the job must still be running"
    );
    let second = tokio::spawn(serve_at(job.clone(), 2, address));
    // The same worker tasks (never restarted) register again and finish the job.
    let results = futures_join(workers).await;
    assert_eq!(results, vec![true, true]);
    let outcome = second.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    let entries = check_ledger(&outcome.ledger, &job);
    assert_eq!(entries.len() as u64, job.plan.total_steps);
    // The second coordinator appended to metrics.jsonl: every step once, in order.
    let metrics_lines = hsat_metrics::jsonl::read(
        &job.config
            .infra
            .out_dir
            .join(hsat_metrics::jsonl::METRICS_FILE),
    )
    .unwrap();
    let steps: Vec<u64> = metrics_lines.iter().map(|l| l.step).collect();
    assert_eq!(steps, (0..job.plan.total_steps).collect::<Vec<_>>());
    let text = std::fs::read_to_string(&ledger).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "start").count(), 2);
    assert_eq!(kinds.iter().filter(|k| *k == "header").count(), 1);
    assert_eq!(kinds.last().map(String::as_str), Some("end"));
    assert!(
        !kinds.iter().any(|k| k == "rollback"),
        "the workers' state was confirmed: no rollback\n{text}"
    );
    // Generations of the second incarnation continue above the first's. Steps
    // the workers trained before the restart whose commit the first coordinator
    // had not written yet are committed by the second as recovered, with the
    // generation that trained them (under load that can be every step left).
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let restart = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r["kind"] == "start")
        .nth(1)
        .map(|(i, _)| i)
        .unwrap();
    let generation = |r: &serde_json::Value| r["generation"].as_u64().unwrap();
    let commits = |rs: &[serde_json::Value]| -> Vec<serde_json::Value> {
        rs.iter()
            .filter(|r| r["kind"] == "commit")
            .cloned()
            .collect()
    };
    let first_highest = commits(&records[..restart])
        .iter()
        .map(generation)
        .max()
        .unwrap();
    for commit in commits(&records[restart..]) {
        if commit["recovered"].as_bool().unwrap() {
            assert!(generation(&commit) <= first_highest, "{commit}");
        } else {
            assert!(generation(&commit) > first_highest, "{commit}\n{text}");
        }
    }
    let generations: Vec<u64> = entries.iter().map(generation).collect();
    assert!(
        generations.windows(2).all(|w| w[0] <= w[1]),
        "{generations:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_not_trained_again_and_its_ledger_is_left_untouched() {
    let cluster = start(1).await;
    let fabric = Arc::new(Fabric::default());
    let worker = tokio::spawn(fake_worker(
        cluster.address.clone(),
        cluster.job.config.clone(),
        cluster.job.dataset_fingerprint().to_owned(),
        "w0".into(),
        Arc::clone(&fabric),
        None,
    ));
    assert!(worker.await.unwrap().unwrap());
    let outcome = cluster.server.await.unwrap().unwrap();
    let before = std::fs::read(&outcome.ledger).unwrap();
    // Again on the same out_dir: a worker that registers is told the job finished.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut short = settings(1);
    short.shutdown_grace = Duration::from_secs(1);
    let again = tokio::spawn(serve(
        cluster.job.clone(),
        short,
        ServerOptions::secured(job_token()),
        listener,
        std::future::pending(),
    ));
    let worker = fake_worker(
        address,
        cluster.job.config.clone(),
        cluster.job.dataset_fingerprint().to_owned(),
        "w0".into(),
        fabric,
        None,
    )
    .await;
    assert!(worker.unwrap(), "Stop {{ success: true }}");
    let outcome = again.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    assert!(outcome.already_finished);
    assert_eq!(std::fs::read(&outcome.ledger).unwrap(), before);
}

/// Asks until the answer is not `Wait`.
async fn ask_until_work(client: &CoordinatorClient, request: AssignmentRequest) -> Assignment {
    for _ in 0..100 {
        match client.next_assignment(request.clone()).await.unwrap() {
            Assignment::Wait { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other,
        }
    }
    panic!("no work after 100 asks")
}

/// A report is accepted once per (worker, generation, step): the worker's own
/// report sent again over gRPC with its session (what an eavesdropper on an
/// unencrypted network could replay), even with another checksum, is `ABORTED`
/// (`ApiError::Stale`) and the job goes on; this session used for an id the
/// coordinator never gave out gets `NOT_FOUND` (register first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_report_is_rejected_over_grpc_and_the_job_goes_on() {
    let cluster = start(1).await;
    let client = CoordinatorClient::connect(&cluster.address)
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    let registered = client
        .register(Registration {
            worker_name: "w0".into(),
            config: cluster.job.config.to_json_value(),
            dataset_fingerprint: cluster.job.dataset_fingerprint().into(),
            advertise_host: "127.0.0.1".into(),
            hsat_version: HSAT_VERSION.into(),
        })
        .await
        .unwrap();
    let worker = registered.worker_id;
    assert!(
        client.session(worker).is_some(),
        "register kept the session"
    );
    let ask = |generation: u64, next_step: u64| AssignmentRequest {
        worker_id: worker,
        generation,
        next_step,
        want_step: next_step,
        group_error: None,
        held: Vec::new(),
    };
    let Assignment::Group(group) = ask_until_work(&client, ask(0, 0)).await else {
        panic!("expected a group")
    };
    client
        .publish_store(worker, group.generation, 4242)
        .await
        .unwrap();
    let Assignment::Train(train) = ask_until_work(&client, ask(group.generation, 0)).await else {
        panic!("expected a step")
    };
    let report = StepReport {
        worker_id: worker,
        generation: train.generation,
        step: train.step,
        rank: 0,
        local_patients: train.shard.len() as u64,
        losses: hsat_core::losses::StepLosses {
            total: 1.0,
            clean: None,
            adversarial: None,
        },
        param_checksum: 7,
        step_seconds: 0.1,
        data_wait_seconds: 0.0,
        checkpoint_dir: None,
        telemetry: Default::default(),
    };
    client.report_step(report.clone()).await.unwrap();
    for checksum in [7, 0xbad] {
        let replay = StepReport {
            param_checksum: checksum,
            ..report.clone()
        };
        match client.report_step(replay).await {
            Err(ApiError::Stale(message)) => {
                assert!(message.contains("already reported step 0"), "{message}")
            }
            other => panic!("a replayed report: {other:?}"),
        }
    }
    // A session is no key to ids the coordinator never gave out.
    let other = WorkerId(worker.0 + 1);
    client.set_session(other, client.session(worker).as_ref());
    let err = client.heartbeat(other).await.unwrap_err();
    assert!(matches!(err, ApiError::UnknownWorker(_)), "{err:?}");
    let status = client.status().await.unwrap();
    assert_eq!(status.step, 1, "step 0 committed once");
    assert_eq!(status.state, JobState::Running, "{status:?}");
    // The worker goes on with step 1.
    let Assignment::Train(next) = ask_until_work(&client, ask(group.generation, 1)).await else {
        panic!("expected step 1")
    };
    assert_eq!(next.step, 1);
    cluster.server.abort();
}

/// PEM files made for one test: a CA, the coordinator's certificate (for
/// `127.0.0.1` and `localhost`) and a worker's, both signed by the CA.
struct TestPki {
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
    client: (std::path::PathBuf, std::path::PathBuf),
}

fn test_pki(dir: &Path) -> TestPki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hsat test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |name: &str, sans: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (
            write(&format!("{name}.crt"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let server = leaf("server", vec!["127.0.0.1".into(), "localhost".into()]);
    let client = leaf("worker", vec!["worker".into()]);
    TestPki {
        ca: write("ca.crt", ca.pem()),
        server,
        client,
    }
}

/// Mutual TLS: a worker with a certificate from the job's CA trains the job to the
/// end over TLS; a client without a certificate, or speaking plain HTTP/2, gets
/// nothing from the coordinator, not even with the job token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_over_mutual_tls_and_clients_without_a_certificate_are_refused() {
    use hsat_proto::tls::{TlsFiles, client_tls, server_tls};
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = test_pki(pki_dir.path());
    let mut options = ServerOptions::secured(job_token());
    options.tls = server_tls(&TlsFiles {
        cert: Some(pki.server.0.clone()),
        key: Some(pki.server.1.clone()),
        client_ca: Some(pki.ca.clone()),
        ca: None,
    })
    .unwrap();
    assert!(options.tls.is_some());
    let cluster = start_with(1, options).await;

    let worker_tls = client_tls(&TlsFiles {
        cert: Some(pki.client.0.clone()),
        key: Some(pki.client.1.clone()),
        client_ca: None,
        ca: Some(pki.ca.clone()),
    })
    .unwrap()
    .unwrap();
    let client = CoordinatorClient::connect_tls(&cluster.address, Some(&worker_tls))
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    assert!(client.serving().await.unwrap());

    // Without a client certificate: the handshake fails, no call gets through.
    let anonymous = client_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        ..TlsFiles::default()
    })
    .unwrap()
    .unwrap();
    let refused = match CoordinatorClient::connect_tls(&cluster.address, Some(&anonymous)).await {
        Ok(c) => c.with_token(Some(&job_token())).status().await.unwrap_err(),
        Err(err) => err,
    };
    // Refused by the TLS layer (the connection never carries a call), not by the
    // token check: the same token works above with a certificate.
    assert!(
        matches!(&refused, ApiError::Unavailable(m) if m.contains("transport error")),
        "a client without a certificate: {refused:?}"
    );
    // Plain HTTP/2 to a TLS port.
    let plain = match CoordinatorClient::connect(&cluster.address).await {
        Ok(c) => c.with_token(Some(&job_token())).status().await.unwrap_err(),
        Err(err) => err,
    };
    assert!(
        matches!(&plain, ApiError::Unavailable(m) if m.contains("transport error")),
        "a plain client: {plain:?}"
    );

    let trained = worker_with(
        client,
        cluster.job.config.clone(),
        cluster.job.dataset_fingerprint().to_owned(),
        "w0".into(),
        Arc::new(Fabric::default()),
        None,
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(trained, "the worker got Stop{{success}}");
    let outcome = cluster.server.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    assert_eq!(outcome.committed_steps, cluster.job.plan.total_steps);
    check_ledger(&outcome.ledger, &cluster.job);
}

/// The server's limits are in force: a call held longer than the request timeout
/// is cancelled (retryable for a worker), and with one call at a time two long
/// polls run one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_and_the_concurrency_limit_apply() {
    use hsat_proto::server::Limits;
    let limited = |timeout_ms: u64, concurrent: usize| {
        let mut options = ServerOptions::secured(job_token());
        options.limits = Limits {
            request_timeout: Duration::from_millis(timeout_ms),
            max_concurrent_requests: concurrent,
            ..Limits::default()
        };
        options
    };
    let register = |client: CoordinatorClient, job: Job, name: &'static str| async move {
        let registered = client
            .register(Registration {
                worker_name: name.into(),
                config: job.config.to_json_value(),
                dataset_fingerprint: job.dataset_fingerprint().into(),
                advertise_host: "127.0.0.1".into(),
                hsat_version: HSAT_VERSION.into(),
            })
            .await
            .unwrap();
        AssignmentRequest {
            worker_id: registered.worker_id,
            generation: 0,
            next_step: 0,
            want_step: 0,
            group_error: None,
            held: Vec::new(),
        }
    };
    // 3 workers expected, so asks are held for the whole 200 ms long poll.
    let cluster = start_with(3, limited(50, 64)).await;
    let client = CoordinatorClient::connect(&cluster.address)
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    let ask = register(client.clone(), cluster.job.clone(), "a").await;
    let err = client.next_assignment(ask).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Unavailable(m) if m.contains("Timeout expired")),
        "{err:?}"
    );
    assert!(err.is_retryable());
    cluster.server.abort();

    let cluster = start_with(3, limited(5_000, 1)).await;
    let client = CoordinatorClient::connect(&cluster.address)
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    let a = register(client.clone(), cluster.job.clone(), "a").await;
    let b = register(client.clone(), cluster.job.clone(), "b").await;
    let started = std::time::Instant::now();
    let (ra, rb) = tokio::join!(client.next_assignment(a), client.next_assignment(b));
    assert!(matches!(ra.unwrap(), Assignment::Wait { .. }));
    assert!(matches!(rb.unwrap(), Assignment::Wait { .. }));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "two 200 ms long polls ran at once under a limit of one: {:?}",
        started.elapsed()
    );
    cluster.server.abort();
}

/// The coordinator's metrics endpoint during and after a job of fake workers: the
/// scraped position agrees with the ledger, every RPC is counted by method and
/// code, a refused registration by reason, `promtool` accepts the exposition, and
/// `metrics.jsonl` has one line per committed step with the ranks' telemetry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_ledger_and_count_rpcs_and_refusals() {
    use hsat_coordinator::metrics::CoordinatorMetrics;
    use hsat_metrics::exposition::{Scrape, promtool_check};

    let dir = tempfile::tempdir().unwrap();
    let index = dataset(dir.path(), 10);
    let config = job_config(&dir.path().join("out"), &dir.path().join("manifest.csv"));
    let job = Job::from_index(config, index);
    let start =
        hsat_coordinator::durable::prepare(&job, hsat_coordinator::StartMode::Auto).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let metrics = Arc::new(CoordinatorMetrics::new());
    let endpoint =
        hsat_coordinator::cli::serve_metrics("127.0.0.1:0".parse().unwrap(), &metrics, None)
            .await
            .unwrap();
    let metrics_address = endpoint.address();
    let scrape = move || async move {
        let (status, _, body) = tokio::task::spawn_blocking(move || {
            hsat_metrics::http::get(metrics_address, "/metrics", None)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status, 200);
        (Scrape::parse(&body).unwrap(), body)
    };
    let server = tokio::spawn(hsat_coordinator::serve_job_with(
        job.clone(),
        start,
        settings(2),
        ServerOptions::secured(job_token()),
        listener,
        Arc::clone(&metrics),
        std::future::pending(),
    ));
    // Before any worker: forming, nothing committed (once the spawned server has
    // published its first view).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let (scraped, _) = scrape().await;
        if scraped.value("hsat_total_steps", &[]) == Some(job.plan.total_steps as f64) {
            break scraped;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server published no view in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        before.value("hsat_job_state", &[("state", "forming")]),
        Some(1.0)
    );
    assert_eq!(before.value("hsat_committed_steps", &[]), Some(0.0));
    assert_eq!(
        before.value("hsat_total_steps", &[]),
        Some(job.plan.total_steps as f64)
    );
    // A worker with another config is refused and counted as such.
    let client = CoordinatorClient::connect(&address)
        .await
        .unwrap()
        .with_token(Some(&job_token()));
    let mut other = job.config.clone();
    other.training.optimizer.learn_rate = 0.0001;
    let refused = client
        .register(Registration {
            worker_name: "stranger".into(),
            config: other.to_json_value(),
            dataset_fingerprint: job.dataset_fingerprint().to_owned(),
            advertise_host: "127.0.0.1".into(),
            hsat_version: HSAT_VERSION.into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(refused, ApiError::Refused(_)), "{refused:?}");
    let fabric = Arc::new(Fabric::default());
    let workers: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(paced_worker(
                address.clone(),
                job.config.clone(),
                job.dataset_fingerprint().to_owned(),
                format!("w{i}"),
                Arc::clone(&fabric),
                None,
                Duration::from_millis(20),
            ))
        })
        .collect();
    assert_eq!(futures_join(workers).await, vec![true, true]);
    let outcome = server.await.unwrap().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Finished);
    let entries = check_ledger(&outcome.ledger, &job);
    let total = job.plan.total_steps as f64;
    let (after, text) = scrape().await;
    assert_eq!(
        after.value("hsat_committed_steps", &[]),
        Some(entries.len() as f64)
    );
    assert_eq!(after.value("hsat_committed_steps", &[]), Some(total));
    let last_generation = entries.last().unwrap()["generation"].as_u64().unwrap();
    assert_eq!(
        after.value("hsat_generation", &[]),
        Some(last_generation as f64)
    );
    assert_eq!(
        after.value("hsat_job_state", &[("state", "finished")]),
        Some(1.0)
    );
    assert_eq!(
        after.value("hsat_job_state", &[("state", "training")]),
        Some(0.0)
    );
    let rpc = |method: &str, code: &str| {
        after
            .value(
                "hsat_rpc_requests_total",
                &[("method", method), ("code", code)],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(rpc("ReportStep", "OK"), 2.0 * total, "{text}");
    assert_eq!(rpc("Register", "OK"), 2.0, "{text}");
    assert_eq!(rpc("Register", "FailedPrecondition"), 1.0, "{text}");
    assert_eq!(
        after.value("hsat_registrations_refused_total", &[("reason", "config")]),
        Some(1.0)
    );
    assert_eq!(
        after.value("hsat_step_duration_seconds_count", &[]),
        Some(total)
    );
    // The fake workers report gain 0.5 and clean losses 0.1 / 0.2 / 0.3.
    assert_eq!(after.value("hsat_attack_gain", &[]), Some(0.5));
    assert_eq!(
        after.value("hsat_loss", &[("level", "slide"), ("view", "clean")]),
        Some(0.2)
    );
    let problems = promtool_check(&text).unwrap();
    assert_eq!(problems, "", "{text}");
    let lines = hsat_metrics::jsonl::read(
        &job.config
            .infra
            .out_dir
            .join(hsat_metrics::jsonl::METRICS_FILE),
    )
    .unwrap();
    let steps: Vec<u64> = lines.iter().map(|l| l.step).collect();
    assert_eq!(steps, (0..job.plan.total_steps).collect::<Vec<_>>());
    assert!(
        lines
            .iter()
            .all(|l| l.world_size == 2 && l.attack_gain == Some(0.5))
    );
    assert!(
        lines
            .iter()
            .all(|l| l.loss.clean.is_some() && l.loss.adversarial.is_none())
    );
}

/// The coordinator's metrics port speaks TLS with the gRPC port's certificate: a
/// scraper that trusts the job's CA gets the exposition over HTTPS, one speaking
/// plain HTTP gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_serves_tls_with_the_coordinators_certificate() {
    use hsat_coordinator::metrics::CoordinatorMetrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;

    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    let files = hsat_proto::tls::TlsFiles {
        cert: Some(pki.server.0.clone()),
        key: Some(pki.server.1.clone()),
        ..Default::default()
    };
    let tls = hsat_proto::tls::server_config(&files).unwrap();
    assert!(tls.is_some());
    let metrics = Arc::new(CoordinatorMetrics::new());
    let endpoint =
        hsat_coordinator::cli::serve_metrics("127.0.0.1:0".parse().unwrap(), &metrics, tls)
            .await
            .unwrap();
    assert!(endpoint.url().starts_with("https://"), "{}", endpoint.url());
    let address = endpoint.address();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("hsat_committed_steps"), "{response}");

    // Plain HTTP on the same port: the handshake fails, no exposition.
    let plain =
        tokio::task::spawn_blocking(move || hsat_metrics::http::get(address, "/metrics", None))
            .await
            .unwrap();
    if let Ok((status, _, body)) = plain {
        assert!(
            status != 200 && !body.contains("hsat_committed_steps"),
            "plain HTTP got the metrics: {status} {body}"
        );
    }
}
