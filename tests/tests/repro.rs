//! `hsat repro` end to end at toy size: the experiment runs, survives a `kill -9`
//! between seeds (the finished seed is not trained or evaluated again), its report
//! agrees with the per-seed evaluations it summarises, a rerun reproduces it exactly,
//! and impossible sizes or an out folder of another experiment are refused before any
//! work.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hsat_tests::{hsat_binary, run_hsat};

const SEEDS: [u64; 2] = [3, 4];

fn write_config(dir: &Path) -> String {
    let text = r#"
[infra]
seed = 3
threads = 2
log_every = 1
[data]
image_size = 16
[model]
backbone = "small_cnn"
num_embedding_out = 8
[training]
batch_size = 2
num_epochs = 1
only_adv = true
save_checkpoint_interval = 0
[training.attack]
name = "pgd"
iters = 1
[eval]
knn_k = 3
steps = 2
attacks = "pgd,apgd"
apgd_steps = 3
batch_size = 4
"#;
    let path = dir.join("repro.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn args<'a>(config: &'a str, out: &'a str, seeds: &'a str) -> Vec<&'a str> {
    vec![
        "repro",
        "--config",
        config,
        "--out",
        out,
        "--seeds",
        seeds,
        "--classes",
        "2",
        "--train-patients-per-class",
        "2",
        "--val-patients-per-class",
        "2",
        "--slides",
        "2",
        "--patches",
        "2",
        "--size",
        "16",
        "--resamples",
        "300",
    ]
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json")
}

#[test]
fn repro_resumes_after_kill_9_reproduces_its_report_and_refuses_another_experiment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let out = dir.path().join("repro");
    let out_arg = out.display().to_string();
    let seed_file = |seed: u64| out.join("seeds").join(format!("seed-{seed}.json"));

    // 0. Impossible sizes are refused before anything is recorded, so the corrected
    //    command is not taken for another experiment.
    let mut bad = args(&config, &out_arg, "2");
    let classes = bad
        .iter()
        .position(|a| *a == "--classes")
        .expect("--classes")
        + 1;
    bad[classes] = "9";
    let refused = run_hsat(&bad);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("classes = 9"), "{stderr}");
    assert!(
        !out.join("plan.json").exists(),
        "a refused command recorded its plan"
    );

    // 1. Killed (SIGKILL) as soon as the first seed is stored.
    let mut child = Command::new(hsat_binary())
        .args(args(&config, &out_arg, "2"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hsat repro");
    let started = Instant::now();
    while !seed_file(SEEDS[0]).exists() {
        assert!(
            child.try_wait().expect("poll").is_none(),
            "hsat repro ended before its first seed was stored"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "first seed took too long"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert!(
        !out.join("report.md").exists() && !seed_file(SEEDS[1]).exists(),
        "killed too late: the second seed was already done"
    );

    // 2. The rerun completes the experiment without redoing the first seed.
    let stdout = ok(
        &run_hsat(&args(&config, &out_arg, "2")),
        "hsat repro (rerun)",
    );
    assert!(
        stdout.contains(&format!("seed {} done, stored earlier", SEEDS[0])),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&format!("seed {}: training", SEEDS[0])),
        "the stored seed was trained again:\n{stdout}"
    );
    assert!(
        stdout.contains("the dataset in"),
        "the dataset is reused:\n{stdout}"
    );
    assert!(stdout.contains("The paper's pattern"), "{stdout}");
    for file in [
        "report.md",
        "report.json",
        "repro_accuracy.png",
        "repro_difference.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    for png in ["repro_accuracy.png", "repro_difference.png"] {
        let bytes = std::fs::read(out.join(png)).expect("png");
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
            "{png}"
        );
    }
    let report = json(&out.join("report.json"));
    assert_eq!(report["methods"], serde_json::json!(["HiDisc", "HSAT"]));
    assert_eq!(report["seeds"], serde_json::json!(SEEDS));
    let levels = report["levels"].as_array().expect("levels");
    let names: Vec<&str> = levels
        .iter()
        .map(|l| l["level"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["patch", "slide", "patient"]);
    let counts: Vec<(u64, u64)> = levels
        .iter()
        .map(|l| {
            (
                l["samples"].as_u64().unwrap_or(0),
                l["patients"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [(16, 4), (8, 4), (4, 4)],
        "2 classes x 2 val patients x 2 slides x 2 patches"
    );
    for (l, level) in levels.iter().enumerate() {
        let runs: Vec<&str> = level["evaluations"]
            .as_array()
            .expect("evaluations")
            .iter()
            .map(|e| e["run"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            runs,
            [
                "clean",
                "pgd@4",
                "pgd@8",
                "apgd@4",
                "apgd@8",
                "worst_case@4",
                "worst_case@8"
            ]
        );
        for evaluation in level["evaluations"].as_array().expect("evaluations") {
            let run = evaluation["run"].as_str().unwrap_or("");
            // Each method's per-seed accuracy is the one hsat eval reported for that
            // seed: the summary is computed from the real outcomes.
            for (m, method) in ["HiDisc", "HSAT"].iter().enumerate() {
                let per_seed = evaluation["methods"][m]["per_seed"]
                    .as_array()
                    .expect("per_seed");
                assert_eq!(per_seed.len(), 2);
                for (s, seed) in SEEDS.iter().enumerate() {
                    let results = json(
                        &out.join("eval")
                            .join(format!("seed-{seed}"))
                            .join("results.json"),
                    );
                    let model = results["models"]
                        .as_array()
                        .expect("models")
                        .iter()
                        .find(|x| x["name"] == *method)
                        .expect("model")
                        .clone();
                    let expected = match run.split_once('@') {
                        None => model["clean"][l]["accuracy"].as_f64(),
                        Some(("worst_case", eps)) => model["worst_case"]
                            .as_array()
                            .expect("worst_case")
                            .iter()
                            .find(|w| w["eps_255"].as_f64() == eps.parse().ok())
                            .and_then(|w| w["levels"][l]["accuracy"].as_f64()),
                        Some((attack, eps)) => model["attacks"]
                            .as_array()
                            .expect("attacks")
                            .iter()
                            .find(|a| {
                                a["attack"] == attack && a["eps_255"].as_f64() == eps.parse().ok()
                            })
                            .and_then(|a| a["levels"][l]["accuracy"].as_f64()),
                    }
                    .expect("accuracy in results.json");
                    let got = per_seed[s].as_f64().expect("accuracy");
                    assert!(
                        (got - expected).abs() < 1e-12,
                        "{method} {run} level {l} seed {seed}: {got} vs {expected}"
                    );
                }
            }
            let difference = &evaluation["difference"];
            let low = difference["bootstrap"]["low"].as_f64().expect("low");
            let high = difference["bootstrap"]["high"].as_f64().expect("high");
            assert!(low <= high && (-1.0..=1.0).contains(&low) && (-1.0..=1.0).contains(&high));
            assert!(
                difference["t_interval"]["low"].is_f64(),
                "two seeds give a t interval"
            );
        }
    }
    let markdown = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for heading in [
        "## Patch level (16 val samples of 4 patients)",
        "## Patient level",
        "**Run time**",
        "bootstrap interval",
    ] {
        assert!(
            markdown.contains(heading),
            "{heading} missing from report.md:\n{markdown}"
        );
    }

    // 3. A third run only summarises, with the same numbers (seeded bootstrap).
    let stdout = ok(
        &run_hsat(&args(&config, &out_arg, "2")),
        "hsat repro (third)",
    );
    for seed in SEEDS {
        assert!(
            stdout.contains(&format!("seed {seed} done, stored earlier")),
            "{stdout}"
        );
    }
    assert_eq!(json(&out.join("report.json")), report);

    // 4. Another experiment in the same folder is refused before any work.
    let refused = run_hsat(&args(&config, &out_arg, "3"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("holds another experiment (the seeds differ"),
        "{stderr}"
    );
    assert!(
        !out.join("train").join("HiDisc-seed5").exists(),
        "nothing was trained"
    );
}
