//! Preemption of the coordinator with real processes: SIGTERM to `hsat coordinator`
//! (what Kubernetes sends before deleting a pod) while 2 workers train.
//!
//! What is checked, from the outside: the coordinator stops issuing steps, lets the
//! issued ones commit, gets a checkpoint of the last committed step written (rank 0
//! does not checkpoint on its own in this job: `save_checkpoint_interval = 0`), and
//! exits within its grace with the documented code (75: cancelled, retryable, so
//! that a restart policy brings it back to resume); the checkpoint verifies against its manifest and
//! holds exactly the ledger's committed steps; the workers stop too.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hsat_tests::{Sandbox, SandboxSpec, SmallJob, synth_opensrh, write_small_job_config};

#[test]
fn a_coordinator_stopped_with_sigterm_drains_checkpoints_the_committed_step_and_exits_within_grace()
{
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 12,
            attack_iters: 3,
        },
    );
    let grace = Duration::from_secs(20);
    let grace_s = grace.as_secs().to_string();
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 2).coordinator_args(&[
        "--grace-s",
        &grace_s,
        // The cross-key rules: regroup wait < grace, collective timeout < regroup wait.
        "--regroup-wait-s",
        "10",
        "--set",
        "cluster.collective_timeout_s=5",
    ]));
    sandbox.wait_for_commits(2, Duration::from_secs(120));
    sandbox.stop_coordinator();
    let stopped = Instant::now();

    let end = sandbox.wait_for_end(grace + Duration::from_secs(30));
    let took = stopped.elapsed();
    let logs = sandbox.logs();
    assert!(
        took < grace,
        "the coordinator and its workers exited {took:?} after SIGTERM, the grace is {grace:?}:\n{logs}"
    );
    assert_eq!(
        end.coordinator.code(),
        Some(75),
        "a cancelled job exits with 75 (retryable; hsat_core::exit):\n{logs}"
    );
    let output = sandbox.coordinator_output();
    assert!(
        output.contains("was stopped after") && !output.contains("grace is over"),
        "the coordinator reports the cancellation and did not run out of grace:\n{logs}"
    );

    // Every issued step committed in order, and the checkpoint holds exactly them.
    let ledger = sandbox.ledger();
    let committed = ledger.committed();
    let steps = committed.len() as u64;
    assert!(steps >= 2);
    assert_eq!(
        committed.keys().copied().collect::<Vec<_>>(),
        (0..steps).collect::<Vec<_>>()
    );
    let checkpoint = sandbox
        .out_dir()
        .join("checkpoints")
        .join(hsat_core::checkpoint::checkpoint_dir_name(steps));
    let manifest = hsat_core::checkpoint::verify(&checkpoint).unwrap_or_else(|err| {
        panic!(
            "the checkpoint of the last committed step {} does not verify: {err}\n{logs}",
            checkpoint.display()
        )
    });
    assert_eq!(manifest.step, steps);
    assert!(
        output.contains("written and verifies"),
        "the coordinator checked the checkpoint before exiting:\n{logs}"
    );
}
