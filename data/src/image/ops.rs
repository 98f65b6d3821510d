//! Deterministic image operations with torchvision 0.28's semantics on float tensors.
//!
//! Each public function takes its parameters explicitly and returns a new image; the
//! random pipeline ([`augment`](super::augment)) draws the parameters and uses the
//! `*_in_place` / `*_into` variants to reuse buffers. Arithmetic is f32 in the same
//! order as torchvision's tensor code where that order is observable (blends, HSV,
//! resize weights, affine grid), so most outputs match to the last bit or two; the
//! parity test (`data/tests/augment_parity.rs`) holds them within 1/255 and reports
//! the actual error.
//!
//! Colour ops expect 1 or 3 channels, as torchvision does (saturation and hue leave a
//! 1-channel image unchanged; contrast uses the plain mean for it).

use hsat_core::rng::SplitMix64;

use super::Image;
use super::normal::fill_standard_normal;

// ------------------------------------------------------------------------- helpers

/// torchvision's `_blend`: `(ratio * a + (1 - ratio) * b).clamp(0, 1)` in f32, with
/// both scalars rounded to f32 from the f64 value, as tensor-scalar ops do.
#[derive(Clone, Copy)]
struct Blend {
    ratio: f32,
    rest: f32,
}

impl Blend {
    fn new(ratio: f64) -> Self {
        Self {
            ratio: ratio as f32,
            rest: (1.0 - ratio) as f32,
        }
    }

    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        (self.ratio * a + self.rest * b).clamp(0.0, 1.0)
    }
}

/// torchvision's `rgb_to_grayscale` (ITU-R 601-2 luma, TF's weights), f32.
#[inline(always)]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

/// The three planes of a 3-channel image, or `None`.
fn rgb_planes_mut(image: &mut Image) -> Option<(&mut [f32], &mut [f32], &mut [f32])> {
    if image.channels != 3 {
        return None;
    }
    let len = image.plane_len();
    let (r, rest) = image.data.split_at_mut(len);
    let (g, b) = rest.split_at_mut(len);
    Some((r, g, b))
}

/// `index` reflected into `0..len` without repeating the edge (torch's `reflect` pad).
fn reflect(index: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let m = index.rem_euclid(period);
    (if m >= len as isize { period - m } else { m }) as usize
}

/// 1.5 * 2^23: adding it to an f32 of magnitude below 2^22 lands in [2^23, 2^24),
/// where the spacing of f32 is 1, so adding and subtracting it rounds to an integer,
/// half to even (the default rounding mode), without a libm call (the build targets
/// baseline x86-64, where `floor` and `round_ties_even` are library calls).
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `x.round_ties_even() as i32` for `|x| <= 2^22` (larger values are clamped to that
/// first). In [2^23, 2^24), consecutive integers have consecutive bit patterns, so the
/// integer is a subtraction of bit patterns: no float-to-int conversion, which on
/// baseline x86-64 keeps loops from vectorising.
#[inline(always)]
fn round_ties_even_to_i32(x: f32) -> i32 {
    let x = x.clamp(-4_194_304.0, 4_194_304.0);
    ((x + ROUNDING_MAGIC).to_bits() as i32).wrapping_sub(ROUNDING_MAGIC.to_bits() as i32)
}

/// `x.floor()` for `0 <= x < 2^22`.
#[inline(always)]
fn floor_small(x: f32) -> f32 {
    let r = (x + ROUNDING_MAGIC) - ROUNDING_MAGIC;
    if r > x { r - 1.0 } else { r }
}

fn with_copy(image: &Image, op: impl FnOnce(&mut Image)) -> Image {
    let mut out = image.clone();
    op(&mut out);
    out
}

// --------------------------------------------------------------------------- flips

/// Mirror left-right (`F.hflip`).
pub fn hflip(image: &Image) -> Image {
    with_copy(image, hflip_in_place)
}

pub(crate) fn hflip_in_place(image: &mut Image) {
    if image.width == 0 {
        return;
    }
    for row in image.data.chunks_exact_mut(image.width) {
        row.reverse();
    }
}

/// Mirror top-bottom (`F.vflip`).
pub fn vflip(image: &Image) -> Image {
    with_copy(image, vflip_in_place)
}

pub(crate) fn vflip_in_place(image: &mut Image) {
    let (h, w) = (image.height, image.width);
    if w == 0 || h == 0 {
        return;
    }
    for plane in image.data.chunks_exact_mut(h * w) {
        for y in 0..h / 2 {
            let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
            top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
        }
    }
}

// --------------------------------------------------------------------------- noise

/// `clamp(x + noise * sigma, 0, 1)` with a given standard-normal field (one value per
/// sample, CHW), as HiDisc's `GaussianNoise` does with `torch.randn`.
///
/// # Panics
///
/// If `noise` does not have one value per sample.
pub fn gaussian_noise(image: &Image, sigma: f64, noise: &[f32]) -> Image {
    assert_eq!(noise.len(), image.data.len(), "one noise value per sample");
    let sigma = sigma as f32;
    with_copy(image, |out| {
        for (x, &n) in out.data.iter_mut().zip(noise) {
            *x = (*x + n * sigma).clamp(0.0, 1.0);
        }
    })
}

/// [`gaussian_noise`] with the field drawn from `rng` (ziggurat normals).
pub fn gaussian_noise_rng(image: &Image, sigma: f64, rng: &mut SplitMix64) -> Image {
    with_copy(image, |out| gaussian_noise_in_place(out, sigma, rng))
}

pub(crate) fn gaussian_noise_in_place(image: &mut Image, sigma: f64, rng: &mut SplitMix64) {
    let sigma = sigma as f32;
    let mut noise = [0.0f32; 1024];
    for chunk in image.data.chunks_mut(noise.len()) {
        let noise = &mut noise[..chunk.len()];
        fill_standard_normal(rng, noise);
        for (x, &n) in chunk.iter_mut().zip(noise.iter()) {
            *x = (*x + n * sigma).clamp(0.0, 1.0);
        }
    }
}

// -------------------------------------------------------------------------- colour

/// `F.adjust_brightness`: `clamp(factor * x)`.
pub fn adjust_brightness(image: &Image, factor: f64) -> Image {
    with_copy(image, |out| adjust_brightness_in_place(out, factor))
}

pub(crate) fn adjust_brightness_in_place(image: &mut Image, factor: f64) {
    let blend = Blend::new(factor);
    for x in &mut image.data {
        *x = blend.apply(*x, 0.0);
    }
}

/// `F.adjust_contrast`: blend with the mean of the grayscale image.
pub fn adjust_contrast(image: &Image, factor: f64) -> Image {
    with_copy(image, |out| adjust_contrast_in_place(out, factor))
}

pub(crate) fn adjust_contrast_in_place(image: &mut Image, factor: f64) {
    let mean = match rgb_planes_mut(image) {
        Some((r, g, b)) => {
            let n = r.len().max(1) as f64;
            let sum: f64 = r
                .iter()
                .zip(g.iter())
                .zip(b.iter())
                .map(|((&r, &g), &b)| f64::from(luma(r, g, b)))
                .sum();
            (sum / n) as f32
        }
        None => {
            let n = image.data.len().max(1) as f64;
            (image.data.iter().map(|&x| f64::from(x)).sum::<f64>() / n) as f32
        }
    };
    let blend = Blend::new(factor);
    for x in &mut image.data {
        *x = blend.apply(*x, mean);
    }
}

/// `F.adjust_saturation`: blend each pixel with its grayscale value.
pub fn adjust_saturation(image: &Image, factor: f64) -> Image {
    with_copy(image, |out| adjust_saturation_in_place(out, factor))
}

pub(crate) fn adjust_saturation_in_place(image: &mut Image, factor: f64) {
    let Some((r, g, b)) = rgb_planes_mut(image) else {
        return;
    };
    let blend = Blend::new(factor);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let gray = luma(*r, *g, *b);
        *r = blend.apply(*r, gray);
        *g = blend.apply(*g, gray);
        *b = blend.apply(*b, gray);
    }
}

/// `F.adjust_hue`: shift the hue by `factor` turns (in [-0.5, 0.5]) through
/// torchvision's RGB -> HSV -> RGB.
pub fn adjust_hue(image: &Image, factor: f64) -> Image {
    with_copy(image, |out| adjust_hue_in_place(out, factor))
}

pub(crate) fn adjust_hue_in_place(image: &mut Image, factor: f64) {
    debug_assert!((-0.5..=0.5).contains(&factor), "hue factor {factor}");
    let Some((r, g, b)) = rgb_planes_mut(image) else {
        return;
    };
    let shift = factor as f32;
    for ((r, g), b) in r
        .chunks_mut(HUE_BLOCK)
        .zip(g.chunks_mut(HUE_BLOCK))
        .zip(b.chunks_mut(HUE_BLOCK))
    {
        hue_block(r, g, b, shift);
    }
}

/// Pixels per block of the hue conversion.
const HUE_BLOCK: usize = 64;

/// torchvision's `_rgb2hsv`, hue shift and `_hsv2rgb` on up to [`HUE_BLOCK`] pixels,
/// as a few simple element-wise passes over stack buffers: each pass vectorises
/// (selects instead of branches), and the arithmetic of every pixel is the same as
/// torchvision's, operation for operation.
fn hue_block(r: &mut [f32], g: &mut [f32], b: &mut [f32], shift: f32) {
    let n = r.len();
    let (g, b) = (&mut g[..n], &mut b[..n]);
    let mut hue = [0.0f32; HUE_BLOCK];
    let mut sat = [0.0f32; HUE_BLOCK];
    let mut val = [0.0f32; HUE_BLOCK];
    let (hue, sat, val) = (&mut hue[..n], &mut sat[..n], &mut val[..n]);

    // RGB -> HSV.
    for k in 0..n {
        let (rk, gk, bk) = (r[k], g[k], b[k]);
        let maxc = if rk > gk { rk } else { gk };
        let maxc = if maxc > bk { maxc } else { bk };
        let minc = if rk < gk { rk } else { gk };
        let minc = if minc < bk { minc } else { bk };
        let equal = maxc == minc;
        let cr = maxc - minc;
        sat[k] = cr / if equal { 1.0 } else { maxc };
        let divisor = if equal { 1.0 } else { cr };
        let rc = (maxc - rk) / divisor;
        let gc = (maxc - gk) / divisor;
        let bc = (maxc - bk) / divisor;
        let from_r = bc - gc;
        let from_g = 2.0 + rc - bc;
        let from_b = 4.0 + gc - rc;
        let h = if maxc == gk { from_g } else { from_b };
        let h = if maxc == rk { from_r } else { h };
        hue[k] = h;
        val[k] = maxc;
    }
    // `fmod(h / 6 + 1, 1)` (the argument is in [5/6, 11/6]), then torch's
    // `(h + shift) % 1.0`: remainder with the sign of the divisor, exact like fmod for
    // `h + shift` in [-0.5, 1.5).
    for h in hue.iter_mut() {
        let x = *h / 6.0 + 1.0;
        let x = if x >= 1.0 { x - 1.0 } else { x };
        let x = x + shift;
        let x = if x >= 1.0 { x - 1.0 } else { x };
        *h = if x < 0.0 { x + 1.0 } else { x };
    }
    // HSV -> RGB.
    for k in 0..n {
        let (h, s, v) = (hue[k], sat[k], val[k]);
        let h6 = h * 6.0;
        let i = floor_small(h6);
        let f = h6 - i;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        // Sector `i % 6` (h = 1 gives i = 6, sector 0): R, G, B are
        // (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q) for sectors 0..5.
        let sector = if i >= 6.0 { i - 6.0 } else { i };
        let (s1, s2, s3, s4) = (sector == 1.0, sector == 2.0, sector == 3.0, sector == 4.0);
        let low = sector < 2.0;
        let r_out = if s1 { q } else { v };
        let r_out = if s2 || s3 { p } else { r_out };
        r[k] = if s4 { t } else { r_out };
        let g_out = if low { if s1 { v } else { t } } else { p };
        g[k] = if s2 {
            v
        } else if s3 {
            q
        } else {
            g_out
        };
        let b_out = if low { p } else { v };
        let b_out = if s2 { t } else { b_out };
        b[k] = if sector == 5.0 { q } else { b_out };
    }
}

// ------------------------------------------------------- autocontrast, solarize

/// `F.autocontrast`: stretch each channel to [0, 1]; a constant channel is kept.
pub fn autocontrast(image: &Image) -> Image {
    with_copy(image, autocontrast_in_place)
}

pub(crate) fn autocontrast_in_place(image: &mut Image) {
    let len = image.plane_len();
    if len == 0 {
        return;
    }
    for plane in image.data.chunks_exact_mut(len) {
        let (mut lo, hi) = min_max(plane);
        let mut scale = 1.0 / (hi - lo);
        if !scale.is_finite() {
            lo = 0.0;
            scale = 1.0;
        }
        for x in plane.iter_mut() {
            *x = ((*x - lo) * scale).clamp(0.0, 1.0);
        }
    }
}

/// An `i32` that orders like the `f32` it comes from (for every non-NaN value): the
/// sign-magnitude bits of a negative float are flipped into two's complement order.
#[inline(always)]
fn order_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The inverse of [`order_key`].
#[inline(always)]
fn from_order_key(key: i32) -> f32 {
    f32::from_bits((key ^ (((key >> 31) as u32) >> 1) as i32) as u32)
}

/// Smallest and largest value, as an integer min/max reduction (which the compiler
/// vectorises reliably, unlike float min/max on baseline x86-64).
fn min_max(values: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (i32::MAX, i32::MIN);
    for &x in values {
        let key = order_key(x);
        lo = lo.min(key);
        hi = hi.max(key);
    }
    (from_order_key(lo), from_order_key(hi))
}

/// `F.solarize`: `x >= threshold ? 1 - x : x`.
pub fn solarize(image: &Image, threshold: f64) -> Image {
    with_copy(image, |out| solarize_in_place(out, threshold))
}

pub(crate) fn solarize_in_place(image: &mut Image, threshold: f64) {
    let threshold = threshold as f32;
    for x in &mut image.data {
        let inverted = 1.0 - *x;
        *x = if *x >= threshold { inverted } else { *x };
    }
}

// ---------------------------------------------------------------------- sharpness

/// `F.adjust_sharpness`: blend with torchvision's 3x3 smoothing (weights 1, centre 5,
/// over 13) of the interior; the one-pixel border is blended with itself.
pub fn adjust_sharpness(image: &Image, factor: f64) -> Image {
    let mut out = Image::zeros(0, 0, 0);
    adjust_sharpness_into(image, factor, &mut out);
    out
}

pub(crate) fn adjust_sharpness_into(image: &Image, factor: f64, out: &mut Image) {
    let (h, w) = (image.height, image.width);
    if h <= 2 || w <= 2 {
        out.clone_from(image);
        return;
    }
    out.reshape_for_write(image.channels, h, w);
    let blend = Blend::new(factor);
    let edge: f32 = 1.0 / 13.0;
    let centre: f32 = 5.0 / 13.0;
    for (src, dst) in image
        .data
        .chunks_exact(h * w)
        .zip(out.data.chunks_exact_mut(h * w))
    {
        // Border rows: blended with themselves.
        for y in [0, h - 1] {
            for (d, &s) in dst[y * w..(y + 1) * w]
                .iter_mut()
                .zip(&src[y * w..(y + 1) * w])
            {
                *d = blend.apply(s, s);
            }
        }
        let n = w - 2;
        for y in 1..h - 1 {
            let row = &src[y * w..(y + 1) * w];
            let dst = &mut dst[y * w..(y + 1) * w];
            dst[0] = blend.apply(row[0], row[0]);
            dst[w - 1] = blend.apply(row[w - 1], row[w - 1]);
            // Nine shifted views of length n: the loop has no bounds checks and
            // vectorises; the per-pixel sum keeps the kernel's order.
            let above = &src[(y - 1) * w..y * w];
            let below = &src[(y + 1) * w..(y + 2) * w];
            let (a0, a1, a2) = (&above[..n], &above[1..n + 1], &above[2..n + 2]);
            let (r0, r1, r2) = (&row[..n], &row[1..n + 1], &row[2..n + 2]);
            let (b0, b1, b2) = (&below[..n], &below[1..n + 1], &below[2..n + 2]);
            let inner = &mut dst[1..n + 1];
            for x in 0..n {
                let smooth = edge * a0[x]
                    + edge * a1[x]
                    + edge * a2[x]
                    + edge * r0[x]
                    + centre * r1[x]
                    + edge * r2[x]
                    + edge * b0[x]
                    + edge * b1[x]
                    + edge * b2[x];
                inner[x] = blend.apply(r1[x], smooth);
            }
        }
    }
}

// -------------------------------------------------------------------- gaussian blur

/// torchvision's 1-D gaussian kernel in f32: `exp(-0.5 (x / sigma)^2)` at
/// `x = -(k-1)/2 ..= (k-1)/2`, normalised to sum 1.
fn gaussian_kernel(kernel_size: usize, sigma: f64) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let sigma = sigma as f32;
    let pdf: Vec<f32> = (0..kernel_size)
        .map(|i| {
            let x = (i as f32 - half) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    pdf.into_iter().map(|p| p / sum).collect()
}

/// `F.gaussian_blur(image, [k, k], [sigma, sigma])`: separable, reflect padding; the
/// result is clamped to [0, 1] (torchvision's can exceed 1 by an ulp).
///
/// `kernel_size` must be odd and `sigma` positive.
pub fn gaussian_blur(image: &Image, kernel_size: usize, sigma: f64) -> Image {
    let mut out = Image::zeros(0, 0, 0);
    gaussian_blur_into(image, kernel_size, sigma, &mut out);
    out
}

pub(crate) fn gaussian_blur_into(image: &Image, kernel_size: usize, sigma: f64, out: &mut Image) {
    debug_assert!(kernel_size % 2 == 1 && sigma > 0.0);
    let (h, w) = (image.height, image.width);
    out.reshape_for_write(image.channels, h, w);
    if h == 0 || w == 0 {
        return;
    }
    let kernel = gaussian_kernel(kernel_size, sigma);
    let radius = kernel_size / 2;
    // Source row index for each (output row, tap), reflected.
    let rows: Vec<usize> = (0..h)
        .flat_map(|y| {
            (0..kernel_size).map(move |k| reflect(y as isize + k as isize - radius as isize, h))
        })
        .collect();
    let mut padded = vec![0.0f32; w + 2 * radius];
    let mut horizontal = vec![0.0f32; h * w];
    for (src, dst) in image
        .data
        .chunks_exact(h * w)
        .zip(out.data.chunks_exact_mut(h * w))
    {
        // Horizontal pass into `horizontal`, through a reflect-padded copy of each row.
        for (row, hrow) in src.chunks_exact(w).zip(horizontal.chunks_exact_mut(w)) {
            padded[radius..radius + w].copy_from_slice(row);
            for p in 0..radius {
                padded[radius - 1 - p] = row[reflect(-1 - p as isize, w)];
                padded[radius + w + p] = row[reflect((w + p) as isize, w)];
            }
            weighted_sum(hrow, &kernel, |t| &padded[t..t + w]);
        }
        // Vertical pass, row by row.
        for (y, orow) in dst.chunks_exact_mut(w).enumerate() {
            let taps = &rows[y * kernel_size..(y + 1) * kernel_size];
            weighted_sum(orow, &kernel, |t| {
                &horizontal[taps[t] * w..(taps[t] + 1) * w]
            });
            // The normalised f32 kernel can sum to one ulp above 1: keep [0, 1].
            for o in orow.iter_mut() {
                *o = o.clamp(0.0, 1.0);
            }
        }
    }
}

/// `out[x] = sum_t kernel[t] * input(t)[x]`, summed in tap order from 0. The
/// five-tap kernel of the augmentation keeps the sum in registers (one pass over
/// memory, vectorised); other sizes accumulate tap by tap.
fn weighted_sum<'a>(out: &mut [f32], kernel: &[f32], input: impl Fn(usize) -> &'a [f32]) {
    let n = out.len();
    if let &[ka, kb, kc, kd, ke] = kernel {
        let (a, b, c, d, e) = (
            &input(0)[..n],
            &input(1)[..n],
            &input(2)[..n],
            &input(3)[..n],
            &input(4)[..n],
        );
        for x in 0..n {
            out[x] = 0.0 + ka * a[x] + kb * b[x] + kc * c[x] + kd * d[x] + ke * e[x];
        }
        return;
    }
    out.fill(0.0);
    for (t, &k) in kernel.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(&input(t)[..n]) {
            *o += k * v;
        }
    }
}

// --------------------------------------------------------------------------- affine

/// `F.affine(image, angle, [tx, ty], scale=1, shear=[0, 0], NEAREST, fill=0)`:
/// rotation by `angle_deg` (clockwise on screen, as torchvision) about the image
/// centre, then translation by `(tx, ty)` pixels; outside pixels become 0.
///
/// The inverse matrix, the output grid and `grid_sample`'s unnormalisation are
/// computed in f32 like torchvision's tensor path, with round-half-to-even for
/// nearest, so the picked source pixels match.
pub fn affine(image: &Image, angle_deg: f64, translate: (i64, i64)) -> Image {
    let mut out = Image::zeros(0, 0, 0);
    affine_into(image, angle_deg, translate, &mut out);
    out
}

pub(crate) fn affine_into(image: &Image, angle_deg: f64, translate: (i64, i64), out: &mut Image) {
    let (h, w, c) = (image.height, image.width, image.channels);
    out.reshape_for_write(c, h, w);
    if h == 0 || w == 0 {
        return;
    }
    // torchvision `_get_inverse_affine_matrix`, centre (0, 0), scale 1, shear 0 (f64).
    let rot = angle_deg.to_radians();
    let (sin, cos) = rot.sin_cos();
    let (tx, ty) = (translate.0 as f64, translate.1 as f64);
    let (a, b, c_, d) = (cos, -sin, sin, cos);
    let m = [d, -b, 0.0, -c_, a, 0.0];
    let m2 = m[2] + m[0] * (-tx) + m[1] * (-ty);
    let m5 = m[5] + m[3] * (-tx) + m[4] * (-ty);
    let theta = [
        m[0] as f32,
        m[1] as f32,
        m2 as f32,
        m[3] as f32,
        m[4] as f32,
        m5 as f32,
    ];
    // `_gen_affine_grid`: theta^T / [w/2, h/2], applied to pixel centres relative to
    // the image centre.
    let half_w = 0.5 * w as f32;
    let half_h = 0.5 * h as f32;
    let (gx_x, gx_y, gx_1) = (theta[0] / half_w, theta[1] / half_w, theta[2] / half_w);
    let (gy_x, gy_y, gy_1) = (theta[3] / half_h, theta[4] / half_h, theta[5] / half_h);
    // grid_sample (align_corners=False) unnormalises with (g + 1) * size / 2 - 0.5.
    let (scale_x, scale_y) = (w as f32 / 2.0, h as f32 / 2.0);
    let plane = h * w;
    let x0 = -(w as f32) * 0.5 + 0.5;
    let y0 = -(h as f32) * 0.5 + 0.5;
    // Source index of each output pixel of a row; out of range (u32::MAX) reads 0.
    // Branch-free so the index loop vectorises.
    let (w32, h32) = (w as u32, h as u32);
    let mut sources = vec![u32::MAX; w];
    for oy in 0..h {
        let y = y0 + oy as f32;
        let ry_x = y * gx_y;
        let ry_y = y * gy_y;
        // An i32 counter: i32 -> f32 converts in one vector instruction, usize does not.
        for (ox, source) in (0..w as i32).zip(sources.iter_mut()) {
            let x = x0 + ox as f32;
            let gx = x * gx_x + ry_x + gx_1;
            let gy = x * gy_x + ry_y + gy_1;
            let ix = round_ties_even_to_i32((gx + 1.0) * scale_x - 0.5);
            let iy = round_ties_even_to_i32((gy + 1.0) * scale_y - 0.5);
            // Negative values wrap to huge u32s: one unsigned compare per axis.
            let inside = ((ix as u32) < w32) & ((iy as u32) < h32);
            *source = if inside {
                (iy as u32) * w32 + ix as u32
            } else {
                u32::MAX
            };
        }
        for ch in 0..c {
            let src = &image.data[ch * plane..(ch + 1) * plane];
            let dst = &mut out.data[ch * plane + oy * w..ch * plane + (oy + 1) * w];
            for (d, &source) in dst.iter_mut().zip(&sources) {
                *d = src.get(source as usize).copied().unwrap_or(0.0);
            }
        }
    }
}

// --------------------------------------------------------------------------- resize

/// Antialiased bilinear weights along one axis (ATen's `_upsample_bilinear2d_aa`,
/// align_corners=False): the triangle filter widened by the downscale factor, each
/// output's weights normalised to sum 1; all in f32 like ATen's float path.
///
/// Stored twice: as ATen has them (`start`, `len`, the weights), and padded with
/// zeros to a fixed number of taps per output (`fixed_*`) so the horizontal pass has a
/// constant inner loop. A zero tap adds exactly 0 to the sum: both give the same bits.
struct AxisFilter {
    /// First input index of each output.
    start: Vec<usize>,
    /// Number of taps of each output.
    len: Vec<usize>,
    /// `stride` weights per output (the first `len[i]` are used).
    weights: Vec<f32>,
    stride: usize,
    /// Taps per output in the padded form (`min(stride, input)`).
    fixed_taps: usize,
    /// First input index of each output's padded taps.
    fixed_start: Vec<usize>,
    /// `fixed_taps` weights per output.
    fixed_weights: Vec<f32>,
}

impl AxisFilter {
    fn new(input: usize, output: usize) -> Self {
        let scale = input as f32 / output as f32;
        let support: f32 = if scale >= 1.0 { scale } else { 1.0 };
        let invscale: f32 = if scale >= 1.0 {
            (1.0 / f64::from(scale)) as f32
        } else {
            1.0
        };
        let stride = (support.ceil() as usize) * 2 + 1;
        let fixed_taps = stride.min(input);
        let mut filter = Self {
            start: Vec::with_capacity(output),
            len: Vec::with_capacity(output),
            weights: vec![0.0; output * stride],
            stride,
            fixed_taps,
            fixed_start: Vec::with_capacity(output),
            fixed_weights: vec![0.0; output * fixed_taps],
        };
        for i in 0..output {
            let center = (f64::from(scale) * (i as f64 + 0.5)) as f32;
            // Truncation toward zero, as the C++ integer cast.
            let xmin = ((f64::from(center - support) + 0.5) as i64).max(0);
            let xmax = ((f64::from(center + support) + 0.5) as i64).min(input as i64);
            let xsize = (xmax - xmin).clamp(0, stride as i64) as usize;
            let xmin = xmin as usize;
            let weights = &mut filter.weights[i * stride..i * stride + xsize];
            let mut total = 0.0f32;
            for (j, wt) in weights.iter_mut().enumerate() {
                let arg = (((j + xmin) as f32 - center) as f64 + 0.5) * f64::from(invscale);
                let arg = (arg as f32).abs();
                *wt = if arg < 1.0 { 1.0 - arg } else { 0.0 };
                total += *wt;
            }
            if total != 0.0 {
                for wt in weights.iter_mut() {
                    *wt /= total;
                }
            }
            // Padded form: the taps shifted left when they would run past the end.
            let fixed_start = xmin.min(input - fixed_taps);
            let offset = xmin - fixed_start;
            filter.fixed_weights[i * fixed_taps + offset..i * fixed_taps + offset + xsize]
                .copy_from_slice(weights);
            filter.start.push(xmin);
            filter.len.push(xsize);
            filter.fixed_start.push(fixed_start);
        }
        filter
    }

    fn weights(&self, i: usize) -> &[f32] {
        &self.weights[i * self.stride..i * self.stride + self.len[i]]
    }

    /// One row of the horizontal pass: `out[i] = sum_k src[fixed_start[i] + k] * w[i][k]`.
    fn apply_row(&self, src: &[f32], out: &mut [f32]) {
        match self.fixed_taps {
            1 => self.apply_row_fixed::<1>(src, out),
            2 => self.apply_row_fixed::<2>(src, out),
            3 => self.apply_row_fixed::<3>(src, out),
            4 => self.apply_row_fixed::<4>(src, out),
            5 => self.apply_row_fixed::<5>(src, out),
            6 => self.apply_row_fixed::<6>(src, out),
            7 => self.apply_row_fixed::<7>(src, out),
            taps => {
                for ((o, &start), weights) in out
                    .iter_mut()
                    .zip(&self.fixed_start)
                    .zip(self.fixed_weights.chunks_exact(taps))
                {
                    let values = &src[start..start + taps];
                    let mut acc = values[0] * weights[0];
                    for (&v, &wt) in values.iter().zip(weights).skip(1) {
                        acc += v * wt;
                    }
                    *o = acc;
                }
            }
        }
    }

    fn apply_row_fixed<const N: usize>(&self, src: &[f32], out: &mut [f32]) {
        for ((o, &start), weights) in out
            .iter_mut()
            .zip(&self.fixed_start)
            .zip(self.fixed_weights.chunks_exact(N))
        {
            let values = &src[start..start + N];
            let mut acc = values[0] * weights[0];
            for k in 1..N {
                acc += values[k] * weights[k];
            }
            *o = acc;
        }
    }
}

/// Crops `(top, left, crop_h, crop_w)` and resizes it to `out_h x out_w` with
/// antialiased bilinear (`F.resized_crop(..., BILINEAR, antialias=True)`): horizontal
/// pass, then vertical, an axis whose size does not change is copied.
///
/// The result is clamped to [0, 1]: the normalised f32 weights can sum to one ulp
/// above 1, so torchvision's output can overshoot 1 by 1.2e-7; here it does not.
fn resample_into(
    image: &Image,
    (top, left, crop_h, crop_w): (usize, usize, usize, usize),
    (out_h, out_w): (usize, usize),
    out: &mut Image,
) {
    debug_assert!(top + crop_h <= image.height && left + crop_w <= image.width);
    let (h, w, c) = (image.height, image.width, image.channels);
    out.reshape_for_write(c, out_h, out_w);
    if out_h == 0 || out_w == 0 || crop_h == 0 || crop_w == 0 {
        out.data.fill(0.0);
        return;
    }
    let horizontal = (crop_w != out_w).then(|| AxisFilter::new(crop_w, out_w));
    let vertical = (crop_h != out_h).then(|| AxisFilter::new(crop_h, out_h));
    // Intermediate: crop_h rows of out_w.
    let mut mid = vec![0.0f32; crop_h * out_w];
    for (src, dst) in image
        .data
        .chunks_exact(h * w)
        .zip(out.data.chunks_exact_mut(out_h * out_w))
    {
        for (y, mrow) in mid.chunks_exact_mut(out_w).enumerate() {
            let srow = &src[(top + y) * w + left..(top + y) * w + left + crop_w];
            match &horizontal {
                None => mrow.copy_from_slice(srow),
                Some(filter) => filter.apply_row(srow, mrow),
            }
        }
        match &vertical {
            None => {
                for (o, &v) in dst.iter_mut().zip(&mid) {
                    *o = v.clamp(0.0, 1.0);
                }
            }
            Some(filter) => {
                for (y, orow) in dst.chunks_exact_mut(out_w).enumerate() {
                    let weights = filter.weights(y);
                    let start = filter.start[y];
                    if weights.is_empty() {
                        orow.fill(0.0);
                        continue;
                    }
                    let first = &mid[start * out_w..(start + 1) * out_w];
                    for (o, &v) in orow.iter_mut().zip(first) {
                        *o = v * weights[0];
                    }
                    for (j, &wt) in weights.iter().enumerate().skip(1) {
                        let mrow = &mid[(start + j) * out_w..(start + j + 1) * out_w];
                        for (o, &v) in orow.iter_mut().zip(mrow) {
                            *o += v * wt;
                        }
                    }
                    for o in orow.iter_mut() {
                        *o = o.clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
}

/// `F.resized_crop(image, top, left, height, width, [size, size])` with bilinear
/// interpolation and antialias (torchvision's default for tensors). The box must lie
/// inside the image.
///
/// # Panics
///
/// If the box does not lie inside the image.
pub fn resized_crop(
    image: &Image,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    size: usize,
) -> Image {
    let mut out = Image::zeros(0, 0, 0);
    resized_crop_into(image, (top, left, height, width), size, &mut out);
    out
}

pub(crate) fn resized_crop_into(
    image: &Image,
    crop: (usize, usize, usize, usize),
    size: usize,
    out: &mut Image,
) {
    let (top, left, height, width) = crop;
    assert!(
        top + height <= image.height && left + width <= image.width,
        "crop box {crop:?} outside a {}x{} image",
        image.height,
        image.width
    );
    resample_into(image, crop, (size, size), out);
}

/// Resize to `size x size` with bilinear + antialias, as
/// `F.resize(image, [size, size], antialias=True)` on a tensor; a copy if the image
/// already has that size.
pub fn resize_to(image: &Image, size: usize) -> Image {
    if image.height == size && image.width == size {
        return image.clone();
    }
    let mut out = Image::zeros(0, 0, 0);
    resample_into(
        image,
        (0, 0, image.height, image.width),
        (size, size),
        &mut out,
    );
    out
}

// -------------------------------------------------------------------------- erasing

/// `F.erase(image, i, j, h, w, v=0)`: rows `i..i+h`, columns `j..j+w` set to 0 in every
/// channel (clipped to the image).
pub fn erase(image: &Image, i: usize, j: usize, h: usize, w: usize) -> Image {
    with_copy(image, |out| erase_in_place(out, i, j, h, w))
}

pub(crate) fn erase_in_place(image: &mut Image, i: usize, j: usize, h: usize, w: usize) {
    let (height, width) = (image.height, image.width);
    let (y_end, x_end) = ((i + h).min(height), (j + w).min(width));
    if i >= y_end || j >= x_end {
        return;
    }
    for plane in image.data.chunks_exact_mut(height * width) {
        for y in i..y_end {
            plane[y * width + j..y * width + x_end].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Image {
        let n = c * h * w;
        Image::new(c, h, w, (0..n).map(|i| i as f32 / n as f32).collect())
    }

    #[test]
    fn flips_are_involutions() {
        let image = ramp(3, 5, 4);
        assert_eq!(hflip(&hflip(&image)), image);
        assert_eq!(vflip(&vflip(&image)), image);
        let flipped = vflip(&image);
        assert_eq!(&flipped.plane(1)[..4], &image.plane(1)[16..20]);
        let mirrored = hflip(&image);
        assert_eq!(mirrored.plane(2)[0], image.plane(2)[3]);
    }

    #[test]
    fn rounding_helpers_match_std() {
        for i in -4000..4000 {
            let x = i as f32 * 0.25 + 0.001 * (i % 7) as f32;
            assert_eq!(round_ties_even_to_i32(x), x.round_ties_even() as i32, "{x}");
            if x >= 0.0 {
                assert_eq!(floor_small(x), x.floor(), "{x}");
            }
        }
        assert_eq!(round_ties_even_to_i32(1e9), 4_194_304);
        assert_eq!(round_ties_even_to_i32(-1e9), -4_194_304);
        for x in [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            5.999_999_5,
            6.0,
            1e6 + 0.5,
        ] {
            assert_eq!(round_ties_even_to_i32(x), x.round_ties_even() as i32, "{x}");
            assert_eq!(floor_small(x.abs()), x.abs().floor(), "{x}");
        }
    }

    #[test]
    fn min_max_orders_like_floats() {
        let values = [
            0.5f32,
            -1.0,
            2.0,
            -3.5,
            0.0,
            -0.0,
            1e-30,
            f32::INFINITY,
            -7.25,
        ];
        assert_eq!(min_max(&values), (-7.25, f32::INFINITY));
        assert_eq!(min_max(&[0.25]), (0.25, 0.25));
        for pair in values.windows(2) {
            assert_eq!(from_order_key(order_key(pair[0])), pair[0]);
            if pair[0] != pair[1] {
                assert_eq!(pair[0] < pair[1], order_key(pair[0]) < order_key(pair[1]));
            }
        }
    }

    #[test]
    fn reflect_does_not_repeat_the_edge() {
        let got: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
        assert_eq!(reflect(-2, 1), 0);
    }

    #[test]
    fn hue_shift_by_zero_and_by_full_turns_keeps_colours() {
        let pixels = [
            (0.2f32, 0.5, 0.9),
            (1.0, 0.0, 0.0),
            (0.3, 0.3, 0.3),
            (0.0, 0.7, 0.7),
            (0.7, 0.7, 0.1),
            (0.9, 0.2, 0.9),
        ];
        let mut r: Vec<f32> = pixels.iter().map(|p| p.0).collect();
        let mut g: Vec<f32> = pixels.iter().map(|p| p.1).collect();
        let mut b: Vec<f32> = pixels.iter().map(|p| p.2).collect();
        hue_block(&mut r, &mut g, &mut b, 0.0);
        for (k, &(pr, pg, pb)) in pixels.iter().enumerate() {
            assert!(
                (r[k] - pr).abs() < 1e-6 && (g[k] - pg).abs() < 1e-6 && (b[k] - pb).abs() < 1e-6
            );
        }
        // A third of a turn moves red to green.
        let (mut r, mut g, mut b) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        hue_block(&mut r, &mut g, &mut b, 1.0 / 3.0);
        assert!(r[0].abs() < 1e-6 && (g[0] - 1.0).abs() < 1e-6 && b[0].abs() < 1e-6);
    }

    #[test]
    fn resize_to_same_size_is_identity_and_weights_sum_to_one() {
        let image = ramp(3, 6, 6);
        assert_eq!(resize_to(&image, 6), image);
        for (input, output) in [(300, 17), (17, 300), (40, 24), (48, 64)] {
            let filter = AxisFilter::new(input, output);
            for i in 0..output {
                let sum: f32 = filter.weights(i).iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{input}->{output} at {i}: {sum}");
                assert!(filter.start[i] + filter.len[i] <= input);
                let fixed =
                    &filter.fixed_weights[i * filter.fixed_taps..(i + 1) * filter.fixed_taps];
                assert_eq!(fixed.iter().sum::<f32>(), sum);
                assert!(filter.fixed_start[i] + filter.fixed_taps <= input);
            }
        }
        let constant = Image::new(3, 10, 7, vec![0.25; 210]);
        let resized = resize_to(&constant, 4);
        assert!(resized.data.iter().all(|&x| (x - 0.25).abs() < 1e-6));
    }

    #[test]
    fn affine_identity_and_integer_translation() {
        let image = ramp(3, 6, 8);
        assert_eq!(affine(&image, 0.0, (0, 0)), image);
        let moved = affine(&image, 0.0, (2, 1));
        // Output (y, x) takes input (y - 1, x - 2).
        assert_eq!(moved.plane(0)[8 + 2], image.plane(0)[0]);
        assert_eq!(moved.plane(0)[0], 0.0);
    }

    #[test]
    fn erase_clips_to_the_image() {
        let image = Image::new(1, 3, 3, vec![1.0; 9]);
        let erased = erase(&image, 1, 1, 5, 5);
        assert_eq!(
            erased.data,
            vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn sharpness_and_blur_keep_constant_images() {
        let image = Image::new(3, 7, 9, vec![0.5; 189]);
        let sharp = adjust_sharpness(&image, 2.0);
        assert!(sharp.data.iter().all(|&x| (x - 0.5).abs() < 1e-6));
        let blurred = gaussian_blur(&image, 5, 1.0);
        assert!(blurred.data.iter().all(|&x| (x - 0.5).abs() < 1e-6));
        // Tiny images: no panic.
        let tiny = Image::new(3, 1, 2, vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
        assert_eq!(gaussian_blur(&tiny, 5, 1.0).data.len(), 6);
        assert_eq!(adjust_sharpness(&tiny, 2.0), tiny);
    }
}
