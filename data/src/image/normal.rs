//! Fast standard normal draws for the noise augmentation: the ziggurat method
//! (Marsaglia and Tsang, "The Ziggurat Method for Generating Random Variables", 2000)
//! with 256 layers, fed by a [`SplitMix64`] stream.
//!
//! A 300x300x3 noise field is 270,000 draws; Box-Muller (`SplitMix64::normal`) costs
//! a logarithm, a square root and a cosine per draw, the ziggurat one table look-up and
//! one comparison for 98.5% of them. Each 64-bit output gives two 32-bit draws: 8 bits
//! pick the layer, 1 bit the sign and 23 bits the position in the layer (as many as an
//! f32 mantissa holds). After a rejection the retry uses the low half of a fresh
//! 64-bit output and keeps the first draw's sign: the sign is independent of the
//! magnitude either way.

use std::sync::OnceLock;

use hsat_core::rng::SplitMix64;

/// Number of layers (including the base strip with the tail).
const LAYERS: usize = 256;
/// Where the tail starts, for 256 layers.
const TAIL_START: f64 = 3.654_152_885_361_009;
/// Area of every layer under the unnormalised density `exp(-x^2 / 2)`.
const LAYER_AREA: f64 = 4.928_673_233_99e-3;
/// 2^23: the resolution of the position inside a layer.
const POSITION_SCALE: f64 = 8_388_608.0;
/// Bits of a 32-bit draw that pick the layer, and the sign bit above them.
const LAYER_MASK: u32 = 0xff;
const SIGN_BIT: u32 = 0x100;
const POSITION_SHIFT: u32 = 9;

fn density(x: f64) -> f64 {
    (-0.5 * x * x).exp()
}

/// Precomputed layer geometry.
struct Tables {
    /// A 23-bit position below `accept[i]` lies under the curve in every layer above:
    /// `floor(edge[i + 1] / edge[i] * 2^23)`.
    accept: [u32; LAYERS],
    /// `edge[i] / 2^23`: position to x.
    scale: [f32; LAYERS],
    /// `density(edge[i])`, with `density(edge[LAYERS]) = 1`.
    height: [f64; LAYERS + 1],
}

/// Layer right edges: `edge[0]` is the base strip's virtual width (area / density at the
/// tail start), `edge[1]` the tail start, then each layer has area `LAYER_AREA`, up to
/// `edge[LAYERS] = 0` at the peak.
fn edges() -> [f64; LAYERS + 1] {
    let mut edge = [0.0; LAYERS + 1];
    edge[0] = LAYER_AREA / density(TAIL_START);
    edge[1] = TAIL_START;
    for i in 1..LAYERS - 1 {
        edge[i + 1] = (-2.0 * (density(edge[i]) + LAYER_AREA / edge[i]).ln()).sqrt();
    }
    edge[LAYERS] = 0.0;
    edge
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let edge = edges();
        let mut tables = Tables {
            accept: [0; LAYERS],
            scale: [0.0; LAYERS],
            height: [0.0; LAYERS + 1],
        };
        for i in 0..LAYERS {
            // In [0, 2^23): fits u32.
            tables.accept[i] = (edge[i + 1] / edge[i] * POSITION_SCALE).floor() as u32;
            tables.scale[i] = (edge[i] / POSITION_SCALE) as f32;
        }
        for (height, &x) in tables.height.iter_mut().zip(&edge) {
            *height = density(x);
        }
        tables
    })
}

/// Fills `out` with independent standard normal draws.
pub(crate) fn fill_standard_normal(rng: &mut SplitMix64, out: &mut [f32]) {
    let tables = tables();
    let mut pairs = out.chunks_exact_mut(2);
    for pair in &mut pairs {
        let bits = rng.next_u64();
        pair[0] = sample(tables, bits as u32, rng);
        pair[1] = sample(tables, (bits >> 32) as u32, rng);
    }
    for last in pairs.into_remainder() {
        *last = sample(tables, rng.next_u64() as u32, rng);
    }
}

/// One draw from 32 random bits: 8 pick the layer, 1 the sign, 23 the position.
/// The fast path (98.5% of draws) is a table look-up, a compare and a multiply.
#[inline(always)]
fn sample(tables: &Tables, draw: u32, rng: &mut SplitMix64) -> f32 {
    let layer = (draw & LAYER_MASK) as usize;
    let sign = (draw & SIGN_BIT) << (31 - 8);
    let position = draw >> POSITION_SHIFT;
    if position < tables.accept[layer] {
        let x = position as f32 * tables.scale[layer];
        return f32::from_bits(x.to_bits() | sign);
    }
    let x = sample_slow(tables, layer, position, rng);
    f32::from_bits(x.to_bits() | sign)
}

/// The rare draws outside the layer's inner rectangle: the wedge test, the tail, or a
/// fresh draw after a rejection. Returns a non-negative value.
#[cold]
fn sample_slow(tables: &Tables, mut layer: usize, mut position: u32, rng: &mut SplitMix64) -> f32 {
    loop {
        let x = position as f32 * tables.scale[layer];
        if position < tables.accept[layer] {
            return x;
        }
        if layer == 0 {
            return tail(rng) as f32;
        }
        // Between the layer's rectangle and the curve: accept under the curve.
        let low = tables.height[layer];
        let high = tables.height[layer + 1];
        let y = low + rng.unit() * (high - low);
        if y < density(f64::from(x)) {
            return x;
        }
        let draw = rng.next_u64() as u32;
        layer = (draw & LAYER_MASK) as usize;
        position = draw >> POSITION_SHIFT;
    }
}

/// A draw from the normal tail beyond `TAIL_START` (Marsaglia 1964).
fn tail(rng: &mut SplitMix64) -> f64 {
    loop {
        // 1 - unit is in (0, 1]: both logarithms are finite.
        let x = -(1.0 - rng.unit()).ln() / TAIL_START;
        let y = -(1.0 - rng.unit()).ln();
        if 2.0 * y > x * x {
            return TAIL_START + x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_close_at_the_peak() {
        let edge = edges();
        // The last computed layer must reach density 1 with the same area.
        let top = density(edge[LAYERS - 1]) + LAYER_AREA / edge[LAYERS - 1];
        assert!((top - 1.0).abs() < 1e-9, "{top}");
        assert!(edge.windows(2).skip(1).all(|w| w[0] > w[1]));
    }

    #[test]
    fn draws_have_normal_moments_and_tails() {
        let mut rng = SplitMix64::new(42);
        let mut out = vec![0.0f32; 1_000_000];
        fill_standard_normal(&mut rng, &mut out);
        let n = out.len() as f64;
        let mean = out.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = out
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let kurtosis = out
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(4))
            .sum::<f64>()
            / n
            / (var * var);
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.005, "variance {var}");
        assert!((kurtosis - 3.0).abs() < 0.03, "kurtosis {kurtosis}");
        // P(|X| > 2) = 0.0455, P(|X| > 3) = 2.70e-3, P(|X| > 3.6542) = 2.58e-4 (the
        // tail).
        let beyond = |t: f32| out.iter().filter(|x| x.abs() > t).count() as f64 / n;
        assert!((beyond(2.0) - 0.0455).abs() < 0.001, "{}", beyond(2.0));
        assert!((beyond(3.0) - 2.70e-3).abs() < 2e-4, "{}", beyond(3.0));
        let tail = beyond(3.654_15);
        assert!((tail - 2.58e-4).abs() < 6e-5, "{tail}");
        assert!((beyond(1.0) - 0.3173).abs() < 0.002, "{}", beyond(1.0));
        let positive = out.iter().filter(|&&x| x > 0.0).count() as f64 / n;
        assert!((positive - 0.5).abs() < 0.002, "{positive}");
    }
}
