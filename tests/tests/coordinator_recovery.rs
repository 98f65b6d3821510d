//! A job survives its coordinator, with real processes on localhost:
//!
//! - `kill -9` of the coordinator after a few commits and its restart on the same
//!   port and out_dir: the same worker processes (same PIDs, never restarted)
//!   register again, the job finishes, the ledger holds every step exactly once
//!   with equal checksums across ranks;
//! - running a finished job again trains nothing, exits 0 and leaves the ledger's
//!   bytes as they were;
//! - a different config on the same out_dir is refused, naming the key.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hsat_tests::{
    Sandbox, SandboxSpec, SmallJob, hsat_binary, process_alive, synth_opensrh,
    write_small_job_config,
};

/// 2 patients per step over 2 ranks, enough steps to kill the coordinator mid-job.
fn job(dir: &Path) -> PathBuf {
    let data = synth_opensrh(dir, 5, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 6,
            attack_iters: 2,
        },
    )
}

#[test]
fn a_killed_coordinator_restarted_on_the_same_out_dir_finishes_the_job_with_the_same_workers() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path());
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 2)
            .coordinator_args(&["--lease-ms", "3000"])
            .worker_args(&["--collective-timeout", "10"]),
    );
    sandbox.wait_for_commits(3, Duration::from_secs(120));
    let worker_pids: Vec<u32> = sandbox.pids().into_iter().skip(1).collect();
    sandbox.kill_coordinator();
    let before = sandbox.ledger().committed().len();
    assert_eq!(
        sandbox.ledger().end(),
        None,
        "the coordinator was killed mid-job ({before} steps committed)"
    );
    sandbox.restart_coordinator(&[]);
    let end = sandbox.wait_for_end(Duration::from_secs(300));
    assert!(end.coordinator.success(), "{}", sandbox.logs());
    assert_eq!(end.workers.len(), 2, "no worker was restarted");
    for (name, status) in &end.workers {
        assert!(status.success(), "{name}: {status}\n{}", sandbox.logs());
    }
    for pid in &worker_pids {
        assert!(
            sandbox.pids().contains(pid) && !process_alive(*pid),
            "worker {pid} ran until the end"
        );
    }
    sandbox.assert_ledger_complete(&[2]);
    let ledger = sandbox.ledger();
    assert_eq!(ledger.starts(), 2, "two coordinator starts");
    assert_eq!(ledger.end(), Some("finished"));
    let logs = sandbox.logs();
    assert!(
        logs.contains(&format!("at step {before}")) || logs.contains("resuming job"),
        "the restarted coordinator says it resumes:\n{logs}"
    );
    assert!(
        logs.contains("registering again"),
        "the workers re-registered:\n{logs}"
    );
}

#[test]
fn a_finished_job_is_not_trained_again_and_another_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 1,
            attack_iters: 1,
        },
    );
    let run = |extra: &[&str]| {
        Command::new(hsat_binary())
            .args([
                "run",
                "--config",
                config.to_str().unwrap(),
                "--workers",
                "2",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let ledger = dir.path().join("run/coordinator/ledger.jsonl");
    let bytes = std::fs::read(&ledger).unwrap();

    let again = run(&[]);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(stdout.contains("already finished"), "{stdout}");
    assert_eq!(
        std::fs::read(&ledger).unwrap(),
        bytes,
        "the ledger is untouched"
    );

    let other = run(&["--set", "training.learn_rate=0.5"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(
        stderr.contains("training.learn_rate: ledger 0.001, now 0.5")
            && stderr.contains("--new-job"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&ledger).unwrap(), bytes);
}
