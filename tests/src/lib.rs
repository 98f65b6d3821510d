//! hsat-tests: end-to-end scenarios that drive the `hsat` binary as a user would.
//!
//! This crate only holds the harness; the scenarios are in `tests/`. Later issues add
//! the cluster harness (coordinator on port 0 plus N worker processes) here.

pub mod proxy;

use std::path::PathBuf;
use std::process::{Command, Output};

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
