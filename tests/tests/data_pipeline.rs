//! Datasets on disk, end to end: `hsat synth` writes both formats, `hsat data check`
//! passes on them and reports broken datasets clearly (missing file, truncated TIFF,
//! empty slide, unknown split id), and `hsat run` trains from the files.

use std::path::Path;

use hsat_tests::{run_hsat, synth_dataset};

fn synth(out: &Path, format: &str) {
    synth_dataset(out, &["--format", format, "--size", "32", "--seed", "5"]);
}

fn opensrh_args(root: &Path) -> Vec<String> {
    vec![
        "--set".into(),
        "data.source=opensrh".into(),
        "--set".into(),
        format!("data.db_root={}", root.display()),
    ]
}

fn data_check(args: &[String]) -> (bool, String) {
    let mut all = vec!["data", "check"];
    all.extend(args.iter().map(String::as_str));
    let out = run_hsat(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn data_check_passes_on_a_synthetic_dataset_and_prints_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("srh");
    synth(&root, "opensrh");
    let (ok, text) = data_check(&opensrh_args(&root));
    assert!(ok, "{text}");
    assert!(
        text.contains("train") && text.contains("val") && text.contains("normal"),
        "{text}"
    );
    assert!(
        text.contains("total                12      24       96"),
        "{text}"
    );
}

#[test]
fn data_check_reports_each_kind_of_broken_dataset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("srh");
    synth(&root, "opensrh");
    let meta_path = root.join("meta/opensrh.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("meta")).expect("json");

    // A missing file and a truncated TIFF in patient SYN_002's first slide.
    let patches = meta["SYN_002"]["slides"]["1"].clone();
    let list = if patches["tumor_patches"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        "tumor_patches"
    } else {
        "normal_patches"
    };
    let missing = root.join(patches[list][0].as_str().expect("path"));
    std::fs::remove_file(&missing).expect("remove");
    let truncated = root.join(patches[list][1].as_str().expect("path"));
    let bytes = std::fs::read(&truncated).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("truncate");

    // An empty slide, and an id in the split file that the metadata does not know.
    let patient = meta["SYN_003"].clone();
    let list3 = if patient["class"] == "normal" {
        "normal_patches"
    } else {
        "tumor_patches"
    };
    meta["SYN_003"]["slides"]["2"][list3] = serde_json::json!([]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write");
    let split_path = root.join("meta/train_val_split.json");
    let mut split: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&split_path).expect("split")).expect("json");
    split["val"]
        .as_array_mut()
        .expect("val list")
        .push(serde_json::json!("GHOST_9"));
    std::fs::write(&split_path, serde_json::to_vec(&split).expect("json")).expect("write");

    let (ok, text) = data_check(&opensrh_args(&root));
    assert!(!ok, "a broken dataset passed:\n{text}");
    assert!(
        text.contains("missing patch files") && text.contains(&missing.display().to_string()),
        "{text}"
    );
    assert!(
        text.contains("unreadable patch images") && text.contains(&truncated.display().to_string()),
        "{text}"
    );
    assert!(
        text.contains("slides without a usable patch") && text.contains("SYN_003"),
        "{text}"
    );
    assert!(
        text.contains("split ids unknown to the metadata") && text.contains("GHOST_9"),
        "{text}"
    );
}

fn train_args(out: &Path) -> Vec<String> {
    [
        "run",
        "--set",
        "model.backbone=small_cnn",
        "--set",
        "model.num_embedding_out=8",
        "--set",
        "data.image_size=32",
        "--set",
        "training.batch_size=4",
        "--set",
        "training.num_epochs=1",
        "--set",
        "training.attack.name=pgd",
        "--set",
        "training.attack.iters=1",
        "--set",
        "training.only_adv=true",
        "--set",
        "data.loader.threads=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--set".to_string(),
        format!("infra.out_dir={}", out.display()),
    ])
    .collect()
}

#[test]
fn hsat_trains_from_files_in_both_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srh = dir.path().join("srh");
    let tiles = dir.path().join("tiles");
    synth(&srh, "opensrh");
    synth(&tiles, "manifest");
    let sources = [
        opensrh_args(&srh),
        vec![
            "--set".into(),
            "data.source=manifest".into(),
            "--set".into(),
            format!("data.manifest={}", tiles.join("manifest.csv").display()),
        ],
    ];
    for (n, source) in sources.iter().enumerate() {
        let out = dir.path().join(format!("run{n}"));
        let mut args = train_args(&out);
        args.extend(source.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = run_hsat(&argv);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
        // 9 balanced training patients (3 classes x 3) in steps of 4: 3 steps.
        assert!(stdout.contains("step 3/3 "), "{stdout}");
        assert!(stdout.contains("waited for data"), "{stdout}");
        assert!(
            out.join("checkpoints/step-00000003/backbone.safetensors")
                .is_file()
        );
    }
}
