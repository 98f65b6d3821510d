//! Checkpoints: written atomically, readable back into the same model, and a torn
//! (crashed) write never shows up as a checkpoint.

use std::path::{Path, PathBuf};

use hsat_core::config::Backbone;
use hsat_worker::checkpoint::{
    CheckpointMeta, FORMAT_VERSION, Snapshot, list_checkpoints, read_meta,
};
use hsat_worker::model::{BACKBONE_FILE, Encoder};
use hsat_worker::train::optim::AdamW;
use tch::{Device, Kind, Tensor};

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        format_version: FORMAT_VERSION,
        step,
        epoch: 0,
        hsat_version: "0.1.0".into(),
        backbone: "small_cnn".into(),
        feature_dim: 16,
        config: serde_json::json!({"model": {"backbone": "small_cnn"}}),
        config_fingerprint: "cfg".into(),
        last_step: None,
        mean_total_loss: Some(1.5),
        dataset_fingerprint: Some("abc".into()),
    }
}

fn write_checkpoint(
    root: &Path,
    model: &Encoder,
    meta: &CheckpointMeta,
) -> hsat_worker::Result<PathBuf> {
    let state = model.state_snapshot()?;
    let defaults = hsat_core::config::Config::default().training.optimizer;
    let optimizer = AdamW::new(model.parameters(), &defaults)?.state_snapshot()?;
    let snapshot = Snapshot {
        backbone: state.backbone,
        backbone_pgd: state.backbone_pgd,
        head: state.head,
        optimizer,
        meta: meta.clone(),
    };
    hsat_worker::checkpoint::write_checkpoint(root, &snapshot)
}

#[test]
fn a_checkpoint_round_trips_into_a_fresh_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(1);
    let model = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    let written = write_checkpoint(dir.path(), &model, &meta(3)).expect("write");
    assert_eq!(
        written.file_name().and_then(|n| n.to_str()),
        Some("step-00000003")
    );
    assert_eq!(read_meta(&written).expect("meta"), meta(3));

    tch::manual_seed(2);
    let mut other = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    other.load(&written).expect("load");
    for ((name, a), (_, b)) in model.state().iter().zip(other.state().iter()) {
        assert!(a.equal(b), "{name} differs after reload");
    }
    let x = Tensor::rand([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    assert!(
        model
            .embed(&x, hsat_worker::model::Pass::EVAL)
            .expect("a")
            .equal(&other.embed(&x, hsat_worker::model::Pass::EVAL).expect("b"))
    );
}

#[test]
fn a_torn_write_is_not_listed_and_a_wrong_backbone_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    write_checkpoint(dir.path(), &model, &meta(1)).expect("write");
    // What a crash mid-write leaves behind: a staging directory without metadata.
    std::fs::create_dir_all(dir.path().join(".step-00000002.tmp-999")).expect("mkdir");
    std::fs::write(
        dir.path()
            .join(".step-00000002.tmp-999")
            .join(BACKBONE_FILE),
        b"torn",
    )
    .expect("write");
    let listed = list_checkpoints(dir.path()).expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].ends_with("step-00000001"));

    let mut resnet = Encoder::new(Backbone::ResNet18, &[], 8, Device::Cpu).expect("model");
    let err = resnet
        .load(&listed[0])
        .expect_err("small_cnn weights cannot fill a resnet18")
        .to_string();
    assert!(err.contains("missing `layer1.0.conv1.weight`"), "{err}");

    std::fs::write(dir.path().join("garbage.safetensors"), b"not safetensors").expect("write");
    let err = resnet
        .load_backbone(&dir.path().join("garbage.safetensors"))
        .expect_err("garbage")
        .to_string();
    assert!(err.contains("cannot read it as safetensors"), "{err}");
}

#[test]
fn saving_a_step_again_replaces_it_whole_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(3);
    let first = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    write_checkpoint(dir.path(), &first, &meta(5)).expect("write");
    tch::manual_seed(4);
    let second = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    let written = write_checkpoint(dir.path(), &second, &meta(5)).expect("rewrite");

    let mut reloaded = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    reloaded.load(&written).expect("load");
    for ((name, a), (_, b)) in second.state().iter().zip(reloaded.state().iter()) {
        assert!(a.equal(b), "{name} is not the second save's");
    }
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["step-00000005".to_string()]);
}

/// The complete state is in the directory with a manifest; a flipped bit or a
/// truncated file is rejected naming the file, and the newest complete one before
/// it is chosen instead.
#[test]
fn a_damaged_checkpoint_is_rejected_naming_the_file_and_the_previous_one_is_used() {
    use hsat_worker::checkpoint::{OPTIMIZER_FILE, newest_usable, open_for_resume};
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).expect("model");
    for step in 1..=3 {
        write_checkpoint(dir.path(), &model, &meta(step)).expect("write");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("step-00000003"))
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "backbone.safetensors",
            "checkpoint.json",
            "head.safetensors",
            "manifest.json",
            "optimizer.safetensors"
        ]
    );
    let (manifest, read) = open_for_resume(&dir.path().join("step-00000003")).expect("verifies");
    assert_eq!((manifest.step, read.step), (3, 3));

    // Step 3: one bit of the optimiser state flipped.
    let flipped = dir.path().join("step-00000003").join(OPTIMIZER_FILE);
    let mut bytes = std::fs::read(&flipped).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&flipped, &bytes).expect("write");
    let err = open_for_resume(&dir.path().join("step-00000003")).expect_err("tampered");
    let chain = hsat_worker::error::error_chain(&err);
    assert!(chain.contains("optimizer.safetensors"), "{chain}");
    assert!(chain.contains("SHA-256"), "{chain}");
    // Step 2: backbone truncated.
    let truncated = dir.path().join("step-00000002").join(BACKBONE_FILE);
    let bytes = std::fs::read(&truncated).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let chain = hsat_worker::error::error_chain(
        &open_for_resume(&dir.path().join("step-00000002")).expect_err("truncated"),
    );
    assert!(chain.contains("backbone.safetensors"), "{chain}");

    let (chosen, manifest) = newest_usable(dir.path(), None)
        .expect("listed")
        .expect("step 1 is intact");
    assert!(chosen.ends_with("step-00000001"), "{}", chosen.display());
    assert_eq!(manifest.step, 1);
    assert_eq!(
        newest_usable(dir.path(), Some(0))
            .expect("listed")
            .map(|(d, _)| d),
        None
    );
}
