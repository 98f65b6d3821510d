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
        vec!["repro", "--help"],
        vec!["coordinator", "--help"],
        vec!["worker", "--help"],
        vec!["status", "--help"],
        vec!["bench", "sync", "--help"],
        vec!["bench", "control-plane", "--help"],
        vec!["bench", "checkpoint", "--help"],
        vec!["bench", "eval", "--help"],
        vec!["plot", "--help"],
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

#[test]
fn plot_draws_a_runs_metrics_and_names_what_is_missing() {
    let run = tempfile::tempdir().unwrap();
    let out = hsat()
        .args(["plot", "--run"])
        .arg(run.path())
        .output()
        .expect("run hsat");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{} does not exist",
            run.path().join("metrics.jsonl").display()
        )) && stderr.contains("older than metrics.jsonl"),
        "{stderr}"
    );

    // Two steps and a torn third (a run killed mid-write).
    std::fs::write(
        run.path().join("metrics.jsonl"),
        concat!(
            r#"{"step":0,"loss":{"clean":null,"adversarial":{"patient":2.0,"slide":1.5,"patch":1.0,"total":4.5}},"attack_gain":0.1,"lr":0.001,"eps":0.01,"step_seconds":1.0}"#,
            "\n",
            r#"{"step":1,"loss":{"clean":null,"adversarial":{"patient":1.8,"slide":1.4,"patch":0.9,"total":4.1}},"attack_gain":0.2,"lr":0.001,"eps":0.02,"step_seconds":1.1}"#,
            "\n",
            r#"{"step":2,"loss":"#,
        ),
    )
    .unwrap();
    let out = hsat()
        .args(["plot", "--run"])
        .arg(run.path())
        .output()
        .expect("run hsat");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("skipped 1 line(s)"), "{stdout}");
    assert!(stdout.contains("2 steps (0 to 1)"), "{stdout}");
    for png in [
        "loss_levels.png",
        "attack_gain.png",
        "lr_eps.png",
        "step_time.png",
    ] {
        let bytes = std::fs::read(run.path().join("plots").join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
}
