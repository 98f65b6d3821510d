//! From morphology to pixels: a patch's fields through its slide's optics and its
//! patient's stain, to SRH channels (CH2, CH3 as `u16`) or H&E colour (RGB `u8`).
//!
//! Order of operations, each level on top of the one below:
//!
//! 1. patch: [`texture::render`] draws the nuclei and tissue fields; both are
//!    standardized over the patch (zero mean, unit variance), so no class changes the
//!    mean or contrast of a channel, only where the structures are;
//! 2. slide: the fields are blurred (defocus); every channel is multiplied by the
//!    slide's brightness and by its illumination gradient, evaluated where the patch
//!    lies on the slide;
//! 3. patient: per-channel gain and offset, and how strongly nuclei and tissue take
//!    their stains;
//! 4. a little per-pixel sensor noise, clamping and quantization.

use hsat_core::rng::SplitMix64;

use super::plan::{PatientPlan, SLIDE_SPAN, SlidePlan};
use super::texture::{self, Fields};

/// Optical density of hematoxylin (R, G, B), after Ruifrok and Johnston (2001).
const HEMATOXYLIN: [f32; 3] = [0.650, 0.704, 0.286];
/// Optical density of eosin (R, G, B), after Ruifrok and Johnston (2001).
const EOSIN: [f32; 3] = [0.072, 0.990, 0.105];

/// Buffers reused from patch to patch by one thread.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    fields: Fields,
    blur: Vec<f32>,
    /// Illumination factor of each pixel.
    light: Vec<f32>,
    /// Hematoxylin concentration of each pixel (H&E only).
    hematoxylin: Vec<f32>,
    /// Eosin concentration of each pixel (H&E only).
    eosin: Vec<f32>,
    /// Sensor noise, one plane per channel.
    noise: Vec<f32>,
    /// One output channel before interleaving (H&E only).
    plane: Vec<u8>,
}

/// Draws the patch's fields and the slide effects shared by both formats; returns
/// the patch's noise stream.
fn prepare(
    patient: &PatientPlan,
    slide: &SlidePlan,
    seed: u64,
    size: usize,
    scratch: &mut Scratch,
) -> SplitMix64 {
    let mut rng = SplitMix64::new(seed);
    // Where the patch lies on its slide, as a fraction of the slide's side.
    let span = SLIDE_SPAN - 1.0;
    let origin = (span * rng.unit() as f32, span * rng.unit() as f32);

    texture::render(
        &patient.morphology,
        slide.look.fibre_angle,
        size,
        &mut rng,
        &mut scratch.fields,
    );
    let Scratch {
        fields,
        blur,
        light,
        ..
    } = scratch;
    texture::standardize(&mut fields.nuclei);
    texture::blur(&mut fields.nuclei, size, slide.look.blur, blur);
    texture::blur(&mut fields.tissue, size, slide.look.blur, blur);

    // A linear ramp across the slide plus a gentle vignette, times the brightness:
    // brightness * (1 + gradient * (ramp - vignette)), where both terms are sums of
    // a function of x and a function of y.
    let look = &slide.look;
    let (dir_y, dir_x) = look.gradient_angle.sin_cos();
    let slide_side = SLIDE_SPAN * size as f32;
    let axis = |start: f32, direction: f32| -> Vec<f32> {
        (0..size)
            .map(|i| {
                let s = 2.0 * (start * size as f32 + i as f32) / slide_side - 1.0;
                look.gradient * (s * direction - 0.5 * s * s)
            })
            .collect()
    };
    let (across, down) = (axis(origin.0, dir_x), axis(origin.1, dir_y));
    light.clear();
    light.resize(size * size, 0.0);
    for (row, &dy) in light.chunks_exact_mut(size).zip(&down) {
        for (pixel, &dx) in row.iter_mut().zip(&across) {
            *pixel = look.brightness * (1.0 + dx + dy);
        }
    }
    rng
}

/// Approximately standard normal sensor noise: a triangular draw from 32 random bits
/// (cheaper than Box-Muller, and bounded by ±2.45).
fn noise(bits: u32) -> f32 {
    // Two uniforms in [0, 1] summed and centred: triangular on [-1, 1] with variance
    // 1/6, scaled by sqrt(6). Multiplications only: a division per pixel is slow.
    const SCALE: f32 = 1.0 / 65535.0;
    let sum = (bits & 0xffff) as f32 * SCALE + (bits >> 16) as f32 * SCALE;
    (sum - 1.0) * 2.449_489_7
}

/// An SRH patch: CH2 and CH3, row-major, as `u16` (full range 65535).
///
/// CH2 (lipid, 2845 cm^-1) carries the tissue and is a little darker in nuclei; CH3
/// (protein, 2930 cm^-1) is brighter in nuclei, so `CH3 - CH2` (the third channel
/// of hsat's base processing) shows the nuclei. Typical values are about 7k to 53k: the
/// structures' contrast (about 0.1 of the range for tissue, 0.13 for nuclei per unit of
/// their standardized fields) is well above the slide's brightness and illumination
/// nuisance (a few percent), so texture, not optics, is what patches of a class share.
pub(super) fn render_srh(
    patient: &PatientPlan,
    slide: &SlidePlan,
    seed: u64,
    size: usize,
    scratch: &mut Scratch,
) -> (Vec<u16>, Vec<u16>) {
    let mut rng = prepare(patient, slide, seed, size, scratch);
    let stain = &patient.stain;
    let (nuclear, tissue) = (stain.nuclear, stain.tissue);
    let pixels = size * size;
    let Scratch {
        fields,
        light,
        noise: noises,
        ..
    } = scratch;
    // The noise first (the stream is sequential), then a branch-free loop that
    // vectorizes.
    noises.clear();
    noises.resize(2 * pixels, 0.0);
    let (noise2, noise3) = noises.split_at_mut(pixels);
    for (n2, n3) in noise2.iter_mut().zip(noise3.iter_mut()) {
        let bits = rng.next_u64();
        *n2 = noise(bits as u32);
        *n3 = noise((bits >> 32) as u32);
    }
    let mut ch2 = vec![0u16; pixels];
    let mut ch3 = vec![0u16; pixels];
    let inputs = fields.nuclei.iter().zip(&fields.tissue).zip(light.iter());
    let noises = noise2.iter().zip(noise3.iter());
    let outputs = ch2.iter_mut().zip(ch3.iter_mut());
    for ((((&n, &t), &light), (&n2, &n3)), (c2, c3)) in inputs.zip(noises).zip(outputs) {
        let lipid = 0.30 + 0.09 * tissue * t - 0.03 * nuclear * n;
        let protein = 0.36 + 0.06 * tissue * t + 0.13 * nuclear * n;
        *c2 = quantize_u16((stain.gain[0] * lipid + stain.offset[0]) * light + 0.004 * n2);
        *c3 = quantize_u16((stain.gain[1] * protein + stain.offset[1]) * light + 0.004 * n3);
    }
    (ch2, ch3)
}

/// An H&E patch: RGB, row-major, interleaved, 8 bits per channel.
///
/// Hematoxylin (purple) follows the nuclei, eosin (pink) the tissue; light through
/// both is `exp(-optical density)` (Beer-Lambert), so the background is pink and
/// nuclei are purple.
pub(super) fn render_rgb(
    patient: &PatientPlan,
    slide: &SlidePlan,
    seed: u64,
    size: usize,
    scratch: &mut Scratch,
) -> Vec<u8> {
    let mut rng = prepare(patient, slide, seed, size, scratch);
    let stain = &patient.stain;
    let pixels = size * size;
    let Scratch {
        fields,
        light,
        hematoxylin,
        eosin,
        noise: noises,
        plane,
        ..
    } = scratch;
    // Plane by plane, in branch-free loops the compiler vectorizes (a pixel-by-pixel
    // loop was several times slower).
    hematoxylin.clear();
    hematoxylin.extend(
        fields
            .nuclei
            .iter()
            .map(|&n| stain.nuclear * (0.28 + 0.22 * n).max(0.0)),
    );
    eosin.clear();
    eosin.extend(
        fields
            .tissue
            .iter()
            .map(|&t| stain.tissue * (0.38 + 0.15 * t).max(0.0)),
    );
    noises.clear();
    noises.resize(3 * pixels, 0.0);
    {
        let (red, rest) = noises.split_at_mut(pixels);
        let (green, blue) = rest.split_at_mut(pixels);
        for ((r, g), b) in red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut()) {
            let (first, second) = (rng.next_u64(), rng.next_u64());
            *r = noise(first as u32);
            *g = noise((first >> 32) as u32);
            *b = noise(second as u32);
        }
    }
    let mut rgb = vec![0u8; 3 * pixels];
    plane.clear();
    plane.resize(pixels, 0);
    for (c, noise) in noises.chunks_exact(pixels).enumerate() {
        let (gain, offset) = (stain.gain[c], stain.offset[c]);
        let (h_density, e_density) = (HEMATOXYLIN[c], EOSIN[c]);
        let inputs = hematoxylin
            .iter()
            .zip(eosin.iter())
            .zip(light.iter())
            .zip(noise);
        for (out, (((&h, &e), &light), &noise)) in plane.iter_mut().zip(inputs) {
            let transmitted = exp_neg(h * h_density + e * e_density);
            *out = quantize_u8((gain * transmitted + offset) * light + 0.008 * noise);
        }
        for (pixel, &value) in rgb.chunks_exact_mut(3).zip(plane.iter()) {
            pixel[c] = value;
        }
    }
    rgb
}

/// `exp(-d)` for `d >= 0` (clamped to 80), to a relative 5e-6 + 4e-8 d, branch-free so that
/// loops over it vectorize: `2^y` with `y = -d log2(e)` split into an integer `i`
/// (put straight into the exponent bits) and `f` in [-1/2, 1/2] (a degree-5 Taylor
/// polynomial of `e^(f ln 2)`).
fn exp_neg(d: f32) -> f32 {
    let y = -d.clamp(0.0, 80.0) * std::f32::consts::LOG2_E;
    let i = round_small(y);
    let x = (y - i as f32) * std::f32::consts::LN_2;
    let e_x = 1.0 + x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))));
    // i is in [-116, 0]: a normal power of two.
    e_x * f32::from_bits(((i + 127) as u32) << 23)
}

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 leaves that float's value
/// rounded to an integer (ties to even) in the low mantissa bits.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `x` rounded to the nearest integer (ties to even), for |x| < 2^22. Bit arithmetic
/// instead of `as i32`, whose saturating semantics keep loops from vectorizing.
fn round_small(x: f32) -> i32 {
    (x + ROUNDING_MAGIC).to_bits() as i32 - ROUNDING_MAGIC.to_bits() as i32
}

/// Rounds to the nearest level (ties to even) after clamping to [0, 1].
fn quantize_u16(value: f32) -> u16 {
    round_small(value.clamp(0.0, 1.0) * 65535.0) as u16
}

fn quantize_u8(value: f32) -> u8 {
    round_small(value.clamp(0.0, 1.0) * 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_rounds_and_saturates() {
        assert_eq!(quantize_u8(-1.0), 0);
        assert_eq!(quantize_u8(0.5 / 255.0 - 1e-6), 0);
        assert_eq!(quantize_u8(0.5 / 255.0 + 1e-6), 1);
        assert_eq!(quantize_u8(2.0), 255);
        assert_eq!(quantize_u16(1.0), 65535);
        assert_eq!(quantize_u16(0.5), 32768);
        assert_eq!(quantize_u16(1e-9), 0);
    }

    #[test]
    fn round_small_rounds_to_nearest() {
        for (x, rounded) in [
            (0.0, 0),
            (0.49, 0),
            (0.51, 1),
            (-0.51, -1),
            (2.5, 2),
            (3.5, 4),
            (-115.7, -116),
        ] {
            assert_eq!(round_small(x), rounded, "{x}");
        }
        for i in -100_000..100_000 {
            let x = i as f32 * 0.37;
            assert_eq!(round_small(x), x.round_ties_even() as i32, "{x}");
        }
    }

    #[test]
    fn exp_neg_matches_exp() {
        for i in 0..=80_000 {
            let d = i as f32 * 0.001;
            let exact = (-f64::from(d)).exp();
            let relative = (f64::from(exp_neg(d)) - exact).abs() / exact;
            // Rounding y = -d log2(e) to f32 adds about 4e-8 d.
            assert!(relative < 5e-6 + 4e-8 * f64::from(d), "{d}: {relative}");
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(1e9) > 0.0 && exp_neg(1e9) < 1e-30);
    }
}
