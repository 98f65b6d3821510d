//! The cluster sandbox itself: a deadline that passes panics with every process's
//! output, and no process outlives the sandbox, whether the scenario failed or not.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use hsat_tests::{
    Sandbox, SandboxSpec, SmallJob, process_alive, synth_opensrh, write_small_job_config,
};

/// A job whose coordinator waits for 2 workers: with fewer it never commits.
fn waiting_job(dir: &Path) -> std::path::PathBuf {
    let data = synth_opensrh(dir, 5, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 1,
            attack_iters: 1,
        },
    )
}

#[test]
fn a_passed_deadline_panics_with_every_log_and_kills_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = waiting_job(dir.path());
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 2).start_workers(1));
    let pids = sandbox.pids();
    assert_eq!(pids.len(), 2, "a coordinator and one worker");
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sandbox.wait_for_commits(1, Duration::from_secs(2));
    }))
    .unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("the ledger did not show 1 committed steps within 2s"),
        "the panic says which wait ran out:\n{message}"
    );
    assert!(
        message.contains("----- coordinator (exited")
            && message.contains("listening on")
            && message.contains("----- w0 (exited"),
        "the panic carries every process's output:\n{message}"
    );
    for pid in pids {
        assert!(
            !process_alive(pid),
            "process {pid} outlived the failed wait"
        );
    }
}

#[test]
fn dropping_the_sandbox_kills_its_processes() {
    let dir = tempfile::tempdir().unwrap();
    let config = waiting_job(dir.path());
    let sandbox = Sandbox::start(SandboxSpec::new(&config, 2).start_workers(1));
    let pids = sandbox.pids();
    assert!(
        pids.iter().all(|&pid| process_alive(pid)),
        "both run while waiting"
    );
    drop(sandbox);
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} outlived the sandbox");
    }
}
