//! Seeded randomness shared by every machine of a job.
//!
//! A job has one seed (`infra.seed`). Every random draw (which patients form a step,
//! which slides and patches they contribute, how each view is augmented, where the
//! attack starts) uses its own stream, seeded by [`derive_seed`] from the job seed and
//! the draw's coordinates (epoch, step, patient, slide, patch, view). So the same draw
//! gives the same numbers whichever worker makes it, in whatever order, and no draw
//! depends on how many others were made before it.
//!
//! The generator is splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom
//! number generators", OOPSLA 2014): one `u64` of state, statistically good enough
//! for sampling and augmentation, and trivial to reproduce in any language.

/// Added to the state at every step of splitmix64 (2^64 / golden ratio, odd).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// An odd multiplier that spreads path elements before they are mixed in.
const PATH_MULTIPLIER: u64 = 0xd1b5_4a32_d192_ed03;

/// The splitmix64 output function: a bijection of `u64` that mixes every input bit
/// into every output bit.
fn mix64(value: u64) -> u64 {
    let mut z = value;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 stream.
///
/// Streams are cheap (one `u64`): make one per draw from a [`derive_seed`] seed
/// rather than sharing one across draws, so draws stay independent of each other's
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream starting at `seed`; every seed, 0 included, is fine.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)`: the top 53 bits of [`next_u64`](Self::next_u64) over 2^53,
    /// so every value is an exact multiple of 2^-53.
    pub fn unit(&mut self) -> f64 {
        // Both conversions are exact: the numerator has 53 bits.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`, without modulo bias: draws in the lowest `2^64 mod n`
    /// values are rejected, so the accepted range is a whole multiple of `n`.
    ///
    /// `n` must be > 0; `below(0)` returns 0 (and fails a debug assertion).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "below(0) has no value to return");
        if n == 0 {
            return 0;
        }
        // 2^64 mod n, computed in u64 as (2^64 - n) mod n.
        let rejected = n.wrapping_neg() % n;
        loop {
            let draw = self.next_u64();
            if draw >= rejected {
                return draw % n;
            }
        }
    }

    /// Shuffles `items` in place (Fisher-Yates, from the last position down to the
    /// second: position `i` swaps with a uniform position in `0..=i`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // i + 1 <= items.len() fits in u64, and the draw is <= i: both casts are exact.
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A standard normal draw (Box-Muller; one draw per call, the second value of the
    /// pair is not kept, so the stream has no hidden state beyond its `u64`).
    pub fn normal(&mut self) -> f64 {
        // 1 - unit is in (0, 1]: the logarithm is finite.
        let radius = (-2.0 * (1.0 - self.unit()).ln()).sqrt();
        let angle = std::f64::consts::TAU * self.unit();
        radius * angle.cos()
    }
}

/// The seed of the draw at `path` (e.g. `[TAG, step, slot, patient]`) in the job of
/// seed `seed`.
///
/// Same inputs give the same seed. Changing any single element of `path`, or `seed`,
/// always changes the result: each element goes through a bijection of the running
/// value, and so does the running value through each later step. The length is mixed
/// in last, so paths of different lengths collide no more often than random seeds.
/// Start paths with a constant tag per kind of draw so that, say, a slide draw and a
/// patch draw never share a stream.
pub fn derive_seed(seed: u64, path: &[u64]) -> u64 {
    let mut acc = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    for &element in path {
        // For a fixed `acc` this is a bijection of `element` (odd multiplier), and for
        // a fixed `element` a bijection of `acc`.
        acc = mix64(
            acc.wrapping_add(GOLDEN_GAMMA)
                .wrapping_add(element.wrapping_mul(PATH_MULTIPLIER)),
        );
    }
    mix64(acc ^ (path.len() as u64).wrapping_mul(GOLDEN_GAMMA))
}

/// A stable 64-bit id of `text` (FNV-1a over its UTF-8 bytes), for putting patient,
/// slide or class ids into a [`derive_seed`] path. Stable across runs, machines and
/// versions, unlike `std`'s hashers.
pub fn stable_id(text: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splitmix64_matches_the_reference_outputs() {
        // From the reference C implementation (Vigna, prng.di.unimi.it/splitmix64.c)
        // seeded with 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        let expected: [u64; 5] = [
            6_457_827_717_110_365_317,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(stable_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_id("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_id("foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(stable_id("NIO_001"), stable_id("NIO_002"));
    }

    #[test]
    fn unit_is_in_the_half_open_interval_with_mean_one_half() {
        let mut rng = SplitMix64::new(7);
        let draws: Vec<f64> = (0..20_000).map(|_| rng.unit()).collect();
        assert!(draws.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn below_is_uniform_and_in_range() {
        let mut rng = SplitMix64::new(11);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[rng.below(7) as usize] += 1;
        }
        // Each count is Binomial(70000, 1/7): mean 10000, sd about 90.
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(rng.below(1), 0);
        // A bound just above 2^63 rejects almost half of all draws; still in range.
        let big = (1u64 << 63) + 1;
        assert!((0..100).all(|_| rng.below(big) < big));
        assert!((0..100).all(|_| rng.below(u64::MAX) < u64::MAX));
    }

    #[test]
    fn shuffle_reaches_every_permutation_evenly() {
        let mut rng = SplitMix64::new(3);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..60_000 {
            let mut items = [0, 1, 2];
            rng.shuffle(&mut items);
            *counts.entry(items).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(
            counts.values().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        let mut empty: [u8; 0] = [];
        rng.shuffle(&mut empty);
        let mut one = [5];
        rng.shuffle(&mut one);
        assert_eq!(one, [5]);
    }

    #[test]
    fn normal_has_mean_zero_and_unit_variance() {
        let mut rng = SplitMix64::new(5);
        let draws: Vec<f64> = (0..50_000).map(|_| rng.normal()).collect();
        assert!(draws.iter().all(|x| x.is_finite()));
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let variance = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((variance - 1.0).abs() < 0.03, "{variance}");
    }

    #[test]
    fn derive_seed_tells_paths_apart() {
        assert_eq!(derive_seed(1, &[2, 3]), derive_seed(1, &[2, 3]));
        assert_ne!(derive_seed(1, &[]), derive_seed(1, &[0]));
        assert_ne!(derive_seed(1, &[0]), derive_seed(1, &[0, 0]));
        assert_ne!(derive_seed(1, &[2, 3]), derive_seed(1, &[3, 2]));
        assert_ne!(derive_seed(0, &[]), derive_seed(1, &[]));
    }

    proptest! {
        #[test]
        fn derive_seed_changes_with_any_single_element(
            seed in any::<u64>(),
            path in proptest::collection::vec(any::<u64>(), 1..6),
            position in any::<proptest::sample::Index>(),
            replacement in any::<u64>(),
        ) {
            let position = position.index(path.len());
            prop_assume!(path[position] != replacement);
            let mut changed = path.clone();
            changed[position] = replacement;
            prop_assert_ne!(derive_seed(seed, &path), derive_seed(seed, &changed));
        }

        #[test]
        fn derive_seed_changes_with_the_seed(
            seed in any::<u64>(),
            other in any::<u64>(),
            path in proptest::collection::vec(any::<u64>(), 0..6),
        ) {
            prop_assume!(seed != other);
            prop_assert_ne!(derive_seed(seed, &path), derive_seed(other, &path));
        }

        #[test]
        fn shuffle_is_a_permutation(seed in any::<u64>(), len in 0usize..40) {
            let mut items: Vec<usize> = (0..len).collect();
            SplitMix64::new(seed).shuffle(&mut items);
            items.sort_unstable();
            prop_assert_eq!(items, (0..len).collect::<Vec<_>>());
        }
    }
}
