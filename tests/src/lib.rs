//! hsat-tests: end-to-end scenarios that drive the `hsat` binary as a user would.
//!
//! This crate only holds the harness; the scenarios are in `tests/`.
//!
//! - this file: the `hsat` binary, one-shot commands, datasets and job configs;
//! - [`sandbox`]: a cluster of real processes (coordinator on port 0 plus N workers)
//!   to kill, stop, restart and wait on;
//! - [`ledger`]: reading and checking the coordinator's step ledger;
//! - [`metrics`]: scraping a job's metrics endpoints, the README's metric tables, a
//!   real Prometheus server;
//! - [`proxy`]: a TCP fault proxy to cut and restore a worker's way to the coordinator.

pub mod ledger;
pub mod metrics;
pub mod proxy;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use ledger::Ledger;
pub use sandbox::{JobEnd, Sandbox, SandboxSpec};

/// Path of the `hsat` binary built by the same `cargo test` run (`$HSAT_BIN` overrides).
///
/// `cargo test --workspace` builds it because the `hsat` package has integration tests.
pub fn hsat_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HSAT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/hsat
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target layout");
    let path = profile_dir.join("hsat");
    assert!(
        path.exists(),
        "{} not found: run `cargo test --workspace` (it builds the hsat binary) or set HSAT_BIN",
        path.display()
    );
    path
}

/// Runs `hsat` with `args` and returns its output.
pub fn run_hsat(args: &[&str]) -> Output {
    Command::new(hsat_binary())
        .args(args)
        .output()
        .expect("start hsat")
}

/// Writes a dataset with `hsat synth --out <out> <args...>` and panics with its
/// stderr if that fails (the scenarios need data on disk, not a synth test).
pub fn synth_dataset(out: &std::path::Path, args: &[&str]) {
    let out_arg = out.display().to_string();
    let mut all = vec!["synth", "--out", out_arg.as_str()];
    all.extend_from_slice(args);
    let result = run_hsat(&all);
    assert!(
        result.status.success(),
        "hsat synth {args:?} failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// Whether process `pid` still exists (a reaped process has no `/proc` entry).
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A small OpenSRH-style dataset under `dir`: 2 classes x 3 patients (2 train + 1
/// val each), 2 slides of `patches` patches, 32 px, drawn from `seed`. Returns its
/// root (named after seed and patches, so two calls may coexist).
pub fn synth_opensrh(dir: &Path, seed: u64, patches: usize) -> PathBuf {
    synth_opensrh_with(dir, seed, 3, patches)
}

/// [`synth_opensrh`] with `patients_per_class` patients per class (the root is
/// named after all three numbers).
pub fn synth_opensrh_with(
    dir: &Path,
    seed: u64,
    patients_per_class: usize,
    patches: usize,
) -> PathBuf {
    let name = if patients_per_class == 3 {
        format!("data-{seed}-{patches}")
    } else {
        format!("data-{seed}-{patients_per_class}-{patches}")
    };
    let data = dir.join(name);
    synth_dataset(
        &data,
        &[
            "--format",
            "opensrh",
            "--classes",
            "2",
            "--patients-per-class",
            &patients_per_class.to_string(),
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

/// The knobs of a small distributed job (small_cnn, 32 px, one thread each).
#[derive(Debug, Clone)]
pub struct SmallJob {
    /// The dataset root (`hsat synth`).
    pub data: PathBuf,
    /// Patients per step.
    pub batch_size: usize,
    /// Epochs.
    pub epochs: usize,
    /// PGD iterations (more makes each step longer, for fault scenarios).
    pub attack_iters: usize,
}

/// Writes `<dir>/job.toml` for `job`, with `infra.out_dir = <dir>/run`, and returns
/// its path.
pub fn write_small_job_config(dir: &Path, job: &SmallJob) -> PathBuf {
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
        data = job.data.display(),
        batch_size = job.batch_size,
        epochs = job.epochs,
        attack_iters = job.attack_iters,
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}
