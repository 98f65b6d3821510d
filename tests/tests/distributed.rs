//! Distributed training with real processes on localhost: a coordinator and 2 or 3
//! `hsat worker` processes train HSAT on a `hsat synth` dataset.
//!
//! What is checked, from the outside, as an operator would:
//! - the job completes and leaves a final checkpoint;
//! - after every committed step all ranks' parameter checksums are equal (the
//!   coordinator also fails the job on a mismatch; the ledger shows each rank's);
//! - the patients consumed in each epoch are exactly that epoch's balanced list;
//! - a worker with another config or dataset is refused with a message naming it;
//! - `kill -9` of a worker mid-run: the survivors regroup and finish the job, and
//!   still every patient is trained exactly once per epoch.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hsat_core::config::{self, ConfigSources};
use hsat_core::dataset::{DatasetIndex, Split};
use hsat_core::sampler::{balanced_patients, steps_per_epoch};
use hsat_tests::{hsat_binary, run_hsat, synth_dataset};

/// The scenarios start several processes each; on a small machine they run one at
/// a time so that leases and collective timeouts measure the code, not contention.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A small OpenSRH-style dataset: 2 classes x 3 patients (2 train + 1 val each),
/// 2 slides of `patches` patches, 32 px.
fn synth(dir: &Path, seed: u64) -> PathBuf {
    synth_with(dir, seed, 3)
}

fn synth_with(dir: &Path, seed: u64, patches: usize) -> PathBuf {
    let data = dir.join(format!("data-{seed}-{patches}"));
    synth_dataset(
        &data,
        &[
            "--format",
            "opensrh",
            "--classes",
            "2",
            "--patients-per-class",
            "3",
            "--slides",
            "2",
            "--patches",
            &patches.to_string(),
            "--size",
            "32",
            "--seed",
            &seed.to_string(),
        ],
    );
    data
}

fn write_config(dir: &Path, data: &Path, batch_size: usize, epochs: usize) -> PathBuf {
    write_config_with(dir, data, batch_size, epochs, 1)
}

fn write_config_with(
    dir: &Path,
    data: &Path,
    batch_size: usize,
    epochs: usize,
    attack_iters: usize,
) -> PathBuf {
    let text = format!(
        r#"
[infra]
seed = 11
out_dir = "{out}"
threads = 1
log_every = 1
[data]
source = "opensrh"
db_root = "{data}"
image_size = 32
[data.loader]
threads = 1
[data.hidisc]
num_slide_samples = 2
num_patch_samples = 2
num_transforms = 2
[model]
backbone = "small_cnn"
num_embedding_out = 8
[training]
batch_size = {batch_size}
num_epochs = {epochs}
only_adv = true
save_checkpoint_interval = 0
[training.attack]
name = "pgd"
iters = {attack_iters}
"#,
        out = dir.join("run").display(),
        data = data.display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One committed step of the ledger: its epoch, the patient indices of every
/// rank's shard (in rank order), and every rank's checksum.
#[derive(Debug)]
struct Committed {
    epoch: u64,
    patients: Vec<usize>,
    checksums: Vec<u64>,
}

/// The committed steps of `<out>/coordinator/ledger.jsonl`, by step (a step redone
/// after a rollback keeps its last commit).
fn ledger(run_dir: &Path) -> BTreeMap<u64, Committed> {
    let text = std::fs::read_to_string(run_dir.join("coordinator/ledger.jsonl")).unwrap();
    let mut steps = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        // Commit records carry every rank's shard; other records (rollbacks) do not.
        let Some(ranks) = record["ranks"].as_array() else {
            continue;
        };
        let patients = ranks
            .iter()
            .flat_map(|r| r["patients"].as_array().unwrap().iter())
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        let checksums = ranks
            .iter()
            .map(|r| r["checksum"].as_u64().unwrap())
            .collect();
        steps.insert(
            record["step"].as_u64().unwrap(),
            Committed {
                epoch: record["epoch"].as_u64().unwrap(),
                patients,
                checksums,
            },
        );
    }
    steps
}

/// Asserts the ledger holds every step of the job once, all ranks agreed on the
/// parameters after each, and each epoch consumed exactly its balanced list.
fn assert_ledger_complete(config_path: &Path, run_dir: &Path, world_sizes: &[usize]) {
    let cfg = config::load(&ConfigSources {
        file: Some(config_path.to_path_buf()),
        env: Default::default(),
        overrides: Vec::new(),
    })
    .unwrap();
    let index = DatasetIndex::load(&cfg.data).unwrap();
    let balanced = balanced_patients(
        &index,
        Split::Train,
        cfg.infra.seed,
        cfg.data.balance_study_per_class,
    );
    let per_epoch = steps_per_epoch(balanced.len(), cfg.training.batch_size);
    let total = per_epoch * cfg.training.num_epochs as u64;
    let steps = ledger(run_dir);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>(),
        "every step committed once"
    );
    let mut sorted_balanced = balanced.clone();
    sorted_balanced.sort_unstable();
    for epoch in 0..cfg.training.num_epochs as u64 {
        let mut consumed: Vec<usize> = steps
            .values()
            .filter(|c| c.epoch == epoch)
            .flat_map(|c| c.patients.iter().copied())
            .collect();
        consumed.sort_unstable();
        assert_eq!(
            consumed, sorted_balanced,
            "epoch {epoch} consumed exactly the balanced list"
        );
    }
    for (step, commit) in &steps {
        assert!(
            world_sizes.contains(&commit.checksums.len()),
            "step {step}: {} ranks reported",
            commit.checksums.len()
        );
        assert!(
            commit.checksums.windows(2).all(|w| w[0] == w[1]),
            "step {step}: ranks' parameters differ: {:?}",
            commit.checksums
        );
    }
}

fn run_local_job(workers: usize, batch_size: usize) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 5);
    let config = write_config(dir.path(), &data, batch_size, 2);
    let out = Command::new(hsat_binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .args(["--workers", &workers.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hsat run --workers {workers} failed:\n{stdout}\n{stderr}"
    );
    // The coordinator's progress line per committed step (on the log stream).
    let output = format!("{stdout}{stderr}");
    assert!(
        output.contains("epoch 1") && output.contains("adv: patient"),
        "progress lines name the epoch and the per-level losses:\n{output}"
    );
    let run_dir = dir.path().join("run");
    assert_ledger_complete(&config, &run_dir, &[workers]);
    let checkpoints: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert!(!checkpoints.is_empty(), "a final checkpoint was written");
}

#[test]
fn two_workers_train_to_completion() {
    // 3 patients per step over 2 ranks: shards of 2 and 1 (uneven, weighted mean).
    run_local_job(2, 3);
}

#[test]
fn three_workers_train_to_completion() {
    run_local_job(3, 4);
}

/// A coordinator process started by a test, killed when dropped.
struct Coordinator {
    child: Child,
    address: String,
}

impl Coordinator {
    fn start(config: &Path, workers: usize, extra: &[&str]) -> Self {
        let mut child = Command::new(hsat_binary())
            .args(["coordinator", "--config", config.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("the coordinator printed its address")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Coordinator { child, address }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker(coordinator: &Coordinator, config: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(hsat_binary());
    command
        .args(["worker", "--coordinator", &coordinator.address])
        .args(["--config", config.to_str().unwrap()])
        .args(["--connect-timeout", "20"])
        .args(extra);
    command
}

#[test]
fn a_worker_with_another_config_or_dataset_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 5);
    // Another dataset: one more patch per slide (the fingerprint covers the index).
    let other_data = synth_with(dir.path(), 5, 4);
    let config = write_config(dir.path(), &data, 2, 1);
    let coordinator = Coordinator::start(&config, 2, &[]);

    let status = run_hsat(&["status", "--coordinator", &coordinator.address]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("waiting for workers") && text.contains("step 0/"),
        "hsat status shows the job waiting:\n{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let out = worker(
        &coordinator,
        &config,
        &["--set", "training.learning_rate=0.5"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a mismatched config must be refused");
    assert!(
        stderr.contains("training.learning_rate") && stderr.contains("0.5"),
        "the refusal names the key and both values:\n{stderr}"
    );

    let other_root = format!("data.db_root={}", other_data.display());
    let out = worker(&coordinator, &config, &["--set", &other_root])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another dataset must be refused");
    assert!(
        stderr.contains("fingerprint"),
        "the refusal names the dataset fingerprints:\n{stderr}"
    );
}

#[test]
fn killing_a_worker_mid_run_leaves_the_survivors_to_finish() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 5);
    // 2 patients per step over 3 ranks (one shard empty), 12 epochs of 2 steps:
    // long enough to kill a worker in the middle.
    let config = write_config_with(dir.path(), &data, 2, 12, 3);
    let coordinator = Coordinator::start(&config, 3, &["--lease-ms", "3000"]);
    let mut workers: Vec<Child> = (0..3)
        .map(|k| {
            worker(&coordinator, &config, &["--name", &format!("w{k}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let ledger_path = dir.path().join("run/coordinator/ledger.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&ledger_path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step committed in time"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // kill -9: no goodbye, the lease or a peer's failed collective must notice.
    workers[1].kill().unwrap();
    workers[1].wait().unwrap();

    let mut coordinator = coordinator;
    let status = wait_with_deadline(&mut coordinator.child, Duration::from_secs(240));
    assert!(status.success(), "the job finished after losing a worker");
    for (k, child) in workers.iter_mut().enumerate() {
        if k == 1 {
            continue;
        }
        let status = wait_with_deadline(child, Duration::from_secs(60));
        assert!(status.success(), "surviving worker {k} exited cleanly");
    }
    let run_dir = dir.path().join("run");
    assert_ledger_complete(&config, &run_dir, &[2, 3]);
    let text = std::fs::read_to_string(run_dir.join("coordinator/ledger.jsonl")).unwrap();
    assert!(
        text.lines().any(|line| line.contains("\"generation\":2")),
        "the survivors formed a second generation:\n{text}"
    );
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
