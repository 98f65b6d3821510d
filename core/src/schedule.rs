//! Training schedules as pure functions of the step or epoch.
//!
//! Each one reproduces the reference implementation's arithmetic in `f64`, operation
//! for operation, so a run here and a run of the reference agree on every value:
//! the learning-rate multiplier of PyTorch's `LambdaLR` with the `cos_warmup` lambda,
//! the attack budget warm-up built with `np.linspace`, and the dynamic augmentation
//! strength with the clean/adversarial weight derived from it.

use std::f64::consts::PI;

/// LR multiplier of the reference's `LambdaLR` `cos_warmup`: step `k` (0-based, the
/// k-th optimizer step) uses `base_lr * lr_multiplier(k, ...)`.
///
/// For `k < warmup_steps`: `k / max(1, warmup_steps)`. Afterwards
/// `progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)` and the value is
/// `max(0, 0.5 * (1 + cos(pi * num_cycles * 2 * progress)))`: half a cosine from 1 to
/// 0 over the remaining steps when `num_cycles = 0.5`.
pub fn lr_multiplier(step: usize, warmup_steps: usize, total_steps: usize, num_cycles: f64) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps.max(1) as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = (step - warmup_steps) as f64 / decay_steps as f64;
    (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
}

/// Attack budget in pixel units for `epoch` (0-based).
///
/// The reference uses `np.linspace(1, eps_255, warmup_epochs)[epoch]` while
/// `epoch < warmup_epochs`, then `eps_255` (a warm-up longer than the run is allowed:
/// the run then ends before eps reaches `eps_255`); the result is divided by 255. numpy's
/// linspace is replicated exactly: `step = (stop - start) / (num - 1)`, value
/// `i * step + start`, the last value exactly `stop`, and `start` alone when
/// `num == 1`.
pub fn attack_eps(epoch: usize, eps_255: f64, warmup_epochs: usize) -> f64 {
    let eps = if epoch < warmup_epochs {
        linspace_at(1.0, eps_255, warmup_epochs, epoch)
    } else {
        eps_255
    };
    eps / 255.0
}

/// `np.linspace(start, stop, num)[index]` for `index < num`.
fn linspace_at(start: f64, stop: f64, num: usize, index: usize) -> f64 {
    debug_assert!(index < num, "index {index} outside linspace of {num}");
    if num <= 1 {
        return start;
    }
    if index == num - 1 {
        return stop; // numpy sets the endpoint exactly
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    if step == 0.0 {
        // numpy's branch for a zero step: (i / div) * delta
        (index as f64 / div) * delta + start
    } else {
        index as f64 * step + start
    }
}

/// Dynamic augmentation strength of `epoch`: `1 - floor(epoch / 50) * 50 / num_epochs`,
/// clamped at 0. It starts at 1 and drops every 50 epochs. `num_epochs = 0` is taken
/// as 1 (a validated config always has at least one epoch).
pub fn dynamic_strength(epoch: usize, num_epochs: usize) -> f64 {
    let completed = (epoch / 50) * 50;
    (1.0 - completed as f64 / num_epochs.max(1) as f64).max(0.0)
}

/// The dynamic clean/adversarial weight `w = lambda * (1 - strength)` when dynamic
/// augmentation is on, else 0. The outer loss is
/// `((1 - w) * L(clean) + (1 + w) * L(adv)) / 2`.
pub fn dynamic_weight(lambda: f64, strength: f64, dynamic_aug: bool) -> f64 {
    if dynamic_aug {
        lambda * (1.0 - strength)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn lr_warm_up_is_linear_from_zero() {
        assert_eq!(lr_multiplier(0, 1, 10, 0.5), 0.0);
        assert_eq!(lr_multiplier(1, 1, 10, 0.5), 1.0);
        assert_eq!(lr_multiplier(0, 4, 20, 0.5), 0.0);
        assert_eq!(lr_multiplier(1, 4, 20, 0.5), 0.25);
        assert_eq!(lr_multiplier(3, 4, 20, 0.5), 0.75);
        assert_eq!(lr_multiplier(4, 4, 20, 0.5), 1.0);
    }

    #[test]
    fn lr_decays_as_half_a_cosine() {
        // No warm-up, 10 steps: progress k/10.
        assert_eq!(lr_multiplier(0, 0, 10, 0.5), 1.0);
        assert!(close(lr_multiplier(5, 0, 10, 0.5), 0.5));
        // progress 0.25: 0.5 * (1 + cos(pi/4)) = 0.853553390593...
        assert!(close(
            lr_multiplier(3, 1, 9, 0.5),
            0.5 * (1.0 + (PI / 4.0).cos())
        ));
        assert!(close(lr_multiplier(3, 1, 9, 0.5), 0.853_553_390_593_273_8));
        // The last step approaches 0, and beyond the end it never goes negative.
        assert!(close(lr_multiplier(10, 0, 10, 0.5), 0.0));
        // One full cycle: at progress 0.5 the cosine is at its minimum, at 1 back to 1.
        assert!(close(lr_multiplier(5, 0, 10, 1.0), 0.0));
        assert!(close(lr_multiplier(10, 0, 10, 1.0), 1.0));
        // num_cycles 0.75, progress 1: 0.5 * (1 + cos(1.5 pi)) = 0.5, then it rises.
        assert!(close(lr_multiplier(10, 0, 10, 0.75), 0.5));
    }

    #[test]
    fn lr_survives_degenerate_lengths() {
        // Warm-up longer than the run: the reference's max(1, negative) = 1.
        assert_eq!(lr_multiplier(3, 5, 4, 0.5), 0.6);
        assert_eq!(lr_multiplier(5, 5, 4, 0.5), 1.0);
        assert!(close(lr_multiplier(6, 5, 4, 0.5), 0.0));
        assert_eq!(lr_multiplier(0, 0, 0, 0.5), 1.0);
    }

    #[test]
    fn eps_warm_up_follows_numpy_linspace() {
        let values: Vec<f64> = (0..7)
            .map(|epoch| attack_eps(epoch, 8.0, 5) * 255.0)
            .collect();
        let expected = [1.0, 2.75, 4.5, 6.25, 8.0, 8.0, 8.0];
        for (value, expected) in values.iter().zip(expected) {
            assert!(close(*value, expected), "{values:?}");
        }
        // Exact f64 values, as numpy computes them: i * 1.75 + 1, then / 255.
        assert_eq!(attack_eps(1, 8.0, 5), 2.75 / 255.0);
        assert_eq!(attack_eps(4, 8.0, 5), 8.0 / 255.0);
        // linspace(1, 8, 3) = [1, 4.5, 8]; (1, 4, 4) = [1, 2, 3, 4].
        assert_eq!(attack_eps(1, 8.0, 3), 4.5 / 255.0);
        assert_eq!(attack_eps(2, 4.0, 4), 3.0 / 255.0);
    }

    #[test]
    fn eps_warm_up_edge_cases() {
        // No warm-up: the full budget from epoch 0.
        assert_eq!(attack_eps(0, 8.0, 0), 8.0 / 255.0);
        // One warm-up epoch: linspace(1, 8, 1) = [1].
        assert_eq!(attack_eps(0, 8.0, 1), 1.0 / 255.0);
        assert_eq!(attack_eps(1, 8.0, 1), 8.0 / 255.0);
        // A budget of 1: every warm-up value is 1 (numpy's zero-step branch).
        assert_eq!(attack_eps(2, 1.0, 4), 1.0 / 255.0);
        // linspace with a step that does not divide evenly: 1 + 1 * (16/3).
        assert_eq!(linspace_at(1.0, 17.0, 4, 1), 1.0 * (16.0 / 3.0) + 1.0);
    }

    #[test]
    fn eps_warm_up_longer_than_the_run_never_reaches_eps() {
        // The reference: eps = [8] * 3; eps[:5000] = np.linspace(1, 8, 5000) makes the
        // list 5000 long, and the 3 epochs take its first 3 values (numpy's reprs:
        // 1.0, 1.0014002800560111, 1.0028005601120225).
        let expected = [1.0, 1.001_400_280_056_011_1, 1.002_800_560_112_022_5];
        for (epoch, value) in expected.into_iter().enumerate() {
            assert_eq!(attack_eps(epoch, 8.0, 5000), value / 255.0, "epoch {epoch}");
        }
        // Still rising at the last epoch of the run, far from 8/255.
        assert!(attack_eps(2, 8.0, 5000) < attack_eps(3, 8.0, 5000));
        assert!(attack_eps(2, 8.0, 5000) < 1.01 / 255.0);
    }

    #[test]
    fn dynamic_strength_drops_every_fifty_epochs() {
        assert_eq!(dynamic_strength(0, 40000), 1.0);
        assert_eq!(dynamic_strength(49, 40000), 1.0);
        assert_eq!(dynamic_strength(50, 40000), 1.0 - 50.0 / 40000.0);
        assert_eq!(dynamic_strength(50, 40000), 0.99875);
        assert_eq!(dynamic_strength(100, 200), 0.5);
        assert_eq!(dynamic_strength(199, 200), 0.25);
        assert_eq!(dynamic_strength(200, 200), 0.0);
        // Past the end (more epochs than planned) it stays at 0.
        assert_eq!(dynamic_strength(500, 100), 0.0);
        assert_eq!(dynamic_strength(2, 3), 1.0);
        assert_eq!(dynamic_strength(10, 0), 1.0);
    }

    #[test]
    fn dynamic_weight_is_zero_without_dynamic_augmentation() {
        assert_eq!(dynamic_weight(0.66, 0.5, false), 0.0);
        assert_eq!(dynamic_weight(0.66, 1.0, true), 0.0);
        assert!(close(dynamic_weight(0.66, 0.5, true), 0.33));
        assert!(close(dynamic_weight(0.66, 0.0, true), 0.66));
    }
}
