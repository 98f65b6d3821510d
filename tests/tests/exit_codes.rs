//! The exit codes of `hsat coordinator` and `hsat worker` (`hsat_core::exit`), the
//! coordinator's single-instance lock and its health service during start-up, with
//! real processes on localhost, each ending the way a Kubernetes controller would
//! see it:
//!
//! - a refused config or device, and a bad command line, exit 78 and 2 before
//!   anything starts; `--help` shows the table;
//! - a job whose first generation forms after `cluster.formation_wait_s` with fewer
//!   workers than expected finishes: the coordinator and each worker that stayed
//!   exit 0, a worker refused for a config mismatch exits 78, a worker drained with
//!   SIGTERM before the job finished exits 75;
//! - a worker whose coordinator is gone for good exits 75 after its retries;
//! - a second coordinator on the same out_dir waits for the lock, exits 75 when the
//!   first keeps it, and takes over when the first is `kill -9`ed;
//! - the coordinator answers `grpc.health.v1` NOT_SERVING (and `hsat.v1` calls
//!   UNAVAILABLE) while it indexes its dataset, SERVING once the job is ready.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsat_tests::{
    Sandbox, SandboxSpec, SmallJob, hsat_binary, run_hsat, synth_dataset, synth_opensrh,
    write_small_job_config,
};

fn job(dir: &Path, epochs: usize) -> PathBuf {
    let data = synth_opensrh(dir, 5, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 2,
            epochs,
            attack_iters: 2,
        },
    )
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn refused_configs_devices_and_command_lines_exit_78_and_2_and_help_shows_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data: dir.path().join("no-data"),
            batch_size: 2,
            epochs: 1,
            attack_iters: 1,
        },
    );
    let config = config.to_str().unwrap();

    let bad = run_hsat(&[
        "coordinator",
        "--config",
        config,
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--set",
        "training.batch_size=0",
    ]);
    assert_eq!(bad.status.code(), Some(78), "{}", text(&bad));
    assert!(text(&bad).contains("training.batch_size"), "{}", text(&bad));

    let unknown = run_hsat(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:1",
        "--config",
        config,
        "--set",
        "cluster.no_such_key=1",
    ]);
    assert_eq!(unknown.status.code(), Some(78), "{}", text(&unknown));
    assert!(
        text(&unknown).contains("cluster.no_such_key"),
        "{}",
        text(&unknown)
    );

    // This machine has no GPU (or the test says what it has): cuda:7 is refused
    // before the worker tries to reach anything.
    let device = run_hsat(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:1",
        "--config",
        config,
        "--device",
        "cuda:7",
    ]);
    assert_eq!(device.status.code(), Some(78), "{}", text(&device));
    assert!(
        text(&device).contains("cuda:7 requested (--device)"),
        "{}",
        text(&device)
    );

    let usage = run_hsat(&["coordinator", "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));

    for command in ["coordinator", "worker", "run"] {
        let help = run_hsat(&[command, "--help"]);
        let help = text(&help);
        for line in [
            "Exit status:",
            "  0  the job finished",
            "  75  retryable",
            "  78  permanent refusal",
        ] {
            assert!(
                help.contains(line),
                "hsat {command} --help lacks {line:?}:\n{help}"
            );
        }
    }
}

#[test]
fn a_finished_job_exits_0_a_refused_worker_78_and_a_drained_worker_75() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), 8);
    // 3 expected, 2 started: the first generation forms when the formation wait is
    // over (min_workers 1), not never.
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 3)
            .start_workers(2)
            .coordinator_args(&[
                "--min-workers",
                "1",
                "--formation-wait-s",
                "3",
                "--lease-ms",
                "3000",
                "--regroup-wait-s",
                "10",
                "--set",
                "cluster.collective_timeout_s=5",
            ]),
    );
    let refused = sandbox.add_worker_with(&["--set", "training.learn_rate=0.5"]);
    let status = sandbox.wait_for_worker_exit(refused, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(78),
        "a worker refused for a config mismatch exits 78:\n{}",
        sandbox.logs()
    );

    sandbox.wait_for_commits(2, Duration::from_secs(120));
    sandbox.stop_worker(1);
    let status = sandbox.wait_for_worker_exit(1, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(75),
        "a worker drained before the job finished exits 75:\n{}",
        sandbox.logs()
    );
    assert!(
        sandbox.worker_output(1).contains("the job is not finished"),
        "{}",
        sandbox.logs()
    );

    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert_eq!(end.coordinator.code(), Some(0), "{logs}");
    assert_eq!(end.worker("w0").code(), Some(0), "{logs}");
    sandbox.assert_ledger_complete(&[1, 2]);
    let coordinator = sandbox.coordinator_output();
    assert!(
        coordinator.contains("training starts when all 3 have registered")
            && coordinator.contains("of 3 expected workers"),
        "the coordinator says what it waits for and that the formation wait is over:\n{logs}"
    );
}

#[test]
fn a_worker_whose_coordinator_is_gone_for_good_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), 50);
    let mut sandbox =
        Sandbox::start(SandboxSpec::new(&config, 1).worker_args(&["--rpc-retry-deadline", "2"]));
    sandbox.wait_for_commits(1, Duration::from_secs(120));
    sandbox.kill_coordinator();
    let status = sandbox.wait_for_worker_exit(0, Duration::from_secs(60));
    let logs = sandbox.logs();
    assert_eq!(status.code(), Some(75), "{logs}");
    assert!(
        sandbox.worker_output(0).contains("gave up after retrying"),
        "the worker gave up for the intended reason:\n{logs}"
    );
}

/// A process whose output goes to a file (read while it runs).
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Logged {
    fn start(mut command: Command, log: PathBuf) -> Logged {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Logged { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `needle` (panics after `limit` or when the
    /// process exits first).
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.output().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before {needle:?}:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn second_coordinator(sandbox: &Sandbox, lock_wait_s: &str, log: PathBuf) -> Logged {
    let mut command = Command::new(hsat_binary());
    command
        .args(["coordinator", "--config"])
        .arg(sandbox.config())
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--token-file"])
        .arg(sandbox.token_file())
        .args(["--set", &format!("cluster.lock_wait_s={lock_wait_s}")]);
    Logged::start(command, log)
}

#[test]
fn a_second_coordinator_on_one_out_dir_waits_for_the_lock_and_takes_over_only_when_the_first_is_gone()
 {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), 1);
    // The first coordinator waits for a worker that never comes: it keeps the job.
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 1).start_workers(0));
    let first = sandbox.pids()[0];
    let lock = sandbox.out_dir().join("coordinator/lock");
    let note = std::fs::read_to_string(&lock).unwrap();
    assert!(note.contains(&format!("pid={first}")), "{note}");

    let started = Instant::now();
    let mut impatient = second_coordinator(&sandbox, "2", dir.path().join("impatient.log"));
    let status = impatient.wait(Duration::from_secs(30));
    let output = impatient.output();
    assert_eq!(status.code(), Some(75), "{output}");
    assert!(started.elapsed() >= Duration::from_secs(2), "{output}");
    assert!(
        output.contains("another coordinator holds this job")
            && output.contains(&format!("pid {first}")),
        "it names the holder:\n{output}"
    );
    assert!(
        !output.contains("listening on"),
        "it never served the job:\n{output}"
    );

    let mut patient = second_coordinator(&sandbox, "120", dir.path().join("patient.log"));
    patient.wait_for("holds this job's lock", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !patient.output().contains("listening on"),
        "{}",
        patient.output()
    );
    sandbox.kill_coordinator();
    patient.wait_for("listening on", Duration::from_secs(30));
    let note = std::fs::read_to_string(&lock).unwrap();
    assert!(
        note.contains(&format!("pid={}", patient.child.id())),
        "the new holder wrote its note: {note}"
    );
    assert!(
        patient.output().contains("took over this job's lock"),
        "{}",
        patient.output()
    );
}

#[test]
fn health_is_not_serving_while_the_coordinator_indexes_and_serving_once_the_job_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiles");
    synth_dataset(
        &data,
        &[
            "--format",
            "manifest",
            "--classes",
            "2",
            "--patients-per-class",
            "2",
            "--slides",
            "1",
            "--patches",
            "2",
            "--size",
            "32",
        ],
    );
    // The manifest is a FIFO: indexing blocks on it until the test writes it, so the
    // coordinator is "indexing" for as long as the test needs.
    let manifest = std::fs::read_to_string(data.join("manifest.csv")).unwrap();
    let fifo = data.join("manifest-fifo.csv");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let config = dir.path().join("job.toml");
    std::fs::write(
        &config,
        format!(
            "[infra]\nout_dir = {:?}\n[data]\nsource = \"manifest\"\nmanifest = {:?}\nimage_size = 32\n\
             [model]\nbackbone = \"small_cnn\"\n[training]\nbatch_size = 2\nnum_epochs = 1\n",
            dir.path().join("run").display().to_string(),
            fifo.display().to_string()
        ),
    )
    .unwrap();
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 1)
            .start_workers(0)
            .listening_only(),
    );
    // A worker that starts meanwhile (its own copy of the manifest: data.manifest
    // is per machine) keeps registering for its connect timeout, not only for its
    // 1 s retry deadline: it must still be there when the coordinator is ready.
    let manifest_path = data.join("manifest.csv");
    let worker_manifest = format!("data.manifest={:?}", manifest_path.display().to_string());
    sandbox.add_worker_with(&["--set", &worker_manifest, "--rpc-retry-deadline", "1"]);
    let address = format!("http://{}", sandbox.address());
    let token = hsat_proto::auth::read_token_file(sandbox.token_file(), "the sandbox").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = hsat_proto::client::CoordinatorClient::connect(&address)
            .await
            .unwrap()
            .with_token(Some(&token));
        // Indexing (blocked on the FIFO): alive, not serving, calls refused as
        // retryable.
        for _ in 0..3 {
            assert!(!client.serving().await.unwrap(), "{}", sandbox.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match client.status().await {
            Err(hsat_proto::ApiError::Unavailable(message)) => {
                assert!(message.contains("starting"), "{message}");
            }
            other => panic!("expected UNAVAILABLE while starting, got {other:?}"),
        }
        // Longer than the worker's retry deadline.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The index arrives: the job loads and health turns SERVING.
        let writer = std::thread::spawn(move || std::fs::write(&fifo, manifest).unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.serving().await.unwrap_or(false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not SERVING 30 s after the index was written:\n{}",
                sandbox.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        writer.join().unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sandbox.coordinator_output().contains("worker registered") {
        assert!(
            Instant::now() < deadline,
            "the worker started during indexing never registered:\n{}",
            sandbox.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        sandbox
            .worker_output(0)
            .contains("retrying a coordinator call"),
        "the worker was told to wait while the coordinator started:\n{}",
        sandbox.logs()
    );
}
