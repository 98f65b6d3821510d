//! Parity of the reference's model options with PyTorch re-implementations of the
//! reference's code on the same inputs: `training.attack.name = "pgd_2"`,
//! `model.proj_head = true` and the dual-batch-norm backbones (`resnet50_multi_bn`,
//! and `resnet18_multi_bn`, the same code at a size a training step can check); and
//! the checkpoint layout of a dual-BN backbone.
//!
//! The fixtures come from `scripts/fixtures/model_options_fixtures.py` (which names
//! the reference file each re-implementation mirrors); regenerate them with
//!
//! ```text
//! bash scripts/setup.sh
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/model_options_fixtures.py
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use hsat_core::config::{Backbone, LossType, OptimizerConfig};
use hsat_worker::checkpoint::{
    CheckpointMeta, FORMAT_VERSION, Snapshot, open_for_resume, write_checkpoint,
};
use hsat_worker::error::WorkerError;
use hsat_worker::model::{BACKBONE_FILE, BACKBONE_PGD_FILE, Encoder, HEAD_FILE, HeadSpec, Pass};
use hsat_worker::train::attack::{Pgd, PgdVariant};
use hsat_worker::train::loss::HierarchicalLoss;
use hsat_worker::train::optim::AdamW;
use hsat_worker::train::step::{OuterObjective, StepInputs, train_step};
use tch::{Device, Kind, Tensor};

const EPS: f64 = 8.0 / 255.0;
const ALPHA: f64 = 2.0 / 255.0;

mod support;
use support::fixtures::Fixtures;

/// This file's fixtures.
fn fixtures() -> Fixtures {
    Fixtures::load("model_options.safetensors", "model_options_fixtures.py")
}

fn hidisc_loss() -> HierarchicalLoss {
    HierarchicalLoss {
        lambda_patient: 1.0,
        lambda_slide: 1.0,
        lambda_patch: 1.0,
        temperature: 0.07,
        base_temperature: 0.07,
    }
}

fn adamw(model: &Encoder) -> AdamW {
    let opt = OptimizerConfig {
        learn_rate: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    AdamW::new(model.parameters(), &opt).unwrap()
}

fn pgd(variant: PgdVariant, iters: usize) -> Pgd {
    Pgd {
        variant,
        eps: EPS,
        alpha: ALPHA,
        iters,
        loss_type: LossType::P_S_PT,
    }
}

/// max |a - b| / max(|b|, 1e-12): a relative error for whole tensors.
fn rel_err(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    let ours = ours.to_kind(Kind::Double);
    let theirs = theirs.to_kind(Kind::Double);
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    diff / theirs.abs().max().double_value(&[]).max(1e-12)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn state_map(model: &Encoder) -> HashMap<String, Tensor> {
    model.state().into_iter().collect()
}

/// The closed-form weights of the fixture script's `closed_form` for every backbone
/// tensor (both branches), by hsat name sorted as strings; head tensors as they are.
fn load_closed_form(model: &mut Encoder, head: Vec<(String, Tensor)>) {
    let mut names: Vec<(String, Vec<i64>)> = model
        .state()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, t)| (n, t.size()))
        .collect();
    names.sort();
    let mut entries = Vec::new();
    for (k, (name, shape)) in names.iter().enumerate() {
        let numel: i64 = shape.iter().product();
        if name.ends_with("num_batches_tracked") {
            entries.push((
                name.clone(),
                Tensor::zeros(shape.as_slice(), (Kind::Int64, Device::Cpu)),
            ));
            continue;
        }
        let values: Vec<f32> = (0..numel as usize)
            .map(|i| {
                let v = (((i * 7 + k * 13) % 23) as f64 - 11.0) / 11.0;
                let value = if name.ends_with("running_var") {
                    1.0 + 0.25 * (v + 1.0)
                } else if name.ends_with("running_mean") {
                    0.05 * v
                } else if shape.len() == 1 && name.ends_with("weight") {
                    0.3 + 0.05 * v
                } else if shape.len() == 1 && name.ends_with("bias") {
                    0.1 * v
                } else {
                    v * (2.0 / (numel / shape[0]) as f64).sqrt()
                };
                value as f32
            })
            .collect();
        entries.push((
            name.clone(),
            Tensor::from_slice(&values).reshape(shape.as_slice()),
        ));
    }
    entries.extend(head);
    model
        .load_state(&entries, Path::new("closed-form weights"))
        .expect("closed-form weights fit");
}

fn closed_input(shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
    Tensor::from_slice(&values).reshape(shape)
}

// ------------------------------------------------------------------------ pgd_2

fn pgd2_model(fx: &Fixtures) -> Encoder {
    let mut model = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).unwrap();
    model
        .load_state(&fx.with_prefix("pgd2.init."), fx.path())
        .unwrap();
    model
}

#[test]
fn pgd_2_draws_clamps_and_steps_as_the_reference() {
    let fx = fixtures();
    let model = pgd2_model(&fx);
    let loss = hidisc_loss();
    let x = fx.get("pgd2.x");
    let attack = pgd(PgdVariant::Pgd2, 5);

    // The start: `zeros_like(x).uniform_(-eps, eps)` after manual_seed(11), bit for bit.
    tch::manual_seed(11);
    let drawn = attack.random_start(x).unwrap();
    assert_eq!(
        max_abs_diff(&drawn, fx.get("pgd2.delta0")),
        0.0,
        "the start draw"
    );

    // Zero iterations: the start clamped into [-x, 1 - x], exactly.
    let start = pgd(PgdVariant::Pgd2, 0)
        .run(&model, &loss, x, fx.get("pgd2.delta0"))
        .unwrap();
    assert_eq!(
        max_abs_diff(&start, fx.get("pgd2.start")),
        0.0,
        "the clamped start"
    );
    assert_ne!(
        max_abs_diff(&start, fx.get("pgd2.delta0")),
        0.0,
        "the fixture's pixels at 0 and 1 make the clamp bite"
    );

    let delta = attack.run(&model, &loss, x, fx.get("pgd2.delta0")).unwrap();
    // Exactly: both sides run the same libtorch kernels on the same values, and the
    // variants differ only in rounding (clamp(x + d, 0, 1) - x against clamp(d, -x, 1 - x)).
    let err = max_abs_diff(&delta, fx.get("pgd2.delta"));
    assert!(err == 0.0, "pgd_2 delta: max abs err {err:e}");
    let adv = x + &delta;
    assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
    assert!(delta.abs().max().double_value(&[]) <= EPS as f32 as f64);

    // The first variant from the same draw does not clamp the start: another attack.
    let other = pgd(PgdVariant::Pgd, 5)
        .run(&model, &loss, x, fx.get("pgd2.delta0"))
        .unwrap();
    assert!(max_abs_diff(&other, fx.get("pgd2.delta")) > 1e-3);
}

// ------------------------------------------------------------------- proj_head

fn proj_model(fx: &Fixtures) -> Encoder {
    let mut model = Encoder::with_head(Backbone::SmallCnn, HeadSpec::Proj, Device::Cpu).unwrap();
    model
        .load_state(&fx.with_prefix("proj.init."), fx.path())
        .expect("the reference's proj_head state names");
    model
}

#[test]
fn the_projection_head_has_the_references_layers_and_init() {
    tch::manual_seed(3);
    let model = Encoder::with_head(Backbone::SmallCnn, HeadSpec::Proj, Device::Cpu).unwrap();
    let head: Vec<(String, Vec<i64>)> = model
        .state()
        .into_iter()
        .filter(|(n, _)| n.starts_with("head."))
        .map(|(n, t)| (n, t.size()))
        .collect();
    let bn = |i: usize| {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .map(|leaf| format!("head.layers.{i}.{leaf}"))
    };
    let mut expected: Vec<String> =
        vec!["head.layers.0.weight".into(), "head.layers.0.bias".into()];
    expected.extend(bn(1));
    expected.push("head.layers.3.weight".into());
    expected.extend(bn(4));
    expected.push("head.layers.6.weight".into());
    expected.extend(bn(7));
    let mut names: Vec<String> = head.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    expected.sort();
    assert_eq!(
        names, expected,
        "Linear(bias), BN, Linear(no bias), BN, Linear(no bias), BN"
    );
    assert!(
        head.iter()
            .filter(|(n, _)| n.ends_with(".weight")
                && !n.contains("layers.1.")
                && !n.contains("layers.4.")
                && !n.contains("layers.7."))
            .all(|(_, s)| s == &vec![16, 16])
    );
    let state = state_map(&model);
    // nn.Linear's default init: U(-1/sqrt(16), 1/sqrt(16)) for the weight and the bias.
    for name in [
        "head.layers.0.weight",
        "head.layers.0.bias",
        "head.layers.6.weight",
    ] {
        let t = &state[name];
        let max = t.abs().max().double_value(&[]);
        assert!(max <= 0.25 && max > 0.15, "{name}: max |w| {max}");
        assert!(t.std(true).double_value(&[]) > 0.05, "{name} is random");
    }
    assert_eq!(state["head.layers.4.weight"].min().double_value(&[]), 1.0);
    assert_eq!(
        state["head.layers.4.bias"].abs().max().double_value(&[]),
        0.0
    );
    // The embedding is as wide as the features, L2-normalised.
    let emb = model
        .embed(
            &Tensor::rand([3, 3, 8, 8], (Kind::Float, Device::Cpu)),
            Pass::TRAIN,
        )
        .unwrap();
    assert_eq!(emb.size(), [3, 16]);
}

#[test]
fn the_projection_head_matches_the_reference_forward_backward_and_step() {
    let fx = fixtures();
    let model = proj_model(&fx);
    let loss = hidisc_loss();
    let x = fx.get("proj.x");
    let value = loss
        .compute(
            &model.embed_batch(x, Pass::TRAIN).unwrap(),
            LossType::P_S_PT,
        )
        .unwrap()
        .total;
    let err = rel_err(&value, fx.get("proj.loss"));
    assert!(err < 1e-5, "train-mode loss: rel err {err:e}");
    value.backward();
    for (name, param) in model.parameters() {
        let err = rel_err(&param.grad(), fx.get(&format!("proj.grad.{name}")));
        assert!(err < 1e-4, "gradient of {name}: rel err {err:e}");
    }
    let state = state_map(&model);
    for (name, expected) in fx.with_prefix("proj.after_fwd.") {
        let err = max_abs_diff(&state[&name], &expected);
        assert!(err < 1e-6, "{name} after the train-mode forward: {err:e}");
    }
    let emb = tch::no_grad(|| model.embed_batch(x, Pass::EVAL)).unwrap();
    let err = max_abs_diff(&emb, fx.get("proj.emb_eval"));
    assert!(
        err < 1e-5,
        "eval-mode embeddings (running statistics): {err:e}"
    );

    // One only_adv step with pgd from the initial weights.
    let model = proj_model(&fx);
    let mut optimizer = adamw(&model);
    let out = train_step(
        &model,
        &loss,
        &mut optimizer,
        StepInputs {
            images: x,
            attack: Some((
                pgd(PgdVariant::Pgd, 2),
                fx.get("proj.step.delta0").shallow_clone(),
            )),
            objective: OuterObjective::OnlyAdv,
            lr: 1e-3,
        },
    )
    .unwrap();
    let theirs = fx.get("proj.step.loss").double_value(&[]);
    assert!(
        (out.total - theirs).abs() / theirs.abs() < 1e-5,
        "step loss {} vs {theirs}",
        out.total
    );
    let state = state_map(&model);
    for (name, expected) in fx.with_prefix("proj.step.after.") {
        let err = max_abs_diff(&state[&name], &expected);
        assert!(err < 2e-6, "{name} after the step: {err:e}");
    }
}

// ------------------------------------------------------------------ dual batch norm

#[test]
fn resnet50_multi_bn_matches_the_reference_on_each_branch() {
    let fx = fixtures();
    let mut model = Encoder::new(Backbone::ResNet50MultiBn, &[], 8, Device::Cpu).unwrap();
    let head = model
        .state()
        .into_iter()
        .filter(|(n, _)| n.starts_with("head."))
        .collect();
    load_closed_form(&mut model, head);
    let x = closed_input(&[2, 3, 32, 32]);
    for (pass, key) in [(Pass::EVAL, "normal"), (Pass::ATTACK, "pgd")] {
        let features = tch::no_grad(|| model.features(&x, pass)).unwrap();
        let err = rel_err(&features, fx.get(&format!("dual.r50.features.{key}")));
        assert!(err < 1e-5, "{key} branch: rel err {err:e}");
    }
    // The branches differ (the fixture's weights do), so the pass picked the branch.
    let normal = fx.get("dual.r50.features.normal");
    let pgd = fx.get("dual.r50.features.pgd");
    assert!(max_abs_diff(normal, pgd) > 0.1);
}

#[test]
fn resnet18_multi_bn_training_steps_with_pgd_2_match_the_reference() {
    let fx = fixtures();
    let loss = hidisc_loss();
    let x = fx.get("dual.r18.x");
    for mode in ["mixed", "only_adv"] {
        let mut model = Encoder::new(Backbone::ResNet18MultiBn, &[], 8, Device::Cpu).unwrap();
        let head = fx
            .with_prefix("dual.r18.head.")
            .into_iter()
            .map(|(n, t)| (format!("head.{n}"), t))
            .collect();
        load_closed_form(&mut model, head);
        let before = state_map(&model)
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect::<HashMap<_, _>>();
        let mut optimizer = adamw(&model);
        let objective = match mode {
            "mixed" => OuterObjective::Mixed {
                weight: 0.66 * (1.0 - 0.5),
            },
            _ => OuterObjective::OnlyAdv,
        };
        for k in 0..2 {
            let delta0 = fx
                .get(&format!("dual.r18.{mode}.delta0.{k}"))
                .shallow_clone();
            let out = train_step(
                &model,
                &loss,
                &mut optimizer,
                StepInputs {
                    images: x,
                    attack: Some((pgd(PgdVariant::Pgd2, 2), delta0)),
                    objective,
                    lr: 1e-3,
                },
            )
            .unwrap();
            let theirs = fx
                .get(&format!("dual.r18.{mode}.loss.{k}"))
                .double_value(&[]);
            let err = (out.total - theirs).abs() / theirs.abs();
            assert!(
                err < 1e-4,
                "{mode} step {k}: loss {} vs {theirs} (rel err {err:e})",
                out.total
            );
        }
        let state = state_map(&model);
        for (name, expected) in fx.with_prefix(&format!("dual.r18.{mode}.after.")) {
            let err = rel_err(&state[&name], &expected);
            assert!(err < 1e-4, "{mode}: {name} after 2 steps: rel err {err:e}");
        }
        if mode == "only_adv" {
            // The clean branch never runs in train mode and never gets a gradient: the
            // reference's AdamW skips it (no weight decay) and its statistics stay put.
            for name in ["bn1.weight", "bn1.running_mean", "layer4.1.bn2.weight"] {
                assert_eq!(max_abs_diff(&state[name], &before[name]), 0.0, "{name}");
            }
            assert_eq!(state["bn1.num_batches_tracked"].int64_value(&[]), 0);
            assert_eq!(state["bn1.pgd.num_batches_tracked"].int64_value(&[]), 2);
        } else {
            assert_eq!(state["bn1.num_batches_tracked"].int64_value(&[]), 2);
            assert_eq!(state["bn1.pgd.num_batches_tracked"].int64_value(&[]), 2);
        }
    }
}

#[test]
fn only_the_branches_training_uses_are_optimised() {
    let dual = Encoder::new(Backbone::ResNet18MultiBn, &[], 8, Device::Cpu).unwrap();
    let all: Vec<String> = dual.parameters().into_iter().map(|(n, _)| n).collect();
    let names = |normal, pgd| -> Vec<String> {
        dual.trained_parameters(normal, pgd)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(names(true, true), all);
    let only_adv = names(false, true);
    assert!(only_adv.contains(&"bn1.pgd.weight".to_owned()));
    assert!(only_adv.contains(&"conv1.weight".to_owned()));
    assert!(only_adv.contains(&"head.layers.0.weight".to_owned()));
    assert!(!only_adv.contains(&"bn1.weight".to_owned()));
    assert!(!only_adv.contains(&"layer2.0.downsample.1.bias".to_owned()));
    let clean = names(true, false);
    assert!(
        clean.contains(&"bn1.weight".to_owned()) && !clean.contains(&"bn1.pgd.weight".to_owned())
    );
    // Each branch holds the same number of tensors; the rest is shared.
    assert_eq!(all.len() - only_adv.len(), all.len() - clean.len());
    assert_eq!(
        only_adv.len() + clean.len() - all.len(),
        all.iter()
            .filter(|n| !n.contains("bn") && !n.contains("downsample.1"))
            .count()
    );
    // Single-BN backbones: everything, whatever the passes.
    let plain = Encoder::new(Backbone::ResNet18, &[], 8, Device::Cpu).unwrap();
    assert_eq!(
        plain.trained_parameters(false, true).len(),
        plain.parameters().len()
    );
}

// ------------------------------------------------------------------- checkpoints

fn meta() -> CheckpointMeta {
    CheckpointMeta {
        format_version: FORMAT_VERSION,
        step: 3,
        epoch: 0,
        hsat_version: "test".into(),
        backbone: "resnet18_multi_bn".into(),
        feature_dim: 512,
        config: serde_json::json!({"model": {"backbone": "resnet18_multi_bn"}}),
        config_fingerprint: "cfg".into(),
        last_step: None,
        mean_total_loss: None,
        dataset_fingerprint: None,
    }
}

fn names_in(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    names
}

#[test]
fn a_dual_bn_checkpoint_keeps_torchvision_names_and_both_branches_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Encoder::new(Backbone::ResNet18MultiBn, &[], 8, Device::Cpu).unwrap();
    let head = model
        .state()
        .into_iter()
        .filter(|(n, _)| n.starts_with("head."))
        .collect();
    load_closed_form(&mut model, head); // the branches now hold different values
    let state = model.state_snapshot().unwrap();
    let snapshot = Snapshot {
        backbone: state.backbone,
        backbone_pgd: state.backbone_pgd,
        head: state.head,
        optimizer: adamw(&model).state_snapshot().unwrap(),
        meta: meta(),
    };
    let ckpt = write_checkpoint(dir.path(), &snapshot).unwrap();
    open_for_resume(&ckpt).expect("the manifest covers backbone_pgd.safetensors too");

    // backbone.safetensors: exactly torchvision resnet18's names (those of the plain
    // backbone, which loads into torchvision strictly); the pgd file: its batch norms.
    let plain = Encoder::new(Backbone::ResNet18, &[], 8, Device::Cpu).unwrap();
    let mut torchvision: Vec<String> = plain
        .state()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with("head."))
        .collect();
    torchvision.sort();
    assert_eq!(names_in(&ckpt.join(BACKBONE_FILE)), torchvision);
    let bn_names: Vec<String> = torchvision
        .iter()
        .filter(|n| n.contains("bn") || n.contains("downsample.1"))
        .cloned()
        .collect();
    assert_eq!(names_in(&ckpt.join(BACKBONE_PGD_FILE)), bn_names);
    let normal_file: HashMap<String, Tensor> = Tensor::read_safetensors(ckpt.join(BACKBONE_FILE))
        .unwrap()
        .into_iter()
        .collect();
    let pgd_file: HashMap<String, Tensor> = Tensor::read_safetensors(ckpt.join(BACKBONE_PGD_FILE))
        .unwrap()
        .into_iter()
        .collect();
    let live = state_map(&model);
    assert_eq!(
        max_abs_diff(
            &normal_file["layer2.0.downsample.1.weight"],
            &live["layer2.0.downsample.1.weight"]
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &pgd_file["layer2.0.downsample.1.weight"],
            &live["layer2.0.downsample.1.pgd.weight"]
        ),
        0.0
    );
    assert!(max_abs_diff(&pgd_file["bn1.weight"], &normal_file["bn1.weight"]) > 0.0);

    // Resume: a fresh model loads both branches.
    let mut fresh = Encoder::new(Backbone::ResNet18MultiBn, &[], 8, Device::Cpu).unwrap();
    fresh.load(&ckpt).unwrap();
    let loaded = state_map(&fresh);
    for (name, tensor) in &live {
        assert_eq!(max_abs_diff(&loaded[name], tensor), 0.0, "{name}");
    }

    // Without its pgd file, the checkpoint is refused, naming the file.
    std::fs::remove_file(ckpt.join(BACKBONE_PGD_FILE)).unwrap();
    let err = fresh.load(&ckpt).unwrap_err();
    match &err {
        WorkerError::Weights { path, reason } => {
            assert!(
                path.ends_with(BACKBONE_PGD_FILE) && reason.contains("missing"),
                "{err}"
            );
        }
        other => panic!("expected a weights error, got {other}"),
    }

    // A torchvision file (the plain backbone's) starts both branches from its batch norms.
    let tv = dir.path().join("tv");
    std::fs::create_dir(&tv).unwrap();
    plain.save(&tv).unwrap();
    assert!(
        !tv.join(BACKBONE_PGD_FILE).exists(),
        "a plain backbone has no pgd file"
    );
    assert!(tv.join(HEAD_FILE).exists());
    fresh.load_backbone(&tv.join(BACKBONE_FILE)).unwrap();
    let loaded = state_map(&fresh);
    let plain_state = state_map(&plain);
    for name in ["bn1.weight", "layer3.0.downsample.1.running_var"] {
        let pgd_name = name
            .rsplit_once('.')
            .map(|(m, l)| format!("{m}.pgd.{l}"))
            .unwrap();
        assert_eq!(max_abs_diff(&loaded[name], &plain_state[name]), 0.0);
        assert_eq!(max_abs_diff(&loaded[&pgd_name], &plain_state[name]), 0.0);
    }
}
