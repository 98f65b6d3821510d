//! Chaos: a 3-worker job whose processes are killed with SIGKILL on a seeded
//! schedule (workers, restarted after a random pause, and the coordinator once,
//! restarted on the same address and `out_dir`), at random moments, including
//! while rank 0 writes a checkpoint. The job must finish, and its ledger must hold
//! every step exactly once, every epoch's patients exactly its balanced list and
//! equal checksums on all ranks; and the final parameters must equal, bit for bit,
//! those of the same job run undisturbed.
//!
//! Bitwise equality is possible because the job sets `cluster.min_workers = 3`:
//! every step is trained by 3 ranks (while a worker is down the job pauses), so the
//! per-rank loss sees the same shards as in the undisturbed run; a step is redone
//! from the exact state (a survivor's, or a complete checkpoint with the AdamW
//! moments), and a step's content depends only on (seed, config, step).
//!
//! The schedule's seed is printed; `HSAT_CHAOS_SEED=N cargo test -p hsat-tests
//! --test chaos` replays one.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hsat_core::rng::SplitMix64;
use hsat_tests::{Sandbox, SandboxSpec, SmallJob, synth_opensrh_with, write_small_job_config};

const WORKERS: usize = 3;
/// Generous: the whole scenario takes about a minute on 2 cores.
const LIMIT: Duration = Duration::from_secs(240);

/// A dataset with 5 patients per class, so that a step of 6 patients leaves
/// room for several steps per epoch.
fn dataset(dir: &Path) -> PathBuf {
    synth_opensrh_with(dir, 21, 5, 3)
}

/// The job: 3 workers that must all be present, a checkpoint every 2 steps.
fn job_config(dir: &Path, data: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = write_small_job_config(
        dir,
        &SmallJob {
            data: data.to_path_buf(),
            batch_size: 6,
            epochs: 6,
            attack_iters: 1,
        },
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "save_checkpoint_interval = 0",
        "save_checkpoint_interval = 2",
    ) + "[cluster]\nworkers = 3\nmin_workers = 3\n";
    std::fs::write(&path, text).unwrap();
    path
}

/// Steps of a finished job: those its ledger holds.
fn total_steps(sandbox: &Sandbox) -> u64 {
    sandbox.ledger().committed().len() as u64
}

/// The final checkpoint's tensors, file by file; panics with every process's
/// output and the checkpoint folder's listing when one is missing.
fn final_weights(sandbox: &Sandbox, step: u64) -> Vec<(String, Vec<u8>)> {
    let root = sandbox.out_dir().join("checkpoints");
    let dir = root.join(format!("step-{step:08}"));
    [
        "backbone.safetensors",
        "head.safetensors",
        "optimizer.safetensors",
    ]
    .iter()
    .map(|name| {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            let listing: Vec<String> = std::fs::read_dir(&root)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "cannot read {}: {e}; {} holds {listing:?}\n----- ledger -----\n{}\n{}",
                path.display(),
                root.display(),
                std::fs::read_to_string(sandbox.ledger_path()).unwrap_or_default(),
                sandbox.logs()
            )
        });
        (name.to_string(), bytes)
    })
    .collect()
}

/// Polls for a checkpoint staging directory (`.step-N.tmp-PID`) of one of the
/// running workers `pids` for up to `window`; returns that worker's index.
fn catch_checkpoint_writer(out_dir: &Path, pids: &[u32], window: Duration) -> Option<usize> {
    let root = out_dir.join("checkpoints");
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid: Option<u32> = name
                    .strip_prefix(".step-")
                    .and_then(|rest| rest.rsplit_once(".tmp-"))
                    .and_then(|(_, pid)| pid.parse().ok());
                if let Some(k) = pid.and_then(|pid| pids.iter().position(|&p| p == pid)) {
                    return Some(k);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// The undisturbed run both scenarios compare with, run once.
struct Calm {
    _scratch: tempfile::TempDir,
    data: PathBuf,
    total: u64,
    weights: Vec<(String, Vec<u8>)>,
    patients: Vec<Vec<usize>>,
    seconds: f64,
}

static SERIAL: Mutex<()> = Mutex::new(());
static CALM: OnceLock<Calm> = OnceLock::new();

/// The scenarios start 4 processes each: one at a time on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn calm() -> &'static Calm {
    CALM.get_or_init(|| {
        let started = Instant::now();
        let scratch = tempfile::tempdir().unwrap();
        let data = dataset(scratch.path());
        let config = job_config(&scratch.path().join("calm"), &data);
        let mut calm = Sandbox::start(SandboxSpec::new(&config, WORKERS).start_workers(WORKERS));
        let end = calm.wait_for_end(LIMIT);
        assert!(end.coordinator.success(), "{}", calm.logs());
        calm.assert_ledger_complete(&[WORKERS]);
        let total = total_steps(&calm);
        assert!(
            total >= 8,
            "the job is too short for a chaos schedule: {total} steps"
        );
        let weights = final_weights(&calm, total);
        Calm {
            _scratch: scratch,
            data,
            total,
            weights,
            patients: patients_per_step(&calm),
            seconds: started.elapsed().as_secs_f64(),
        }
    })
}

/// Every step's patients, rank after rank, as the ledger's standing commits list them.
fn patients_per_step(sandbox: &Sandbox) -> Vec<Vec<usize>> {
    sandbox
        .ledger()
        .committed()
        .values()
        .map(|commit| commit.patients().collect())
        .collect()
}

fn assert_same_trajectory(calm: &Calm, sandbox: &Sandbox) {
    assert!(
        patients_per_step(sandbox) == calm.patients,
        "the ledger lists other patients per step than the undisturbed run's\n{}",
        sandbox.logs()
    );
    let weights = final_weights(sandbox, calm.total);
    for ((name, calm_bytes), (_, bytes)) in calm.weights.iter().zip(&weights) {
        assert!(
            calm_bytes == bytes,
            "{name} of the final checkpoint differs from the undisturbed run's\n{}",
            sandbox.logs()
        );
    }
}

#[test]
fn a_job_survives_seeded_kills_of_workers_and_the_coordinator_and_ends_bitwise_equal() {
    let _serial = serial();
    let seed: u64 = std::env::var("HSAT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    eprintln!("chaos schedule seed {seed} (replay with HSAT_CHAOS_SEED={seed})");
    let calm = calm();
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let config = job_config(&scratch.path().join("chaos"), &calm.data);
    let mut chaos = Sandbox::start(SandboxSpec::new(&config, WORKERS).start_workers(WORKERS));
    let mut rng = SplitMix64::new(seed);
    // Kill moments: after these many commits, spread over the job; the coordinator
    // dies at one of them.
    let events = 4usize;
    let mut moments: Vec<usize> = (0..events)
        .map(|_| 1 + rng.below(calm.total.saturating_sub(3).max(1)) as usize)
        .collect();
    moments.sort_unstable();
    let coordinator_at = rng.below(events as u64) as usize;
    let mut caught_mid_checkpoint = false;
    for (i, &after) in moments.iter().enumerate() {
        chaos.wait_for_commits(after, LIMIT);
        if i == coordinator_at {
            // A random moment within the next step, then the coordinator.
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            let status = chaos.kill_coordinator();
            eprintln!("event {i}: after {after} commits, kill -9 coordinator ({status})");
            chaos.restart_coordinator(&[]);
            continue;
        }
        // A worker: rank 0 while it writes a checkpoint when we can catch it, else
        // a random one at a random moment.
        let pids: Vec<u32> = (0..WORKERS).map(|k| chaos.worker_pid(k)).collect();
        let writer = catch_checkpoint_writer(chaos.out_dir(), &pids, Duration::from_millis(1500));
        let victim = writer.unwrap_or_else(|| {
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            rng.below(WORKERS as u64) as usize
        });
        caught_mid_checkpoint |= writer.is_some();
        let status = chaos.kill_worker(victim);
        eprintln!(
            "event {i}: after {after} commits, kill -9 worker w{victim}{} ({status})",
            if writer.is_some() {
                " while it wrote a checkpoint"
            } else {
                ""
            }
        );
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        chaos.restart_worker(victim);
    }
    let end = chaos.wait_for_end(LIMIT);
    if std::env::var_os("HSAT_CHAOS_LOGS").is_some() {
        eprintln!("{}", chaos.logs());
    }
    assert!(end.coordinator.success(), "{}", chaos.logs());
    chaos.assert_ledger_complete(&[WORKERS]);
    assert_same_trajectory(calm, &chaos);
    eprintln!(
        "chaos: {} steps, {events} kills (one mid-checkpoint: {caught_mid_checkpoint}); \
         undisturbed run {:.1} s, chaos run {:.1} s",
        calm.total,
        calm.seconds,
        started.elapsed().as_secs_f64()
    );
}

/// Flips one bit in the middle of `path`.
fn flip_a_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// Cuts `path` to half its size.
fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn a_job_killed_whole_resumes_past_damaged_checkpoints_and_ends_bitwise_equal() {
    let _serial = serial();
    let calm = calm();
    let scratch = tempfile::tempdir().unwrap();
    let config = job_config(&scratch.path().join("killed"), &calm.data);
    let mut job = Sandbox::start(SandboxSpec::new(&config, WORKERS).start_workers(WORKERS));
    job.wait_for_commits(calm.total as usize / 2 + 2, LIMIT);
    // Every process at once, as when the node goes away.
    job.kill_coordinator();
    for k in 0..WORKERS {
        job.kill_worker(k);
    }
    // Damage the newest two checkpoints a rollback could use (at or before the
    // committed step; a newer one may exist whose step never committed).
    let committed = job.ledger().committed().len() as u64;
    let root = job.out_dir().join("checkpoints");
    let complete: Vec<PathBuf> = list_checkpoints(&root)
        .into_iter()
        .filter(|dir| step_of(dir) <= committed)
        .collect();
    assert!(
        complete.len() >= 3,
        "expected at least 3 checkpoints by now, found {complete:?}\n{}",
        job.logs()
    );
    let newest = &complete[complete.len() - 1];
    let second = &complete[complete.len() - 2];
    let third = &complete[complete.len() - 3];
    truncate(&newest.join("optimizer.safetensors"));
    flip_a_bit(&second.join("backbone.safetensors"));

    job.restart_coordinator(&[]);
    for k in 0..WORKERS {
        job.restart_worker(k);
    }
    let end = job.wait_for_end(LIMIT);
    assert!(end.coordinator.success(), "{}", job.logs());
    let logs = job.logs();
    for (damaged, file, what) in [
        (newest, "optimizer.safetensors", "truncated"),
        (second, "backbone.safetensors", "SHA-256"),
    ] {
        let named = damaged.join(file).display().to_string();
        assert!(
            logs.lines().any(|l| l.contains(&named) && l.contains(what)),
            "no warning names {named} as {what}\n{logs}"
        );
    }
    let third_name = third.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        logs.lines()
            .any(|l| l.contains("rolling back") && l.contains(&third_name)),
        "the job did not roll back to {third_name}\n{logs}"
    );
    job.assert_ledger_complete(&[WORKERS]);
    assert_same_trajectory(calm, &job);
}

fn step_of(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Complete (manifest-bearing) checkpoint directories under `root`, oldest first.
fn list_checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                        && p.join("manifest.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}
