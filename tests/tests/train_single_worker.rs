//! `hsat run` on one worker: trains HSAT and HiDisc on the in-memory synthetic source,
//! prints per-level losses per step, and leaves complete checkpoints behind.

use std::path::Path;

use hsat_tests::run_hsat;

fn write_config(dir: &Path, attack: &str) -> String {
    let text = format!(
        r#"
[infra]
seed = 3
out_dir = "{out}"
threads = 2
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
num_epochs = 2
only_adv = true
save_checkpoint_interval = 3
[training.attack]
name = "{attack}"
iters = 2
"#,
        out = dir.join("run").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn tensor_names(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).expect("read safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    names.sort();
    names
}

#[test]
fn hsat_trains_and_checkpoints_on_the_synthetic_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "pgd");
    let out = run_hsat(&["run", "--config", &config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hsat run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 4 patients / 2 per step = 2 steps per epoch, 2 epochs.
    for step in 1..=4 {
        assert!(
            stdout.contains(&format!("step {step}/4 ")),
            "no progress line for step {step}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("adv: patient"),
        "per-level adversarial losses missing:\n{stdout}"
    );

    let root = dir.path().join("run/checkpoints");
    for step in ["step-00000003", "step-00000004"] {
        let ckpt = root.join(step);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpt.join("checkpoint.json")).expect("meta"))
                .expect("json");
        assert_eq!(meta["format_version"], 2);
        assert!(
            meta["config_fingerprint"]
                .as_str()
                .is_some_and(|f| f.len() == 64)
        );
        assert!(ckpt.join("optimizer.safetensors").is_file());
        assert_eq!(meta["backbone"], "small_cnn");
        assert_eq!(meta["config"]["training"]["attack"]["name"], "pgd");
        assert!(meta["mean_total_loss"].as_f64().is_some_and(f64::is_finite));
        let names = tensor_names(&ckpt.join("backbone.safetensors"));
        assert!(
            names.contains(&"bn1.num_batches_tracked".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"conv1.weight".to_string()), "{names:?}");
        assert_eq!(
            tensor_names(&ckpt.join("head.safetensors")),
            vec!["layers.0.bias", "layers.0.weight"]
        );
    }
    let last: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("step-00000004/checkpoint.json")).expect("meta"),
    )
    .expect("json");
    assert_eq!(last["step"], 4);
    assert_eq!(last["epoch"], 1);
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "staging directories left behind");
}

#[test]
fn without_an_attack_hsat_trains_plain_hidisc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "none");
    let out = run_hsat(&["run", "--config", &config, "--set", "training.num_epochs=1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("step 2/2 "), "{stdout}");
    assert!(
        stdout.contains("clean: patient") && !stdout.contains("adv: patient"),
        "{stdout}"
    );
    assert!(stdout.contains("eps 0.00/255"), "{stdout}");
}

/// `kill -9` while a run writes checkpoints every step: every checkpoint directory
/// that is visible afterwards is complete, and a new run in the same out_dir works.
#[test]
fn a_killed_run_leaves_only_complete_checkpoints_and_can_be_run_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "pgd");
    let args = [
        "run",
        "--config",
        &config,
        "--set",
        "training.num_epochs=200",
        "--set",
        "training.save_checkpoint_interval=1",
    ];
    let mut child = std::process::Command::new(hsat_tests::hsat_binary())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hsat");
    let root = dir.path().join("run/checkpoints");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while hsat_worker_checkpoints(&root) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoints appeared"
        );
        assert!(
            child.try_wait().expect("poll").is_none(),
            "hsat exited before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");

    for entry in std::fs::read_dir(&root)
        .expect("list")
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("step-") {
            continue; // staging directories are hidden (dot-prefixed) and ignored
        }
        let ckpt = entry.path();
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpt.join("checkpoint.json")).expect("meta"))
                .expect("complete json");
        assert!(meta["step"].as_u64().is_some(), "{name}");
        assert!(
            ckpt.join("manifest.json").is_file(),
            "{name} has no manifest"
        );
        assert!(
            !tensor_names(&ckpt.join("backbone.safetensors")).is_empty(),
            "{name}"
        );
        assert!(
            !tensor_names(&ckpt.join("head.safetensors")).is_empty(),
            "{name}"
        );
    }

    // Another config in the same out_dir: a new job, the old checkpoints archived.
    let again = run_hsat(&[
        "run",
        "--config",
        &config,
        "--set",
        "training.num_epochs=1",
        "--new-job",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(dir.path().join("run/archive").is_dir());
}

fn hsat_worker_checkpoints(root: &Path) -> usize {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
                .count()
        })
        .unwrap_or(0)
}

/// `metrics.jsonl` of a single-process run: one line per step with the losses of
/// both views (the clean ones measured by an extra forward pass under `only_adv`),
/// the attack's gain, lr and eps. Measuring the clean losses changes nothing that
/// is trained: the final weights are bitwise those of a run that does not.
#[test]
fn metrics_jsonl_has_every_step_and_measuring_clean_losses_changes_nothing_trained() {
    let mut runs = Vec::new();
    for every in ["1", "0"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), "pgd");
        let out = run_hsat(&[
            "run",
            "--config",
            &config,
            "--set",
            &format!("metrics.clean_loss_every={every}"),
        ]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = hsat_metrics::jsonl::read(&dir.path().join("run/metrics.jsonl"))
            .expect("metrics.jsonl");
        let weights = std::fs::read(
            dir.path()
                .join("run/checkpoints/step-00000004/backbone.safetensors"),
        )
        .expect("final weights");
        runs.push((every, lines, weights, dir));
    }
    let (_, measured, measured_weights, _) = &runs[0];
    let (_, unmeasured, unmeasured_weights, _) = &runs[1];
    assert!(
        measured_weights == unmeasured_weights,
        "the clean-loss forward pass changed the trained weights"
    );
    for lines in [measured, unmeasured] {
        let steps: Vec<u64> = lines.iter().map(|l| l.step).collect();
        assert_eq!(steps, [0, 1, 2, 3]);
        for line in lines {
            assert_eq!((line.world_size, line.generation), (1, 0));
            assert!(line.loss.adversarial.is_some_and(|l| l.total.is_finite()));
            assert!(line.attack_gain.is_some_and(f64::is_finite), "{line:?}");
            assert!(line.lr.is_some_and(|lr| lr > 0.0), "{line:?}");
            assert!(line.eps.is_some() && line.step_seconds.is_some_and(|s| s > 0.0));
            assert!(line.patches_per_second.is_some_and(|p| p > 0.0), "{line:?}");
        }
    }
    assert!(measured.iter().all(|l| l.loss.clean.is_some()));
    assert!(unmeasured.iter().all(|l| l.loss.clean.is_none()));
    // PGD ascends the attack's loss: on average it ends above its random start.
    let mean_gain: f64 =
        measured.iter().filter_map(|l| l.attack_gain).sum::<f64>() / measured.len() as f64;
    assert!(
        mean_gain > 0.0,
        "mean attack gain {mean_gain}: {measured:?}"
    );
}
