//! Parity of the evaluation attacks (PGD, BIM, MI-FGSM, FGSM on `-cosine`, method.md
//! §7.5) with PyTorch: the same tiny model, images and random start give the same
//! adversarial images, on the backbone features and on the projection. Also checks
//! that `random_start` draws the start the Python script draws from the same seed.
//!
//! The fixtures come from `scripts/fixtures/attack_fixtures.py`; regenerate them with
//!
//! ```text
//! bash scripts/setup.sh
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/attack_fixtures.py
//! ```
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hsat_core::config::{Backbone, EvalAttack, EvalTarget};
use hsat_worker::eval::FeatureAttack;
use hsat_worker::eval::attack::random_start;
use hsat_worker::model::Encoder;
use tch::{Device, Kind, Tensor};

/// Output tolerance: both sides run the same libtorch kernels in f32; differences come
/// only from summation order.
const TOLERANCE: f64 = 1e-6;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attacks.safetensors")
}

fn fixtures() -> HashMap<String, Tensor> {
    let path = fixture_path();
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/fixtures/attack_fixtures.py",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn model(fx: &HashMap<String, Tensor>) -> Encoder {
    let mut model = Encoder::new(Backbone::SmallCnn, &[], 8, Device::Cpu).unwrap();
    let entries: Vec<(String, Tensor)> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("model.")
                .map(|rest| (rest.to_owned(), v.shallow_clone()))
        })
        .collect();
    model.load_state(&entries, &fixture_path()).unwrap();
    model
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.f_sub(b)
        .unwrap()
        .abs()
        .max()
        .to_kind(Kind::Double)
        .double_value(&[])
}

#[test]
fn attacks_match_pytorch_from_the_same_start() {
    tch::set_num_threads(1);
    let fx = fixtures();
    let model = model(&fx);
    let images = &fx["x"];
    let eps = 8.0 / 255.0;
    for (kind, name) in [
        (EvalAttack::Pgd, "pgd"),
        (EvalAttack::Bim, "bim"),
        (EvalAttack::MiFgsm, "mifgsm"),
        (EvalAttack::Fgsm, "fgsm"),
    ] {
        for (target, target_name) in [
            (EvalTarget::Backbone, "backbone"),
            (EvalTarget::Projection, "projection"),
        ] {
            let case = format!("{name}.{target_name}");
            let seed = fx[&format!("seed.{case}")].int64_value(&[0]) as u64;
            let start = &fx[&format!("start.{case}")];
            let drawn = random_start(start.numel(), eps, seed);
            assert_eq!(
                drawn,
                Vec::<f32>::try_from(&start.flatten(0, -1)).unwrap(),
                "{case}: random_start differs from the Python splitmix64 draw"
            );
            let attack = FeatureAttack {
                kind,
                eps,
                alpha: if kind == EvalAttack::Fgsm { 10.0 } else { 2.0 } / 255.0,
                steps: 5,
                decay: 1.0,
                target,
            };
            let adv = attack.run(&model, images, start).unwrap();
            let expected = &fx[&format!("adv.{case}")];
            let diff = max_abs_diff(&adv, expected);
            assert!(diff <= TOLERANCE, "{case}: max |rust - torch| = {diff:e}");
            // The attack moved the images, stayed in the eps ball and in [0, 1].
            assert!(
                max_abs_diff(&adv, images) > 0.5 * eps,
                "{case}: no perturbation"
            );
            assert!(
                max_abs_diff(&adv, images) <= eps + 1e-6,
                "{case}: left the eps ball"
            );
            assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
        }
    }
    // Parameter gradients are back on after the attacks.
    assert!(
        model
            .parameters()
            .iter()
            .all(|(_, tensor)| tensor.requires_grad())
    );
}

#[test]
fn random_starts_fill_the_eps_ball_and_differ_by_seed() {
    let eps = 4.0 / 255.0;
    let a = random_start(3 * 8 * 8, eps, 1);
    let b = random_start(3 * 8 * 8, eps, 2);
    assert_ne!(a, b);
    assert!(a.iter().all(|v| v.abs() <= eps as f32));
    let (lo, hi) = a
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(lo < -0.8 * eps as f32 && hi > 0.8 * eps as f32, "{lo} {hi}");
}
