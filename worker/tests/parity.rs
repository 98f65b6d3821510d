//! Parity of the engine with PyTorch on the same inputs: hierarchical loss and its
//! gradient for every loss_type, parameter gradients, PGD deltas, ten AdamW steps with
//! the warm-up + cosine schedule in all three outer modes, and the backbones' forward
//! pass.
//!
//! The fixtures come from `scripts/fixtures/engine_fixtures.py`; regenerate them with
//!
//! ```text
//! bash scripts/setup.sh
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/engine_fixtures.py
//! ```

use std::path::Path;

use hsat_core::config::{Backbone, LossType, OptimizerConfig};
use hsat_core::schedule::lr_multiplier;
use hsat_worker::model::Encoder;
use hsat_worker::train::attack::{Pgd, PgdVariant};
use hsat_worker::train::loss::HierarchicalLoss;
use hsat_worker::train::optim::AdamW;
use hsat_worker::train::step::{OuterObjective, StepInputs, train_step};
use tch::{Device, Kind, Tensor};

const LOSS_TYPES: [&str; 7] = ["p_s_pt", "s_pt", "p_pt", "p_s", "p", "s", "pt"];

mod support;
use support::fixtures::Fixtures;

/// This file's fixtures.
fn fixtures() -> Fixtures {
    Fixtures::load("engine.safetensors", "engine_fixtures.py")
}

impl Fixtures {
    /// The tiny reference model (small_cnn, head 16 -> 12 -> 8) at its initial weights.
    fn model(&self) -> Encoder {
        let mut model = Encoder::new(Backbone::SmallCnn, &[12], 8, Device::Cpu).expect("model");
        model
            .load_state(&self.with_prefix("init."), self.path())
            .expect("fixture weights fit the model");
        model
    }
}

fn loss_with(setting: &str) -> HierarchicalLoss {
    match setting {
        "default" => HierarchicalLoss {
            lambda_patient: 1.0,
            lambda_slide: 1.0,
            lambda_patch: 1.0,
            temperature: 0.07,
            base_temperature: 0.07,
        },
        "custom" => HierarchicalLoss {
            lambda_patient: 1.0,
            lambda_slide: 0.5,
            lambda_patch: 2.0,
            temperature: 0.1,
            base_temperature: 0.07,
        },
        other => panic!("unknown setting {other}"),
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

fn assert_rel(what: &str, ours: f64, theirs: f64, tol: f64) {
    let err = (ours - theirs).abs() / theirs.abs().max(1e-12);
    assert!(
        err < tol || (ours - theirs).abs() < 1e-7,
        "{what}: hsat {ours} vs pytorch {theirs} (rel. err. {err:e} >= {tol:e})"
    );
}

/// max |a - b| / max(|b|, floor): a relative error for whole tensors.
fn tensor_rel_err(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    let ours = ours.to_kind(Kind::Double);
    let theirs = theirs.to_kind(Kind::Double);
    let diff = scalar(&(&ours - &theirs).abs().max());
    diff / scalar(&theirs.abs().max()).max(1e-12)
}

#[test]
fn hierarchical_loss_and_its_gradient_match_pytorch_for_every_loss_type() {
    let fx = fixtures();
    for setting in ["default", "custom"] {
        let loss = loss_with(setting);
        for lt in LOSS_TYPES {
            let levels: LossType = lt.parse().expect("loss type");
            let emb = fx.get("emb").detach().set_requires_grad(true);
            let out = loss.compute(&emb, levels).expect("loss");
            let values = out.values().expect("values");
            let key = |level: &str| format!("loss.{setting}.{lt}.{level}");
            assert_rel(
                &key("patient"),
                values.patient,
                scalar(fx.get(&key("patient"))),
                1e-5,
            );
            assert_rel(
                &key("slide"),
                values.slide,
                scalar(fx.get(&key("slide"))),
                1e-5,
            );
            assert_rel(
                &key("patch"),
                values.patch,
                scalar(fx.get(&key("patch"))),
                1e-5,
            );
            assert_rel(
                &key("total"),
                values.total,
                scalar(fx.get(&key("total"))),
                1e-5,
            );
            let grad = Tensor::run_backward(&[&out.total], &[&emb], false, false)
                .pop()
                .expect("grad");
            let err = tensor_rel_err(&grad, fx.get(&format!("grad_emb.{setting}.{lt}")));
            assert!(err < 1e-4, "grad_emb.{setting}.{lt}: rel. err. {err:e}");
        }
    }
}

#[test]
fn a_level_without_positives_is_rejected_before_computing() {
    let emb = Tensor::randn([2, 2, 2, 1, 8], (Kind::Float, Device::Cpu));
    let loss = loss_with("default");
    let err = loss
        .compute(&emb, LossType::P_S_PT)
        .expect_err("patch level has one view");
    let message = err.to_string();
    assert!(
        message.contains("patch level") && message.contains("num_transforms"),
        "{message}"
    );
    // The same shape is fine once the patch level is off.
    assert!(loss.compute(&emb, "p_s".parse().expect("lt")).is_ok());
}

#[test]
fn parameter_gradients_match_pytorch() {
    let fx = fixtures();
    let model = fx.model();
    let emb = model
        .embed_batch(fx.get("x"), hsat_worker::model::Pass::TRAIN)
        .expect("forward");
    let total = loss_with("default")
        .compute(&emb, LossType::P_S_PT)
        .expect("loss")
        .total;
    assert_rel(
        "train_grad.loss",
        scalar(&total),
        scalar(fx.get("train_grad.loss")),
        1e-5,
    );
    total.backward();
    for (name, param) in model.parameters() {
        let err = tensor_rel_err(&param.grad(), fx.get(&format!("train_grad.{name}")));
        assert!(err < 1e-4, "gradient of {name}: rel. err. {err:e}");
    }
}

#[test]
fn pgd_deltas_match_pytorch_and_no_parameter_gradient_is_computed() {
    let fx = fixtures();
    let model = fx.model();
    let loss = loss_with("default");
    for lt in ["p_s_pt", "pt"] {
        let pgd = Pgd {
            variant: PgdVariant::Pgd,
            eps: 8.0 / 255.0,
            alpha: 2.0 / 255.0,
            iters: 5,
            loss_type: lt.parse().expect("lt"),
        };
        let delta = pgd
            .run(
                &model,
                &loss,
                fx.get("x"),
                fx.get(&format!("pgd.{lt}.delta0")),
            )
            .expect("attack");
        let expected = fx.get(&format!("pgd.{lt}.delta"));
        let diff = scalar(&(&delta - expected).abs().max());
        assert!(diff <= 1e-6, "pgd {lt}: max abs diff {diff:e}");
        assert!(scalar(&delta.abs().max()) <= 8.0 / 255.0 + 1e-7);
        for (name, param) in model.parameters() {
            assert!(
                !param.grad().defined(),
                "the attack computed a gradient for {name}"
            );
            assert!(param.requires_grad(), "the attack left {name} frozen");
        }
    }
}

#[test]
fn ten_adamw_steps_with_the_schedule_match_pytorch_in_all_three_modes() {
    let fx = fixtures();
    let opt = OptimizerConfig {
        learn_rate: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    for mode in ["only_adv", "mixed", "clean"] {
        let model = fx.model();
        let mut optimizer = AdamW::new(model.parameters(), &opt).expect("optimizer");
        let loss = loss_with("default");
        for k in 0..10usize {
            let lr = 1e-3 * lr_multiplier(k, 1, 10, 0.5);
            assert_rel(
                &format!("train.{mode}.lr.{k}"),
                lr,
                scalar(fx.get(&format!("train.{mode}.lr.{k}"))),
                1e-6,
            );
            let pgd = Pgd {
                variant: PgdVariant::Pgd,
                eps: 8.0 / 255.0,
                alpha: 2.0 / 255.0,
                iters: 2,
                loss_type: LossType::P_S_PT,
            };
            let (attack, objective) = match mode {
                "only_adv" => (
                    Some((
                        pgd,
                        fx.get(&format!("train.{mode}.delta0.{k}")).shallow_clone(),
                    )),
                    OuterObjective::OnlyAdv,
                ),
                "mixed" => (
                    Some((
                        pgd,
                        fx.get(&format!("train.{mode}.delta0.{k}")).shallow_clone(),
                    )),
                    OuterObjective::Mixed {
                        weight: 0.66 * (1.0 - 0.5),
                    },
                ),
                _ => (None, OuterObjective::Clean),
            };
            let out = train_step(
                &model,
                &loss,
                &mut optimizer,
                StepInputs {
                    images: fx.get("x"),
                    attack,
                    objective,
                    lr,
                },
            )
            .expect("step");
            assert_rel(
                &format!("train.{mode}.loss.{k}"),
                out.total,
                scalar(fx.get(&format!("train.{mode}.loss.{k}"))),
                1e-5,
            );
        }
        for (name, tensor) in model.state() {
            let expected = fx.get(&format!("train.{mode}.after.{name}"));
            if tensor.kind() == Kind::Int64 {
                assert!(
                    tensor.equal(expected),
                    "train.{mode}.after.{name}: {tensor} vs {expected}"
                );
                continue;
            }
            let err = tensor_rel_err(&tensor, expected);
            assert!(err < 1e-5, "train.{mode}.after.{name}: rel. err. {err:e}");
        }
    }
}

/// The fixture script's closed-form weights (see its docstring): nothing big is stored.
fn closed_form_backbone(backbone: Backbone) -> Encoder {
    let mut model = Encoder::new(backbone, &[], 8, Device::Cpu).expect("model");
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
        let fan_in = if shape.len() >= 2 {
            (numel / shape[0]) as f64
        } else {
            1.0
        };
        let values: Vec<f32> = (0..numel as usize)
            .map(|i| {
                let v = (((i * 7 + k * 13) % 23) as f64 - 11.0) / 11.0;
                let value = if name.ends_with("running_var") {
                    1.0 + 0.25 * (v + 1.0)
                } else if name.ends_with("running_mean") {
                    0.05 * v
                } else if shape.len() >= 2 {
                    v * (2.0 / fan_in).sqrt()
                } else if name.ends_with("weight") {
                    0.3 + 0.05 * v
                } else {
                    0.1 * v
                };
                value as f32
            })
            .collect();
        entries.push((
            name.clone(),
            Tensor::from_slice(&values).reshape(shape.as_slice()),
        ));
    }
    let head: Vec<(String, Tensor)> = model
        .state()
        .into_iter()
        .filter(|(n, _)| n.starts_with("head."))
        .collect();
    entries.extend(head);
    model
        .load_state(&entries, Path::new("closed-form weights"))
        .expect("closed-form weights fit");
    model
}

#[test]
fn backbones_match_torchvision_on_closed_form_weights() {
    let fx = fixtures();
    let input: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37) % 101) as f32 / 100.0)
        .collect();
    let x = Tensor::from_slice(&input).reshape([2, 3, 32, 32]);
    for (backbone, key) in [
        (Backbone::ResNet18, "arch.resnet18.features"),
        (Backbone::WideResNet50_2, "arch.wide_resnet50_2.features"),
    ] {
        let model = closed_form_backbone(backbone);
        let features =
            tch::no_grad(|| model.features(&x, hsat_worker::model::Pass::EVAL)).expect("forward");
        let err = tensor_rel_err(&features, fx.get(key));
        assert!(err < 1e-5, "{key}: rel. err. {err:e}");
    }
}
