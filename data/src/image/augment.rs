//! The random HiDisc / HSAT augmentation pipeline (method.md §6).
//!
//! Each step draws whether it applies and its parameters the way torchvision 0.28's
//! transform class does (`get_params`), from a [`SplitMix64`] stream instead of
//! torch's generator: "applies with probability p" is `unit() < p`,
//! `uniform_(a, b)` is `a + (b - a) * unit()`, `randint(0, n)` is `below(n)` and
//! `randperm` is `shuffle`. The order of the steps and their parameters are those of
//! the reference (`main.yaml`'s list for the plain pipeline, `get_dynamic_augs` for
//! the dynamic one); see README.md for the table.

use hsat_core::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use super::Image;
use super::ops;

/// How views are augmented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Probability of each augmentation step (`rand_aug_prob`, [0.3]); in [0, 1].
    pub rand_aug_prob: f64,
    /// HSAT's dynamic augmentation: magnitudes and some probabilities scale with
    /// `strength`, and random erasing moves before the affine step.
    pub dynamic: bool,
    /// Dynamic augmentation strength in [0, 1] (1 = full); ignored unless `dynamic`.
    pub strength: f64,
    /// Side of the square output view, in pixels (the patch size, 300 for OpenSRH).
    pub out_size: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            rand_aug_prob: 0.3,
            dynamic: false,
            strength: 1.0,
            out_size: 300,
        }
    }
}

/// Every probability and magnitude of one pipeline, resolved from the config.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    p_hflip: f64,
    p_vflip: f64,
    p_noise: f64,
    noise_sigma: (f64, f64),
    p_jitter: f64,
    brightness: Option<(f64, f64)>,
    contrast: Option<(f64, f64)>,
    saturation: Option<(f64, f64)>,
    hue: Option<(f64, f64)>,
    p_autocontrast: f64,
    p_solarize: f64,
    solarize_threshold: f64,
    p_sharpness: f64,
    sharpness: f64,
    p_blur: f64,
    blur_sigma: f64,
    p_affine: f64,
    degrees: f64,
    translate: (f64, f64),
    p_crop: f64,
    crop_scale: (f64, f64),
    crop_ratio: (f64, f64),
    p_erase: f64,
    erase_scale: (f64, f64),
    erase_ratio: (f64, f64),
    erase_before_affine: bool,
}

/// ColorJitter's `_check_input`: `[max(0, 1 - v), 1 + v]` (hue: `[-v, v]`), or no
/// adjustment when the range is just the identity.
fn jitter_range(amount: f64, center: f64, clip_at_zero: bool) -> Option<(f64, f64)> {
    let low = center - amount;
    let low = if clip_at_zero { low.max(0.0) } else { low };
    let high = center + amount;
    (!(low == center && high == center)).then_some((low, high))
}

impl Plan {
    fn new(cfg: &AugmentConfig) -> Self {
        let p = cfg.rand_aug_prob;
        let s = if cfg.dynamic {
            cfg.strength.clamp(0.0, 1.0)
        } else {
            1.0
        };
        // Probabilities scaled by the strength in the dynamic pipeline.
        let ps = if cfg.dynamic { p * s } else { p };
        Self {
            p_hflip: p,
            p_vflip: p,
            p_noise: p,
            noise_sigma: (0.01 * s, 0.1 * s),
            p_jitter: ps,
            brightness: jitter_range(0.4 * s, 1.0, true),
            contrast: jitter_range(0.4 * s, 1.0, true),
            saturation: jitter_range(0.4 * s, 1.0, true),
            hue: jitter_range(0.1 * s, 0.0, false),
            p_autocontrast: p,
            p_solarize: ps,
            solarize_threshold: if cfg.dynamic {
                0.2 + 0.8 * (1.0 - s)
            } else {
                0.2
            },
            p_sharpness: p,
            sharpness: 2.0,
            p_blur: ps,
            blur_sigma: s,
            p_affine: ps,
            degrees: 10.0 * s,
            translate: (0.1 * s, 0.3 * s),
            p_crop: p,
            crop_scale: if cfg.dynamic {
                (1.0 - 0.92 * s, 1.0)
            } else {
                (0.08, 1.0)
            },
            crop_ratio: if cfg.dynamic {
                (0.75, 1.333)
            } else {
                (3.0 / 4.0, 4.0 / 3.0)
            },
            p_erase: ps,
            erase_scale: (0.02 * s, 0.33 * s),
            erase_ratio: (0.3, 3.3),
            erase_before_affine: cfg.dynamic,
        }
    }
}

/// `torch.empty(1).uniform_(low, high)`.
fn uniform(rng: &mut SplitMix64, (low, high): (f64, f64)) -> f64 {
    low + (high - low) * rng.unit()
}

/// `torch.rand(1) < p`.
fn chance(rng: &mut SplitMix64, p: f64) -> bool {
    rng.unit() < p
}

/// `torch.randint(0, n)`, `n >= 1`.
fn randint(rng: &mut SplitMix64, n: usize) -> usize {
    // usize fits in u64 and the draw is below n: both casts are exact.
    rng.below(n.max(1) as u64) as usize
}

/// Python's `round` (half to even) to an integer.
fn round_half_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `RandomResizedCrop.get_params`: `(top, left, height, width)`.
fn resized_crop_box(
    rng: &mut SplitMix64,
    (height, width): (usize, usize),
    scale: (f64, f64),
    ratio: (f64, f64),
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale);
        let aspect = uniform(rng, log_ratio).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let (h, w) = (h as usize, w as usize);
            let top = randint(rng, height - h + 1);
            let left = randint(rng, width - w + 1);
            return (top, left, h, w);
        }
    }
    // Fallback: the central crop with the ratio clamped into range.
    let in_ratio = width as f64 / height as f64;
    let (min_ratio, max_ratio) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (h, w) = if in_ratio < min_ratio {
        let h = round_half_even(width as f64 / min_ratio).max(0) as usize;
        (h.min(height), width)
    } else if in_ratio > max_ratio {
        let w = round_half_even(height as f64 * max_ratio).max(0) as usize;
        (height, w.min(width))
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// `RandomErasing.get_params` with a constant value: `Some((i, j, h, w))`, or `None`
/// when ten attempts found no box smaller than the image (the image is kept).
fn erasing_box(
    rng: &mut SplitMix64,
    (height, width): (usize, usize),
    scale: (f64, f64),
    ratio: (f64, f64),
) -> Option<(usize, usize, usize, usize)> {
    let area = (height * width) as f64;
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let erase_area = area * uniform(rng, scale);
        let aspect = uniform(rng, log_ratio).exp();
        let h = round_half_even((erase_area * aspect).sqrt());
        let w = round_half_even((erase_area / aspect).sqrt());
        if !(h < height as i64 && w < width as i64) {
            continue;
        }
        // Non-negative: both are rounded square roots.
        let (h, w) = (h.max(0) as usize, w.max(0) as usize);
        let i = randint(rng, height - h + 1);
        let j = randint(rng, width - w + 1);
        return Some((i, j, h, w));
    }
    None
}

/// One augmented view of `image` (3 channels, values in [0, 1]), `out_size` square.
///
/// The steps, in order, each applied with its probability (see README.md): flips,
/// gaussian noise, colour jitter (random order of brightness, contrast, saturation,
/// hue), autocontrast, solarize, sharpness, gaussian blur, then affine, resized crop
/// and erasing (dynamic: erasing, affine, resized crop). If the image does not end
/// `out_size` square (no crop applied and a different input size), it is resized.
/// Deterministic: the same `rng` state gives the same view.
pub fn augment(image: &Image, cfg: &AugmentConfig, rng: &mut SplitMix64) -> Image {
    let plan = Plan::new(cfg);
    let mut cur = image.clone();
    // Second buffer for out-of-place ops: they write `spare`, which then becomes `cur`.
    let mut spare = Image::zeros(0, 0, 0);

    if chance(rng, plan.p_hflip) {
        ops::hflip_in_place(&mut cur);
    }
    if chance(rng, plan.p_vflip) {
        ops::vflip_in_place(&mut cur);
    }
    if chance(rng, plan.p_noise) {
        let sigma = uniform(rng, plan.noise_sigma);
        ops::gaussian_noise_in_place(&mut cur, sigma, rng);
    }
    if chance(rng, plan.p_jitter) {
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        let brightness = plan.brightness.map(|r| uniform(rng, r));
        let contrast = plan.contrast.map(|r| uniform(rng, r));
        let saturation = plan.saturation.map(|r| uniform(rng, r));
        let hue = plan.hue.map(|r| uniform(rng, r));
        for step in order {
            match (step, brightness, contrast, saturation, hue) {
                (0, Some(f), _, _, _) => ops::adjust_brightness_in_place(&mut cur, f),
                (1, _, Some(f), _, _) => ops::adjust_contrast_in_place(&mut cur, f),
                (2, _, _, Some(f), _) => ops::adjust_saturation_in_place(&mut cur, f),
                (3, _, _, _, Some(f)) => ops::adjust_hue_in_place(&mut cur, f),
                _ => {}
            }
        }
    }
    if chance(rng, plan.p_autocontrast) {
        ops::autocontrast_in_place(&mut cur);
    }
    if chance(rng, plan.p_solarize) {
        ops::solarize_in_place(&mut cur, plan.solarize_threshold);
    }
    if chance(rng, plan.p_sharpness) {
        ops::adjust_sharpness_into(&cur, plan.sharpness, &mut spare);
        std::mem::swap(&mut cur, &mut spare);
    }
    if chance(rng, plan.p_blur) {
        // GaussianBlur(sigma=(s, s)) draws uniform(s, s) = s; torchvision rejects
        // sigma 0, which only a strength of 0 (probability 0) could ask for.
        let sigma = uniform(rng, (plan.blur_sigma, plan.blur_sigma));
        if sigma > 0.0 {
            ops::gaussian_blur_into(&cur, 5, sigma, &mut spare);
            std::mem::swap(&mut cur, &mut spare);
        }
    }
    if plan.erase_before_affine {
        random_erasing(&mut cur, &plan, rng);
    }
    if chance(rng, plan.p_affine) {
        let angle = uniform(rng, (-plan.degrees, plan.degrees));
        let max_dx = plan.translate.0 * cur.width as f64;
        let max_dy = plan.translate.1 * cur.height as f64;
        let tx = round_half_even(uniform(rng, (-max_dx, max_dx)));
        let ty = round_half_even(uniform(rng, (-max_dy, max_dy)));
        ops::affine_into(&cur, angle, (tx, ty), &mut spare);
        std::mem::swap(&mut cur, &mut spare);
    }
    if chance(rng, plan.p_crop) {
        let crop = resized_crop_box(
            rng,
            (cur.height, cur.width),
            plan.crop_scale,
            plan.crop_ratio,
        );
        ops::resized_crop_into(&cur, crop, cfg.out_size, &mut spare);
        std::mem::swap(&mut cur, &mut spare);
    }
    if !plan.erase_before_affine {
        random_erasing(&mut cur, &plan, rng);
    }
    if cur.height != cfg.out_size || cur.width != cfg.out_size {
        cur = ops::resize_to(&cur, cfg.out_size);
    }
    cur
}

/// `RandomErasing(p, scale, ratio, value=0)`.
fn random_erasing(image: &mut Image, plan: &Plan, rng: &mut SplitMix64) {
    if chance(rng, plan.p_erase)
        && let Some((i, j, h, w)) = erasing_box(
            rng,
            (image.height, image.width),
            plan.erase_scale,
            plan.erase_ratio,
        )
    {
        ops::erase_in_place(image, i, j, h, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(size: usize, seed: u64) -> Image {
        let mut rng = SplitMix64::new(seed);
        let n = 3 * size * size;
        Image::new(3, size, size, (0..n).map(|_| rng.unit() as f32).collect())
    }

    #[test]
    fn augment_is_deterministic_per_seed_and_differs_between_seeds() {
        let image = patch(32, 1);
        let cfg = AugmentConfig {
            rand_aug_prob: 0.5,
            out_size: 32,
            ..AugmentConfig::default()
        };
        let a = augment(&image, &cfg, &mut SplitMix64::new(7));
        let b = augment(&image, &cfg, &mut SplitMix64::new(7));
        assert_eq!(a, b);
        let differing = (8..40)
            .filter(|&seed| augment(&image, &cfg, &mut SplitMix64::new(seed)) != a)
            .count();
        assert!(differing >= 30, "{differing} of 32 seeds differ");
    }

    #[test]
    fn output_has_the_requested_size_and_unit_range() {
        for (dynamic, strength) in [(false, 1.0), (true, 1.0), (true, 0.5), (true, 0.0)] {
            for (size, out_size) in [(40, 40), (40, 24), (24, 40)] {
                let image = patch(size, 3);
                let cfg = AugmentConfig {
                    rand_aug_prob: 0.9,
                    dynamic,
                    strength,
                    out_size,
                };
                for seed in 0..40 {
                    let view = augment(&image, &cfg, &mut SplitMix64::new(seed));
                    assert_eq!(
                        (view.channels, view.height, view.width),
                        (3, out_size, out_size)
                    );
                    assert!(
                        view.data.iter().all(|x| (0.0..=1.0).contains(x)),
                        "values outside [0, 1] with {cfg:?} seed {seed}"
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_images_stay_in_unit_range_with_every_step_applied() {
        let size = 40;
        let checker: Vec<f32> = (0..3 * size * size)
            .map(|i| ((i / size + i % size) % 2) as f32)
            .collect();
        let images = [
            Image::new(3, size, size, vec![1.0; 3 * size * size]),
            Image::zeros(3, size, size),
            Image::new(3, size, size, checker),
        ];
        for (dynamic, strength) in [(false, 1.0), (true, 0.7)] {
            for out_size in [24, 40, 56] {
                let cfg = AugmentConfig {
                    rand_aug_prob: 1.0,
                    dynamic,
                    strength,
                    out_size,
                };
                for image in &images {
                    for seed in 0..30 {
                        let view = augment(image, &cfg, &mut SplitMix64::new(seed));
                        assert_eq!(view.width, out_size);
                        assert!(
                            view.data.iter().all(|x| (0.0..=1.0).contains(x)),
                            "{cfg:?} seed {seed}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn probability_zero_only_resizes() {
        let image = patch(20, 4);
        let cfg = AugmentConfig {
            rand_aug_prob: 0.0,
            out_size: 20,
            ..AugmentConfig::default()
        };
        assert_eq!(augment(&image, &cfg, &mut SplitMix64::new(1)), image);
        let smaller = AugmentConfig {
            out_size: 10,
            ..cfg
        };
        assert_eq!(
            augment(&image, &smaller, &mut SplitMix64::new(1)),
            ops::resize_to(&image, 10)
        );
    }

    #[test]
    fn dynamic_plan_scales_with_strength() {
        let cfg = AugmentConfig {
            rand_aug_prob: 0.3,
            dynamic: true,
            strength: 0.5,
            out_size: 300,
        };
        let plan = Plan::new(&cfg);
        assert_eq!(plan.p_hflip, 0.3);
        assert_eq!(plan.p_noise, 0.3);
        assert_eq!(plan.p_jitter, 0.15);
        assert_eq!(plan.p_autocontrast, 0.3);
        assert_eq!(plan.p_solarize, 0.15);
        assert_eq!(plan.solarize_threshold, 0.2 + 0.8 * 0.5);
        assert_eq!(plan.p_sharpness, 0.3);
        assert_eq!(plan.p_blur, 0.15);
        assert_eq!(plan.blur_sigma, 0.5);
        assert_eq!(plan.p_erase, 0.15);
        assert_eq!(plan.erase_scale, (0.01, 0.165));
        assert_eq!(plan.p_affine, 0.15);
        assert_eq!(plan.degrees, 5.0);
        assert_eq!(plan.p_crop, 0.3);
        assert_eq!(plan.crop_scale, (1.0 - 0.46, 1.0));
        assert_eq!(plan.brightness, Some((0.8, 1.2)));
        assert_eq!(plan.hue, Some((-0.05, 0.05)));
        assert!(plan.erase_before_affine);
        let none = Plan::new(&AugmentConfig {
            strength: 0.0,
            ..cfg
        });
        assert_eq!(none.brightness, None);
        assert_eq!(none.hue, None);
        assert_eq!(none.p_jitter, 0.0);
        // The plain pipeline ignores the strength.
        let plain = Plan::new(&AugmentConfig {
            dynamic: false,
            strength: 0.2,
            ..cfg
        });
        assert_eq!(plain.p_jitter, 0.3);
        assert_eq!(plain.degrees, 10.0);
        assert_eq!(plain.crop_scale, (0.08, 1.0));
        assert!(!plain.erase_before_affine);
    }

    #[test]
    fn crop_and_erasing_boxes_follow_torchvision() {
        let mut rng = SplitMix64::new(5);
        for _ in 0..2000 {
            let (top, left, h, w) =
                resized_crop_box(&mut rng, (40, 48), (0.08, 1.0), (0.75, 4.0 / 3.0));
            assert!(h > 0 && w > 0 && top + h <= 40 && left + w <= 48);
            if let Some((i, j, h, w)) = erasing_box(&mut rng, (40, 48), (0.02, 0.33), (0.3, 3.3)) {
                assert!(h < 40 && w < 48 && i + h <= 40 && j + w <= 48);
            }
        }
        // An impossible scale falls back to the central crop with the ratio clamped.
        let tall = resized_crop_box(&mut rng, (100, 10), (5.0, 6.0), (0.75, 4.0 / 3.0));
        assert_eq!(tall, (43, 0, 13, 10));
        let square = resized_crop_box(&mut rng, (10, 10), (5.0, 6.0), (0.75, 4.0 / 3.0));
        assert_eq!(square, (0, 0, 10, 10));
        assert_eq!(
            erasing_box(&mut rng, (10, 10), (5.0, 6.0), (0.3, 3.3)),
            None
        );
    }
}
