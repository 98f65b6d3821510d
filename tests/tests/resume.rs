//! `hsat run` in one process resumes exactly: a run killed with `kill -9` and run
//! again on the same out_dir ends with the same parameters and optimiser state, bit
//! for bit, as a run that was never interrupted, also when its newest checkpoints
//! were damaged (a truncated and a bit-flipped file: each is rejected with a warning
//! naming the file, and the checkpoint before them is used). A finished job is not
//! trained again; another job's checkpoints are refused unless `--new-job`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hsat_tests::{hsat_binary, run_hsat};

/// 4 patients, 2 per step: 2 steps per epoch; a checkpoint after every step.
const EPOCHS: u64 = 15;
const TOTAL_STEPS: u64 = 2 * EPOCHS;

fn write_config(dir: &Path) -> String {
    let text = format!(
        r#"
[infra]
seed = 11
out_dir = "{out}"
threads = 1
[data]
image_size = 16
[data.synthetic]
num_patients = 4
num_classes = 2
[model]
backbone = "small_cnn"
num_embedding_out = 8
[training]
batch_size = 2
num_epochs = {EPOCHS}
only_adv = false
save_checkpoint_interval = 1
[training.attack]
name = "pgd"
iters = 2
"#,
        out = dir.join("run").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn run(config: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--config", config];
    args.extend_from_slice(extra);
    run_hsat(&args)
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "hsat run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn checkpoint_steps(root: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The bytes of the state files of the final checkpoint.
fn final_state(out_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = step_dir(&out_dir.join("checkpoints"), TOTAL_STEPS);
    [
        "backbone.safetensors",
        "head.safetensors",
        "optimizer.safetensors",
    ]
    .iter()
    .map(|name| {
        let bytes = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
        ((*name).to_owned(), bytes)
    })
    .collect()
}

/// Starts the run and `kill -9`s it once a checkpoint of step `at_least` exists.
fn run_and_kill(config: &str, root: &Path, at_least: u64) {
    let mut child = Command::new(hsat_binary())
        .args(["run", "--config", config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hsat");
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoint_steps(root).last().is_none_or(|&s| s < at_least) {
        assert!(
            Instant::now() < deadline,
            "no checkpoint of step {at_least}"
        );
        assert!(
            child.try_wait().expect("poll").is_none(),
            "hsat exited before it was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let left = *checkpoint_steps(root).last().expect("checkpoints");
    assert!(
        left < TOTAL_STEPS,
        "the run got to its last step before it was killed: lower the kill point"
    );
}

fn uninterrupted(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let config = write_config(dir);
    assert_success(&run(&config, &[]));
    final_state(&dir.join("run"))
}

#[test]
fn a_run_killed_and_resumed_ends_bitwise_identical_to_an_uninterrupted_one() {
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = uninterrupted(reference_dir.path());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let root = dir.path().join("run/checkpoints");
    run_and_kill(&config, &root, 4);
    let resumed_at = *checkpoint_steps(&root).last().expect("a checkpoint");

    let out = run(&config, &[]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "resuming the job at step {}/{TOTAL_STEPS} from checkpoint {}",
            resumed_at + 1,
            step_dir(&root, resumed_at).display()
        )),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&format!("step {resumed_at}/{TOTAL_STEPS} ")),
        "a step before the checkpoint was trained again:\n{stdout}"
    );
    assert_eq!(final_state(&dir.path().join("run")), reference);
    // Retention (3 newest by default) ran after every write.
    assert_eq!(
        checkpoint_steps(&root),
        [TOTAL_STEPS - 2, TOTAL_STEPS - 1, TOTAL_STEPS]
    );

    // Finished: not trained again, checkpoints untouched, success.
    let before = final_state(&dir.path().join("run"));
    let again = run(&config, &[]);
    assert_success(&again);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("the job is finished"), "{stdout}");
    assert!(!stdout.contains("step 1/"), "{stdout}");
    assert_eq!(final_state(&dir.path().join("run")), before);
}

#[test]
fn damaged_newest_checkpoints_are_rejected_by_name_and_the_previous_one_resumes_exactly() {
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = uninterrupted(reference_dir.path());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let root = dir.path().join("run/checkpoints");
    run_and_kill(&config, &root, 6);
    let steps = checkpoint_steps(&root);
    assert!(steps.len() >= 3, "{steps:?}");
    let (older, middle, newest) = (
        steps[steps.len() - 3],
        steps[steps.len() - 2],
        steps[steps.len() - 1],
    );
    // The newest: backbone truncated; the one before: one bit of the optimiser flipped.
    let truncated = step_dir(&root, newest).join("backbone.safetensors");
    let bytes = std::fs::read(&truncated).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).expect("truncate");
    let flipped = step_dir(&root, middle).join("optimizer.safetensors");
    let mut bytes = std::fs::read(&flipped).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&flipped, &bytes).expect("flip");

    let out = run(&config, &[]);
    assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let using = step_dir(&root, older).display().to_string();
    for (dir, file) in [(newest, &truncated), (middle, &flipped)] {
        let warning = format!(
            "checkpoint {} rejected: {}",
            step_dir(&root, dir).display(),
            file.display()
        );
        let line = stderr
            .lines()
            .find(|l| l.contains(&warning))
            .unwrap_or_else(|| panic!("no warning {warning:?} in:\n{stderr}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&format!("using {using}")), "{line}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("from checkpoint {using}")),
        "{stdout}"
    );
    assert_eq!(final_state(&dir.path().join("run")), reference);
}

#[test]
fn another_jobs_checkpoints_are_refused_unless_new_job_archives_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let short = ["--set", "training.num_epochs=1"];
    assert_success(&run(&config, &short));
    let root = dir.path().join("run/checkpoints");
    assert_eq!(checkpoint_steps(&root), [1, 2]);

    // Another config (more epochs) in the same out_dir.
    let other = ["--set", "training.num_epochs=2"];
    let refused = run(&config, &other);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "holds checkpoints of another job (config differs at training.num_epochs: 2 now, 1 in the job)"
        ) && stderr.contains("pass --new-job"),
        "{stderr}"
    );
    assert_eq!(checkpoint_steps(&root), [1, 2], "nothing was touched");

    let started = run(&config, &[&other[..], &["--new-job"]].concat());
    assert_success(&started);
    let stdout = String::from_utf8_lossy(&started.stdout);
    assert!(
        stdout.contains("moved the previous job's checkpoints"),
        "{stdout}"
    );
    assert_eq!(checkpoint_steps(&root), [2, 3, 4]);
    let archived: Vec<PathBuf> = std::fs::read_dir(dir.path().join("run/archive"))
        .expect("archive")
        .filter_map(Result::ok)
        .map(|e| e.path().join("checkpoints"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert_eq!(checkpoint_steps(&archived[0]), [1, 2]);

    // --resume with nothing to resume.
    let empty = tempfile::tempdir().expect("tempdir");
    let config = write_config(empty.path());
    let out = run(&config, &["--resume"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--resume: there is nothing to resume"),
        "{stderr}"
    );
}
