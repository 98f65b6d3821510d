//! Parity of the evaluation attacks (PGD, BIM, MI-FGSM, FGSM and APGD on `-cosine`,
//! method.md §7.5) with PyTorch: the same tiny model, images and random start give the
//! same adversarial images, on the backbone features and on the projection. Also
//! checks that `random_start` draws the start the Python script draws from the same
//! seed, and for APGD that the objective at the returned images and every step-size
//! halving agree.
//!
//! The fixtures come from `scripts/fixtures/attack_fixtures.py` and
//! `scripts/fixtures/apgd_fixtures.py` (which reuses the first one's model and
//! images); regenerate them with
//!
//! ```text
//! bash scripts/setup.sh
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/attack_fixtures.py
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/apgd_fixtures.py
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
    read_fixtures(&fixture_path())
}

fn read_fixtures(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/fixtures/attack_fixtures.py and apgd_fixtures.py",
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
                restarts: 1,
                target,
            };
            let adv = attack
                .run(&model, images, std::slice::from_ref(start))
                .unwrap();
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
fn apgd_matches_pytorch_from_the_same_starts() {
    tch::set_num_threads(1);
    let fx = fixtures();
    let model = model(&fx);
    let images = &fx["x"];
    let apgd = read_fixtures(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apgd.safetensors"),
    );
    let steps = apgd["steps"].int64_value(&[0]) as usize;
    let restarts = apgd["restarts"].int64_value(&[0]) as usize;
    assert!(
        steps >= 10 && restarts >= 2,
        "the fixture exercises the schedule and restarts"
    );
    let mut halved_somewhere = false;
    for (target, target_name, eps_255) in [
        (EvalTarget::Backbone, "backbone", 8.0),
        (EvalTarget::Projection, "projection", 8.0),
        (EvalTarget::Backbone, "backbone", 4.0),
    ] {
        let case = format!("{target_name}.eps{eps_255}");
        let eps = eps_255 / 255.0;
        let starts: Vec<Tensor> = (0..restarts)
            .map(|r| {
                let start = &apgd[&format!("start.{case}.{r}")];
                let seed = apgd[&format!("seed.{case}.{r}")].int64_value(&[0]) as u64;
                assert_eq!(
                    random_start(start.numel(), eps, seed),
                    Vec::<f32>::try_from(&start.flatten(0, -1)).unwrap(),
                    "{case}: restart {r}'s start differs from the Python draw"
                );
                start.shallow_clone()
            })
            .collect();
        let attack = FeatureAttack {
            kind: EvalAttack::Apgd,
            eps,
            alpha: 2.0 / 255.0, // unused: APGD starts at 2 eps
            steps,
            decay: 1.0,
            restarts,
            target,
        };
        let outcome = attack.apgd(&model, images, &starts).unwrap();
        let diff = max_abs_diff(&outcome.images, &apgd[&format!("adv.{case}")]);
        assert!(
            diff <= TOLERANCE,
            "{case}: images, max |rust - torch| = {diff:e}"
        );
        let expected = Vec::<f32>::try_from(&apgd[&format!("objective.{case}")]).unwrap();
        for (got, want) in outcome.objective.iter().zip(&expected) {
            assert!(
                (got - want).abs() as f64 <= TOLERANCE,
                "{case}: objective {:?} vs torch {expected:?}",
                outcome.objective
            );
        }
        let halvings = &apgd[&format!("halvings.{case}")];
        let expected: Vec<Vec<u32>> = (0..restarts as i64)
            .map(|r| {
                Vec::<i64>::try_from(&halvings.get(r))
                    .unwrap()
                    .into_iter()
                    .map(|h| h as u32)
                    .collect()
            })
            .collect();
        assert_eq!(outcome.halvings, expected, "{case}: step-size halvings");
        halved_somewhere |= expected.iter().flatten().any(|&h| h > 0);
        // `run` returns the same images, inside the ball and in [0, 1].
        let adv = attack.run(&model, images, &starts).unwrap();
        assert_eq!(
            max_abs_diff(&adv, &outcome.images),
            0.0,
            "{case}: run vs apgd"
        );
        assert!(
            max_abs_diff(&adv, images) <= eps + 1e-6,
            "{case}: left the eps ball"
        );
        assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
        // The wrong number of starts is refused, not silently ignored.
        assert!(attack.run(&model, images, &starts[..1]).is_err());
    }
    assert!(halved_somewhere, "the fixture never exercised a halving");
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
