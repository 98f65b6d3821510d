//! A worker carries on through a coordinator outage: a coordinator and a real
//! `hsat worker` of the cluster sandbox talk through a [`FaultProxy`], which is cut
//! (connections closed, new ones refused) for a few seconds after the first committed
//! step.
//!
//! - With the default retry deadline the worker retries (and logs it), the job
//!   completes and the ledger holds every step once.
//! - With a retry deadline shorter than the outage the worker exits non-zero,
//!   saying it gave up after retrying, and what it was trying to do.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hsat_tests::proxy::FaultProxy;
use hsat_tests::{Sandbox, SandboxSpec, SmallJob, synth_opensrh, write_small_job_config};

/// Both scenarios start processes; one at a time keeps timings honest.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 2 classes x 3 patients (4 train patients), 2 slides x 3 patches of 32 px; batch
/// 2: 2 steps per epoch, `epochs` epochs of small_cnn with a 1-step attack.
fn job(dir: &Path, epochs: usize) -> PathBuf {
    let data = synth_opensrh(dir, 3, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 2,
            epochs,
            attack_iters: 1,
        },
    )
}

/// A coordinator waiting for one worker, and that worker started through a fault
/// proxy with `extra` flags.
fn cluster_behind_proxy(config: PathBuf, extra: &[&str]) -> (Sandbox, FaultProxy, usize) {
    let mut sandbox = Sandbox::start(SandboxSpec::new(config, 1).start_workers(0));
    let proxy = FaultProxy::start(sandbox.address().parse().unwrap()).unwrap();
    let through = proxy.address().to_string();
    let worker = sandbox.add_worker_through(&through, extra);
    (sandbox, proxy, worker)
}

#[test]
fn a_worker_retries_through_a_coordinator_outage_and_the_job_completes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let epochs = 10;
    let (mut sandbox, proxy, worker) = cluster_behind_proxy(job(dir.path(), epochs), &[]);
    let before = sandbox
        .wait_for_commits(1, Duration::from_secs(60))
        .committed()
        .len();
    proxy.cut();
    std::thread::sleep(Duration::from_secs(3));
    let during = sandbox.ledger().committed().len();
    proxy.restore();
    let end = sandbox.wait_for_end(Duration::from_secs(120));
    let log = sandbox.worker_output(worker);
    assert!(
        end.coordinator.success() && end.worker("w0").success(),
        "the job finished ({end:?}):\n{}",
        sandbox.logs()
    );
    let total = 2 * epochs;
    assert!(
        before < total && during < total,
        "the outage fell mid-job: {before} then {during} of {total} steps committed"
    );
    assert!(
        log.contains("retrying a coordinator call"),
        "the worker logged its retries:\n{log}"
    );
    // What the outage looked like from the worker (shown with --nocapture).
    for line in log
        .lines()
        .filter(|l| l.contains("retrying a coordinator call"))
    {
        eprintln!("{line}");
    }
    assert!(
        proxy.accepted() >= 2,
        "the worker reconnected after the cut ({} connections)",
        proxy.accepted()
    );
    // Every step committed once, in order, each epoch's patients exactly once.
    sandbox.assert_ledger_complete(&[1]);
}

#[test]
fn a_worker_gives_up_when_the_outage_outlasts_its_retry_deadline() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (mut sandbox, proxy, worker) =
        cluster_behind_proxy(job(dir.path(), 10), &["--rpc-retry-deadline", "1"]);
    sandbox.wait_for_commits(1, Duration::from_secs(60));
    proxy.cut();
    // Never restored: the worker must give up on its own, well before its lease.
    let status = sandbox.wait_for_worker_exit(worker, Duration::from_secs(30));
    let log = sandbox.worker_output(worker);
    assert!(
        !status.success(),
        "the worker exited with an error ({status:?}):\n{log}"
    );
    let error = log
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("the worker printed its error:\n{log}"));
    assert!(
        error.contains("gave up after retrying for ")
            && error.contains("coordinator unavailable")
            && (error.contains("cannot ask the coordinator for work")
                || error.contains("cannot report a step")),
        "the error names the call, the retries and the cause: {error}"
    );
    eprintln!("{error}");
    assert!(
        log.contains("retrying a coordinator call"),
        "it retried before giving up:\n{log}"
    );
}
