//! `hsat run` with the reference's model options (issue 13 item 3), under the
//! reference's key names: the dual-batch-norm backbone (`resnet18_multi_bn`, the same
//! code as `resnet50_multi_bn` at a size CI trains), the projection head with batch
//! norm, the `pgd_2` attack, an eps warm-up longer than the run and
//! `data.dynamic_aug_version = "v0"`. The run trains, warns that eps never reaches its
//! maximum, its checkpoints hold both batch-norm branches, and `hsat eval` evaluates
//! the checkpoint (the `normal` branch's features, attacks on the `pgd` branch).

use std::path::Path;

use hsat_tests::{run_hsat, synth_dataset};

fn tensor_names(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).expect("read safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    names.sort();
    names
}

#[test]
fn the_references_model_options_train_and_checkpoint_both_branches() {
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
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[infra]
seed = 5
out_dir = "{out}"
threads = 2
[data]
source = "opensrh"
db_root = "{data}"
image_size = 16
dynamic_aug = true
[data.hidisc]
num_slide_samples = 1
num_patch_samples = 2
[training]
batch_size = 2
num_epochs = 1
save_checkpoint_interval = 2
[eval]
knn_k = 3
steps = 1
eps = [8]
batch_size = 4
attacks = "pgd"
"#,
            out = dir.path().join("run").display(),
            data = data.display()
        ),
    )
    .expect("write config");
    let config = config.display().to_string();
    // The reference's own spelling, as its scripts pass them.
    let out = run_hsat(&[
        "run",
        "--config",
        &config,
        "--set",
        "model.backbone=resnet18_multi_bn",
        "--set",
        "model.proj_head=true",
        "--set",
        "model.num_embedding_out=512",
        "--set",
        "training.attack.name=pgd_2",
        "--set",
        "training.attack.iters=1",
        "--set",
        "training.attack.warmup_epochs=5000",
        "--set",
        "data.dynamic_aug_version=v0",
        "--set",
        "training.only_adv=false",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hsat run failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("step 2/2 "), "{stdout}");
    assert!(
        stdout.contains("adv: patient") && stdout.contains("clean: patient"),
        "{stdout}"
    );
    assert!(
        stderr.contains("warmup_epochs = 5000 is more than training.num_epochs = 1")
            && stderr.contains("eps = 1.0000/255"),
        "no warning about the eps warm-up:\n{stderr}"
    );

    let ckpt = dir.path().join("run/checkpoints/step-00000002");
    let backbone = tensor_names(&ckpt.join("backbone.safetensors"));
    let pgd = tensor_names(&ckpt.join("backbone_pgd.safetensors"));
    assert!(
        backbone.contains(&"conv1.weight".to_owned()),
        "{backbone:?}"
    );
    assert!(
        backbone.iter().all(|n| !n.contains("pgd")),
        "backbone.safetensors keeps torchvision names: {backbone:?}"
    );
    assert!(pgd.contains(&"bn1.running_var".to_owned()), "{pgd:?}");
    assert!(pgd.iter().all(|n| backbone.contains(n)), "{pgd:?}");
    assert!(pgd.iter().all(|n| !n.contains("conv")), "{pgd:?}");
    let head = tensor_names(&ckpt.join("head.safetensors"));
    assert!(
        head.contains(&"layers.7.running_mean".to_owned()),
        "{head:?}"
    );
    assert!(!head.contains(&"layers.3.bias".to_owned()), "{head:?}");

    // Evaluation rebuilds the model the checkpoint describes (dual BN, projection head).
    let eval_out = dir.path().join("eval").display().to_string();
    let run_dir = format!("opts={}", dir.path().join("run").display());
    let out = run_hsat(&[
        "eval",
        "--config",
        &config,
        "--checkpoint",
        &run_dir,
        "--out",
        &eval_out,
        "--set",
        "eval.attack_target=projection",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hsat eval failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| opts |"), "{stdout}");
}
