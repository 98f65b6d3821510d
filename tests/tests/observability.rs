//! What an operator sees when hsat's output goes to a file, a pipe or a log
//! collector, with real processes:
//!
//! - no ANSI colour codes and no carriage-return progress redraws in piped output
//!   (`hsat data check`'s progress, `hsat run --workers 2`'s logs), while progress is
//!   still shown as plain lines;
//! - `--log-format json`: every log line of the coordinator and of its worker
//!   processes is one JSON object;
//! - `hsat status --watch` re-prints the status until the job ends and exits 0;
//! - `hsat plot --run` on a run's `metrics.jsonl`, and its errors.
//!
//! The processes are started here without `NO_COLOR` (the sandbox sets it for its
//! own log matching), so the checks see what a user's pipe would.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hsat_tests::{
    Sandbox, SandboxSpec, SmallJob, hsat_binary, synth_opensrh, write_small_job_config,
};

/// One job at a time: leases and timeouts should measure the code, not contention.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `hsat` with its output piped and no colour preferences inherited from the caller.
fn hsat() -> Command {
    let mut command = Command::new(hsat_binary());
    command
        .env_remove("NO_COLOR")
        .env_remove("HSAT_LOG_FORMAT")
        .env_remove("HSAT_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Neither an escape sequence nor a carriage return anywhere in `text`.
fn assert_plain(what: &str, text: &str) {
    assert!(
        !text.contains("\x1b["),
        "{what} holds ANSI escape codes:\n{text}"
    );
    assert!(
        !text.contains('\r'),
        "{what} holds carriage returns:\n{text}"
    );
}

fn small_job(dir: &Path, epochs: usize) -> std::path::PathBuf {
    let data = synth_opensrh(dir, 7, 3);
    write_small_job_config(
        dir,
        &SmallJob {
            data,
            batch_size: 3,
            epochs,
            attack_iters: 1,
        },
    )
}

#[test]
fn piped_progress_is_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 3, 3);
    let out = hsat()
        .args(["data", "check", "--set", "data.source=opensrh", "--set"])
        .arg(format!("data.db_root={}", data.display()))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_plain("hsat data check's stderr", &stderr);
    assert_plain("hsat data check's stdout", &stdout);
    // Progress is still there, as whole lines ending with the total.
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("decoding patches: "))
        .collect();
    assert!(!progress.is_empty(), "no progress lines:\n{stderr}");
    let last = progress.last().unwrap();
    let (done, total) = last["decoding patches: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.split_once('/'))
        .unwrap();
    assert_eq!(done, total, "the last progress line is the end: {last}");
}

#[test]
fn a_local_job_logs_json_lines_from_every_process_and_no_escape_codes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = small_job(dir.path(), 1);
    let out = hsat()
        // Info from the workers too, so their lines are checked as well.
        .env("HSAT_LOG", "info")
        .args(["--log-format", "json", "run", "--workers", "2", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_plain("hsat run --workers 2's stdout", &stdout);
    assert_plain("hsat run --workers 2's stderr", &stderr);
    let mut targets = std::collections::BTreeSet::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        // The CLI's own messages (`hsat worker w0: ...`) are plain; logs are JSON.
        // libtorch's C++ warnings (c10d's `[W1201 17:04:03.695 TCPStore.cpp:340] ...`
        // when a rendezvous connection is retried, more likely on a loaded machine)
        // are its own, not hsat's, and stay plain.
        if line.starts_with("hsat") || is_libtorch_log_line(line) {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("a log line is not JSON ({err}): {line}\n{stderr}"));
        assert!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "a JSON log line without timestamp or level: {line}"
        );
        targets.insert(value["target"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        targets.iter().any(|t| t.starts_with("hsat_coordinator")),
        "no coordinator log line in {targets:?}:\n{stderr}"
    );
    assert!(
        targets.iter().any(|t| t.starts_with("hsat_worker")),
        "no worker log line in {targets:?} (the format reaches the worker processes):\n{stderr}"
    );
}

#[test]
fn a_piped_local_job_in_text_format_has_no_escape_codes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = small_job(dir.path(), 1);
    let out = hsat()
        .env("HSAT_LOG", "info")
        .args(["run", "--workers", "2", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(" INFO "), "text logs expected:\n{stderr}");
    assert_plain("hsat run --workers 2's stdout", &stdout);
    assert_plain("hsat run --workers 2's stderr", &stderr);
}

#[test]
fn a_bad_log_level_or_format_is_named() {
    let out = hsat()
        .env("HSAT_LOG", "hsat=loud")
        .args(["plot", "--run", "/nonexistent"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("HSAT_LOG=\"hsat=loud\" is not a log filter"),
        "{stderr}"
    );
    let out = hsat()
        .env("HSAT_LOG_FORMAT", "yaml")
        .args(["plot", "--run", "/nonexistent"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("yaml") && stderr.contains("--log-format"),
        "{stderr}"
    );
}

#[test]
fn status_watch_follows_a_job_to_its_end() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // About 30 steps: a few refreshes at 0.2 s even on a fast machine.
    let config = small_job(dir.path(), 15);
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 2));
    let out = hsat()
        .args(["status", "--watch", "--interval", "0.2", "--coordinator"])
        .arg(sandbox.address())
        .arg("--token-file")
        .arg(sandbox.token_file())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    let end = sandbox.wait_for_end(Duration::from_secs(120));
    assert!(end.coordinator.success(), "{}", sandbox.logs());
    assert!(
        out.status.success(),
        "status --watch failed:\n{stdout}\n{stderr}"
    );
    assert_plain("hsat status --watch's stdout", &stdout);
    let blocks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("job ")).collect();
    assert!(
        blocks.len() >= 2,
        "the status is printed again at each refresh:\n{stdout}"
    );
    // It saw the job run, and ended at its end: the coordinator's last answer, or
    // its exit right after the last step (often between two refreshes).
    assert!(
        blocks.iter().any(|b| b.starts_with("job running")),
        "{stdout}"
    );
    assert!(
        stdout.contains("job finished") || stdout.contains("has exited (last seen: "),
        "{stdout}"
    );
}

/// A line of libtorch's C++ logging: `[` + level letter + `MMDD ` ...
fn is_libtorch_log_line(line: &str) -> bool {
    let bytes = line.as_bytes();
    bytes.len() > 7
        && bytes[0] == b'['
        && matches!(bytes[1], b'I' | b'W' | b'E' | b'F')
        && bytes[2..6].iter().all(u8::is_ascii_digit)
        && bytes[6] == b' '
}
