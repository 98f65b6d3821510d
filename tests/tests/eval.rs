//! `hsat eval` end to end: a dataset written by `hsat synth`, two models trained by
//! `hsat run` (HiDisc and HSAT), then the paper's tables, JSON and plots from both
//! checkpoints, with transfer between them, the adaptive attack (APGD) and the worst
//! case per eps.

use std::path::Path;

use hsat_tests::{run_hsat, synth_dataset};

fn write_config(dir: &Path, data: &Path, name: &str, attack: &str) -> String {
    let text = format!(
        r#"
[infra]
seed = 3
out_dir = "{out}"
threads = 2
[data]
source = "opensrh"
db_root = "{data}"
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
name = "{attack}"
iters = 1
[eval]
knn_k = 5
steps = 2
eps = [4, 8]
batch_size = 5
"#,
        out = dir.join(name).display(),
        data = data.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn eval_writes_the_table_json_and_plots_for_two_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    synth_dataset(
        &data,
        &[
            "--classes",
            "2",
            "--patients-per-class",
            "3",
            "--slides",
            "2",
            "--patches",
            "2",
            "--size",
            "16",
        ],
    );
    let hidisc = write_config(dir.path(), &data, "hidisc", "none");
    let hsat = write_config(dir.path(), &data, "hsat", "pgd");
    ok(
        &run_hsat(&["run", "--config", &hidisc]),
        "hsat run (hidisc)",
    );
    ok(&run_hsat(&["run", "--config", &hsat]), "hsat run (hsat)");

    let out_dir = dir.path().join("eval");
    let out_arg = out_dir.display().to_string();
    let hidisc_ckpt = format!("HiDisc={}", dir.path().join("hidisc").display());
    // A checkpoint directory works as well as a run folder.
    let hsat_ckpt = format!(
        "HSAT={}",
        dir.path().join("hsat/checkpoints/step-00000002").display()
    );
    let stdout = ok(
        &run_hsat(&[
            "eval",
            "--config",
            &hsat,
            "--checkpoint",
            &hidisc_ckpt,
            "--checkpoint",
            &hsat_ckpt,
            "--out",
            &out_arg,
            "--set",
            "eval.attacks=pgd,fgsm,apgd",
            "--set",
            "eval.apgd_steps=3",
            "--set",
            "eval.apgd_restarts=2",
        ]),
        "hsat eval",
    );

    // The table is printed, one row per model, with the paper's columns.
    assert!(
        stdout.contains("| Model | Clean Acc | Clean MCA | PGD 4/255 Acc | PGD 4/255 MCA |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| HiDisc |") && stdout.contains("| HSAT |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("HiDisc -> HSAT") && stdout.contains("HSAT -> HiDisc"),
        "{stdout}"
    );
    // The attack settings are stated above the tables, and the worst case per eps is a column.
    assert!(
        stdout.contains(
            "PGD (2 steps, alpha 2/255); FGSM (1 step, alpha 10/255); APGD (3 steps x 2 restarts, "
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "| APGD 8/255 Acc | APGD 8/255 MCA | Worst case 4/255 Acc | Worst case 4/255 MCA | \
             Worst case 8/255 Acc | Worst case 8/255 MCA |"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("(APGD 3 x 2 restarts)"),
        "the plan: {stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).expect("json"))
            .expect("valid json");
    // 2 classes x 1 val patient x 2 slides x 2 patches; 2 x 2 train patients.
    assert_eq!(report["dataset"]["val_patches"], 8);
    assert_eq!(report["dataset"]["train_patches"], 16);
    assert_eq!(report["settings"]["knn_k"], 5);
    assert_eq!(report["settings"]["apgd_steps"], 3);
    assert_eq!(report["settings"]["apgd_restarts"], 2);
    let models = report["models"].as_array().expect("models");
    assert_eq!(models.len(), 2);
    for model in models {
        let attacks = model["attacks"].as_array().expect("attacks");
        let names: Vec<(String, f64)> = attacks
            .iter()
            .map(|a| {
                (
                    a["attack"].as_str().unwrap_or_default().to_owned(),
                    a["eps_255"].as_f64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("pgd".into(), 4.0),
                ("pgd".into(), 8.0),
                ("fgsm".into(), 4.0),
                ("fgsm".into(), 8.0),
                ("apgd".into(), 4.0),
                ("apgd".into(), 8.0)
            ]
        );
        // Worst case per eps: never above the clean accuracy nor any attack's at that
        // eps (a sample counts only if it survived all of them).
        let worst = model["worst_case"].as_array().expect("worst_case");
        assert_eq!(worst.len(), 2, "one per eps");
        for (w, eps) in worst.iter().zip([4.0, 8.0]) {
            assert_eq!(w["eps_255"].as_f64(), Some(eps));
            assert_eq!(w["attacks"], serde_json::json!(["pgd", "fgsm", "apgd"]));
            let levels = w["levels"].as_array().expect("levels");
            assert_eq!(levels.len(), 3);
            for (l, level) in levels.iter().enumerate() {
                let acc = level["accuracy"].as_f64().expect("accuracy");
                let bound = std::iter::once(&model["clean"][l]["accuracy"])
                    .chain(
                        attacks
                            .iter()
                            .filter(|a| a["eps_255"].as_f64() == Some(eps))
                            .map(|a| &a["levels"][l]["accuracy"]),
                    )
                    .map(|v| v.as_f64().expect("accuracy"))
                    .fold(1.0, f64::min);
                assert!(acc <= bound + 1e-12, "worst {acc} > min {bound}");
                assert_eq!(level["n"], model["clean"][l]["n"]);
            }
        }
        for levels in std::iter::once(&model["clean"]).chain(attacks.iter().map(|a| &a["levels"])) {
            let levels = levels.as_array().expect("levels");
            let ns: Vec<u64> = levels
                .iter()
                .map(|l| l["n"].as_u64().unwrap_or(0))
                .collect();
            assert_eq!(ns, [8, 4, 2], "patches, slides, patients");
            for level in levels {
                let acc = level["accuracy"].as_f64().expect("accuracy");
                assert!((0.0..=1.0).contains(&acc));
                assert!(level["top2"].as_f64().expect("top2") >= acc);
                let confusion: u64 = level["confusion"]
                    .as_array()
                    .expect("confusion")
                    .iter()
                    .flat_map(|row| row.as_array().expect("row").iter())
                    .map(|v| v.as_u64().unwrap_or(0))
                    .sum();
                assert_eq!(confusion, level["n"].as_u64().unwrap_or(0));
            }
        }
    }
    // Transfer: each model's adversarial images on the other, per attack and eps.
    let transfer = report["transfer"].as_array().expect("transfer");
    assert_eq!(transfer.len(), 2 * 6);
    for t in transfer {
        for level in t["levels"].as_array().expect("levels") {
            let drop = level["drop"].as_f64().expect("drop");
            let (clean, adv) = (
                level["clean_accuracy"].as_f64().expect("clean"),
                level["accuracy"].as_f64().expect("adv"),
            );
            assert!((drop - (clean - adv)).abs() < 1e-12);
        }
    }

    let csv = std::fs::read_to_string(out_dir.join("table.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 2 * 3, "{csv}");
    assert!(csv.starts_with("model,level,clean_acc,clean_mca,pgd_4_acc,pgd_4_mca,pgd_8_acc"));
    assert!(
        csv.lines().next().is_some_and(
            |h| h.ends_with("apgd_8_mca,worst_4_acc,worst_4_mca,worst_8_acc,worst_8_mca")
        ),
        "{csv}"
    );
    for png in ["accuracy_vs_eps.png", "clean_vs_robust.png"] {
        let bytes = std::fs::read(out_dir.join(png)).expect("png");
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
            "{png}"
        );
    }
}

#[test]
fn eval_names_a_missing_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    synth_dataset(&data, &["--classes", "2", "--size", "16"]);
    let config = write_config(dir.path(), &data, "x", "none");
    let missing = dir.path().join("nothing-here").display().to_string();
    let out_arg = dir.path().join("eval").display().to_string();
    let out = run_hsat(&[
        "eval",
        "--config",
        &config,
        "--checkpoint",
        &missing,
        "--out",
        &out_arg,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no model at") && stderr.contains("nothing-here"),
        "{stderr}"
    );
}
