//! Distributed training with real processes on localhost: a coordinator and 2 or 3
//! `hsat worker` processes train HSAT on a `hsat synth` dataset.
//!
//! What is checked, from the outside, as an operator would:
//! - the job completes and leaves a final checkpoint;
//! - after every committed step all ranks' parameter checksums are equal (the
//!   coordinator also fails the job on a mismatch; the ledger shows each rank's);
//! - the patients consumed in each epoch are exactly that epoch's balanced list;
//! - a worker with another config or dataset reaches the coordinator and is refused
//!   by it, with a message naming the difference, and the coordinator logs it;
//! - `kill -9` of a worker mid-run: the survivors regroup and finish the job, and
//!   still every patient is trained exactly once per epoch;
//! - SIGTERM to a worker: it leaves after its step, the others regroup at once
//!   (without waiting for its lease) and finish;
//! - a killed worker restarted under the same name joins again and the job
//!   completes.
//!
//! `hsat run --workers N` runs its coordinator in-process (one command); the other
//! scenarios drive a [`Sandbox`] of separate processes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hsat_core::config::{self, ConfigSources};
use hsat_core::dataset::DatasetIndex;
use hsat_tests::{
    Ledger, Sandbox, SandboxSpec, SmallJob, hsat_binary, run_hsat, synth_opensrh,
    write_small_job_config,
};

/// The scenarios start several processes each; on a small machine they run one at
/// a time so that leases and collective timeouts measure the code, not contention.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    write_small_job_config(
        dir,
        &SmallJob {
            data: data.to_path_buf(),
            batch_size,
            epochs,
            attack_iters,
        },
    )
}

fn run_local_job(workers: usize, batch_size: usize) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
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
    let ledger = Ledger::read(&run_dir).unwrap();
    if let Err(violation) = ledger.check_complete(&config, &[workers]) {
        panic!("the ledger is not complete: {violation}\n{output}");
    }
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

/// The fingerprint the coordinator computes for the dataset `config` names, with
/// `overrides` applied.
fn fingerprint(config: &Path, overrides: &[String]) -> String {
    let cfg = config::load(&ConfigSources {
        file: Some(config.to_path_buf()),
        env: Default::default(),
        overrides: overrides.to_vec(),
    })
    .unwrap();
    DatasetIndex::load(&cfg.data).unwrap().fingerprint
}

#[test]
fn a_worker_with_another_config_or_dataset_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    // Another dataset: one more patch per slide (the fingerprint covers the index).
    let other_data = synth_opensrh(dir.path(), 5, 4);
    let config = write_config(dir.path(), &data, 2, 1);
    // The coordinator waits for 2 workers; none is started with it.
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 2).start_workers(0));

    let status = run_hsat(&[
        "status",
        "--coordinator",
        sandbox.address(),
        "--token-file",
        &sandbox.token_file().display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("waiting for workers") && text.contains("step 0/"),
        "hsat status shows the job waiting:\n{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // A real key with another value: the worker's own config loads, so only the
    // coordinator's comparison can turn it away.
    let k = sandbox.add_worker_with(&["--set", "training.learn_rate=0.5"]);
    let exit = sandbox.wait_for_worker_exit(k, Duration::from_secs(60));
    let worker_output = sandbox.worker_output(k);
    let logs = sandbox.logs();
    assert!(
        !exit.success(),
        "a mismatched config must be refused:\n{logs}"
    );
    assert!(
        worker_output.contains("cannot register with the coordinator")
            && worker_output.contains(
                "refused: config differs from the coordinator's at training.learn_rate: worker 0.5, coordinator 0.001"
            ),
        "the worker reached the coordinator, which named the key and both values:\n{logs}"
    );
    let coordinator_output = sandbox.coordinator_output();
    assert!(
        refusal_logged(
            &coordinator_output,
            "w0",
            "config differs from the coordinator's at training.learn_rate"
        ),
        "the coordinator logs the refused registration with the worker's name, address and reason:\n{logs}"
    );

    let other_root = format!("data.db_root={}", other_data.display());
    let ours = fingerprint(&config, &[]);
    let theirs = fingerprint(&config, std::slice::from_ref(&other_root));
    assert_ne!(ours, theirs, "the two datasets must differ for this test");
    let k = sandbox.add_worker_with(&["--set", &other_root]);
    let exit = sandbox.wait_for_worker_exit(k, Duration::from_secs(60));
    let worker_output = sandbox.worker_output(k);
    let logs = sandbox.logs();
    assert!(!exit.success(), "another dataset must be refused:\n{logs}");
    assert!(
        worker_output.contains("cannot register with the coordinator")
            && worker_output.contains(&format!(
                "refused: dataset differs: worker fingerprint {theirs}, coordinator {ours}"
            )),
        "the worker reached the coordinator, which named both fingerprints:\n{logs}"
    );
    assert!(
        refusal_logged(&sandbox.coordinator_output(), "w1", "dataset differs"),
        "the coordinator logs the refused dataset:\n{logs}"
    );

    // Neither was admitted: the job still waits for its two workers.
    let status = run_hsat(&[
        "status",
        "--coordinator",
        sandbox.address(),
        "--token-file",
        &sandbox.token_file().display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("waiting for workers") && text.contains("step 0/"),
        "a refused worker does not join:\n{text}"
    );
}

/// Whether the coordinator's output has its `registration refused` warning for
/// `worker`, with the peer address and a reason starting with `reason`.
fn refusal_logged(output: &str, worker: &str, reason: &str) -> bool {
    output.lines().any(|line| {
        line.contains("WARN")
            && line.contains("registration refused")
            && line.contains(&format!("worker={worker} "))
            && line.contains("peer=127.0.0.1")
            && line.contains(&format!("reason={reason}"))
    })
}

/// 2 patients per step over 3 ranks (one shard empty), 12 epochs of 2 steps: long
/// enough to kill, stop or restart a worker in the middle.
fn long_job(dir: &Path) -> PathBuf {
    let data = synth_opensrh(dir, 5, 3);
    write_config_with(dir, &data, 2, 12, 3)
}

#[test]
fn killing_a_worker_mid_run_leaves_the_survivors_to_finish() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = long_job(dir.path());
    let mut sandbox =
        Sandbox::start(SandboxSpec::new(&config, 3).coordinator_args(&["--lease-ms", "3000"]));
    sandbox.wait_for_commits(1, Duration::from_secs(120));
    // kill -9: no goodbye, the lease or a peer's failed collective must notice.
    sandbox.kill_worker(1);

    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert!(
        end.coordinator.success(),
        "the job finished after losing a worker:\n{logs}"
    );
    for name in ["w0", "w2"] {
        assert!(
            end.worker(name).success(),
            "surviving worker {name} exited cleanly:\n{logs}"
        );
    }
    sandbox.assert_ledger_complete(&[2, 3]);
    let ledger = sandbox.ledger();
    assert!(
        ledger.generations().contains(&2),
        "the survivors formed a second generation: {:?}\n{logs}",
        ledger.generations()
    );
}

#[test]
fn a_worker_stopped_with_sigterm_leaves_and_the_others_regroup_without_its_lease() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = long_job(dir.path());
    // A lease far longer than the wait below: only the worker's own goodbye can
    // make the others regroup in time.
    let lease = Duration::from_secs(120);
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 3)
            .coordinator_args(&["--lease-ms", &lease.as_millis().to_string()]),
    );
    sandbox.wait_for_commits(1, Duration::from_secs(120));
    sandbox.stop_worker(1);
    let stopped = Instant::now();

    let exit = sandbox.wait_for_worker_exit(1, Duration::from_secs(60));
    // It left cleanly (after its step, with a goodbye), but before the job
    // finished: 75, retryable (hsat_core::exit), not 0.
    assert_eq!(
        exit.code(),
        Some(75),
        "a worker stopped with SIGTERM exits 75:\n{}",
        sandbox.logs()
    );
    let ledger = sandbox.wait_for_ledger(
        "a step committed by 2 ranks",
        Duration::from_secs(60),
        |ledger| ledger.commits().any(|c| c.ranks.len() == 2),
    );
    assert!(
        stopped.elapsed() < lease,
        "the others regrouped only after {:?}, the lease is {lease:?}",
        stopped.elapsed()
    );
    let first_of_two = ledger.commits().find(|c| c.ranks.len() == 2).unwrap();
    assert!(
        first_of_two.ranks.iter().all(|r| r.worker_name != "w1"),
        "the stopped worker is out of the new generation: {first_of_two:?}"
    );

    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert!(end.coordinator.success(), "the job finished:\n{logs}");
    for name in ["w0", "w2"] {
        assert!(end.worker(name).success(), "{name} exited cleanly:\n{logs}");
    }
    let coordinator_output = sandbox.coordinator_output();
    assert!(
        coordinator_output.contains("worker left") && !coordinator_output.contains("lease expired"),
        "the coordinator saw the worker leave, not its lease run out:\n{logs}"
    );
    sandbox.assert_ledger_complete(&[2, 3]);
}

#[test]
fn a_killed_worker_restarted_under_its_name_joins_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = long_job(dir.path());
    let mut sandbox =
        Sandbox::start(SandboxSpec::new(&config, 3).coordinator_args(&["--lease-ms", "3000"]));
    let before = sandbox.wait_for_commits(1, Duration::from_secs(120));
    let generation_at_kill = before.generations().into_iter().max().unwrap();
    sandbox.kill_worker(1);
    sandbox.restart_worker(1);

    // Only the fresh process can appear in a later generation under this name.
    let ledger = sandbox.wait_for_ledger(
        "a step trained by the restarted w1",
        Duration::from_secs(180),
        |ledger| {
            ledger.commits().any(|c| {
                c.generation > generation_at_kill && c.ranks.iter().any(|r| r.worker_name == "w1")
            })
        },
    );
    let rejoined = ledger
        .commits()
        .find(|c| {
            c.generation > generation_at_kill && c.ranks.iter().any(|r| r.worker_name == "w1")
        })
        .unwrap();
    assert_eq!(
        rejoined.ranks.len(),
        3,
        "the restarted worker trains beside both others: {rejoined:?}"
    );

    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert!(end.coordinator.success(), "the job finished:\n{logs}");
    for name in ["w0", "w1", "w2"] {
        assert!(end.worker(name).success(), "{name} exited cleanly:\n{logs}");
    }
    sandbox.assert_ledger_complete(&[2, 3]);
}
