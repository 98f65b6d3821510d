//! The `hsat` command as a user meets it: help texts with examples, and clear errors
//! for bad configuration before any work starts.

use std::process::Command;

fn hsat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hsat"))
}

#[test]
fn every_subcommand_explains_itself_with_an_example() {
    for args in [
        vec!["run", "--help"],
        vec!["bench", "step", "--help"],
        vec!["bench", "data", "--help"],
        vec!["synth", "--help"],
        vec!["data", "check", "--help"],
        vec!["eval", "--help"],
        vec!["coordinator", "--help"],
        vec!["worker", "--help"],
        vec!["status", "--help"],
        vec!["bench", "sync", "--help"],
        vec!["bench", "control-plane", "--help"],
        vec!["bench", "checkpoint", "--help"],
    ] {
        let out = hsat().args(&args).output().expect("run hsat");
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example:"),
            "{args:?} help has no example:\n{text}"
        );
    }
}

#[test]
fn a_bad_config_value_is_reported_with_its_key_and_range() {
    let out = hsat()
        .args([
            "run",
            "--set",
            "training.attack.eps=-1",
            "--set",
            "training.batch_size=0",
        ])
        .output()
        .expect("run hsat");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Both values, each with its range: the validator's report, not an earlier
    // parse error that happens to echo the keys.
    assert!(
        err.contains("training.attack.eps = -1: must be in [0, 255]"),
        "{err}"
    );
    assert!(
        err.contains("training.batch_size = 0: must be >= 1"),
        "{err}"
    );
}

#[test]
fn an_unknown_key_is_refused() {
    let out = hsat()
        .args(["run", "--set", "training.atack.eps=4"])
        .output()
        .expect("run hsat");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("training.atack.eps: unknown key")
            && err.contains("did you mean training.attack.eps?"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let out = hsat()
        .args(["run", "--config", "/nonexistent/hsat.toml"])
        .output()
        .expect("run hsat");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config file /nonexistent/hsat.toml"),
        "{err}"
    );
}

#[test]
fn resume_and_new_job_exclude_each_other() {
    let out = hsat()
        .args(["run", "--resume", "--new-job"])
        .output()
        .expect("run hsat");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'--resume' cannot be used with '--new-job'"),
        "{err}"
    );
}
