//! Procedural tissue: the morphology of one patch, before any stain.
//!
//! A patch is two fields over its pixels:
//!
//! - **nuclei**: cell-like soft ellipses, in [0, 1]. Their size, size spread, shape,
//!   orientation and arrangement (scattered, in nests, in a regular sheet) depend on
//!   the class; their number is set so that every class covers the same fraction of
//!   the area ([`NUCLEAR_COVERAGE`]), so the amount of nuclear stain is no class cue;
//! - **tissue**: a mixture of oriented fibres (a few band-limited gratings, or
//!   concentric whorls) and smooth blobs (value noise); the class sets the fibre
//!   wavelength, how concentrated the fibre orientations are, the blob scale and the
//!   mixture.
//!
//! Lengths are in pixels: a larger patch shows a larger field of view at the same
//! magnification, as a larger crop of a real slide would.

use std::f32::consts::{PI, TAU};

use hsat_core::rng::SplitMix64;

/// Fraction of the area covered by nuclei, the same for every class.
pub(super) const NUCLEAR_COVERAGE: f32 = 0.2;

/// Gratings summed to make the fibre field.
const FIBRE_GRATINGS: usize = 6;

/// How the nuclei of a patch are placed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Arrangement {
    /// Independently and uniformly (a Poisson process).
    Scattered,
    /// In nests: `per_nest` nuclei on average around each nest centre, Gaussian with
    /// standard deviation `spread` pixels.
    Nested { spread: f32, per_nest: f32 },
    /// On a jittered square lattice: a regular sheet of cells.
    Sheet,
}

/// Which way the long axis of a nucleus points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Orientation {
    /// Uniformly at random.
    Random,
    /// Along the slide's fibre direction, with a normal spread in radians.
    Aligned { spread: f32 },
    /// Tangentially around the patch's whorl centre.
    Whorled,
}

/// The morphology of a class (or, jittered, of one patient).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Morphology {
    /// Mean nuclear radius in pixels (of the circle of the same area).
    pub radius: f32,
    /// Standard deviation of the log radius (pleomorphism).
    pub pleomorphism: f32,
    /// Mean ratio of the long to the short axis, >= 1.
    pub elongation: f32,
    /// Spread of nuclear intensity: each nucleus is `1 - variability * U(0, 1)`.
    pub variability: f32,
    pub arrangement: Arrangement,
    pub orientation: Orientation,
    /// Mean fibre wavelength in pixels.
    pub fibre_wavelength: f32,
    /// Standard deviation of the fibre orientations around the slide's direction, in
    /// radians: small is a coherent, combed texture, large an isotropic meshwork.
    pub fibre_spread: f32,
    /// Fibres are concentric whorls around a centre instead of straight.
    pub whorls: bool,
    /// Weight of the fibres in the tissue field; the rest is blobs.
    pub fibre_share: f32,
    /// Correlation length of the blobs in pixels.
    pub blob_scale: f32,
}

/// The morphology of class `class` (an index into the OpenSRH class list: normal,
/// hgg, lgg, mening, metast, pituita, schwan). Loosely modelled on the tissues, but
/// what matters is that every pair of classes differs in several of these traits.
pub(super) fn class_morphology(class: usize) -> Morphology {
    match class {
        // Normal brain: small regular round nuclei, fine isotropic neuropil.
        0 => Morphology {
            radius: 1.8,
            pleomorphism: 0.08,
            elongation: 1.1,
            variability: 0.15,
            arrangement: Arrangement::Scattered,
            orientation: Orientation::Random,
            fibre_wavelength: 3.5,
            fibre_spread: 1.6,
            whorls: false,
            fibre_share: 0.75,
            blob_scale: 24.0,
        },
        // High-grade glioma: large pleomorphic nuclei in crowded clumps, coarse blobs.
        1 => Morphology {
            radius: 4.0,
            pleomorphism: 0.4,
            elongation: 1.35,
            variability: 0.45,
            arrangement: Arrangement::Nested {
                spread: 9.0,
                per_nest: 7.0,
            },
            orientation: Orientation::Random,
            fibre_wavelength: 12.0,
            fibre_spread: 1.6,
            whorls: false,
            fibre_share: 0.3,
            blob_scale: 10.0,
        },
        // Low-grade glioma: elongated nuclei along coherent medium fibres.
        2 => Morphology {
            radius: 2.5,
            pleomorphism: 0.12,
            elongation: 2.0,
            variability: 0.2,
            arrangement: Arrangement::Scattered,
            orientation: Orientation::Aligned { spread: 0.3 },
            fibre_wavelength: 6.5,
            fibre_spread: 0.3,
            whorls: false,
            fibre_share: 0.7,
            blob_scale: 16.0,
        },
        // Meningioma: oval nuclei wrapped around whorls of concentric fibres.
        3 => Morphology {
            radius: 2.8,
            pleomorphism: 0.12,
            elongation: 1.6,
            variability: 0.2,
            arrangement: Arrangement::Scattered,
            orientation: Orientation::Whorled,
            fibre_wavelength: 5.5,
            fibre_spread: 0.8,
            whorls: true,
            fibre_share: 0.7,
            blob_scale: 18.0,
        },
        // Metastasis: big nuclei in tight nests, smooth stroma between them.
        4 => Morphology {
            radius: 4.2,
            pleomorphism: 0.25,
            elongation: 1.2,
            variability: 0.3,
            arrangement: Arrangement::Nested {
                spread: 6.0,
                per_nest: 10.0,
            },
            orientation: Orientation::Random,
            fibre_wavelength: 8.0,
            fibre_spread: 1.0,
            whorls: false,
            fibre_share: 0.2,
            blob_scale: 12.0,
        },
        // Pituitary adenoma: a regular sheet of round monotonous nuclei, granular background.
        5 => Morphology {
            radius: 2.7,
            pleomorphism: 0.06,
            elongation: 1.0,
            variability: 0.1,
            arrangement: Arrangement::Sheet,
            orientation: Orientation::Random,
            fibre_wavelength: 11.0,
            fibre_spread: 1.2,
            whorls: false,
            fibre_share: 0.15,
            blob_scale: 5.0,
        },
        // Schwannoma: long spindle nuclei and long parallel fibres.
        _ => Morphology {
            radius: 2.2,
            pleomorphism: 0.12,
            elongation: 3.2,
            variability: 0.2,
            arrangement: Arrangement::Scattered,
            orientation: Orientation::Aligned { spread: 0.15 },
            fibre_wavelength: 5.0,
            fibre_spread: 0.12,
            whorls: false,
            fibre_share: 0.9,
            blob_scale: 20.0,
        },
    }
}

impl Morphology {
    /// This class morphology as one patient shows it: sizes and wavelengths scaled by
    /// up to about ±12%, orientation spreads by ±20%. `draws` are five uniforms in
    /// [0, 1).
    pub(super) fn for_patient(&self, draws: [f64; 5]) -> Morphology {
        let scale = |draw: f64, range: f32| (range * (2.0 * draw as f32 - 1.0)).exp();
        Morphology {
            radius: self.radius * scale(draws[0], 0.12),
            elongation: 1.0 + (self.elongation - 1.0) * scale(draws[1], 0.15),
            fibre_wavelength: self.fibre_wavelength * scale(draws[2], 0.12),
            fibre_spread: self.fibre_spread * scale(draws[3], 0.2),
            blob_scale: self.blob_scale * scale(draws[4], 0.15),
            ..self.clone()
        }
    }
}

/// The two fields of a patch, row-major, `size * size` each.
#[derive(Debug, Default)]
pub(super) struct Fields {
    /// Nuclei, in [0, 1].
    pub nuclei: Vec<f32>,
    /// Tissue, zero mean and unit variance over the patch (or all zero).
    pub tissue: Vec<f32>,
    /// Scratch for the blob octaves and the fibre modulation.
    scratch: Vec<f32>,
}

impl Fields {
    fn reset(&mut self, size: usize) {
        for field in [&mut self.nuclei, &mut self.tissue, &mut self.scratch] {
            field.clear();
            field.resize(size * size, 0.0);
        }
    }
}

/// A uniform draw in `[lo, hi)`.
fn uniform(rng: &mut SplitMix64, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.unit() as f32
}

fn normal(rng: &mut SplitMix64) -> f32 {
    rng.normal() as f32
}

/// A cheap bell-shaped draw with mean 0 and variance 1: the sum of four 16-bit
/// uniforms of one `next_u64` (Irwin-Hall), bounded by ±3.46. For the thousands of
/// per-nucleus jitters, where the exact shape does not matter and Box-Muller's
/// logarithm and cosine would dominate the cost.
fn bell(rng: &mut SplitMix64) -> f32 {
    let bits = rng.next_u64();
    let sum: u64 = (0..4).map(|i| (bits >> (16 * i)) & 0xffff).sum();
    // Each uniform has mean 1/2 and variance 1/12; their sum, mean 2 and variance 1/3.
    (sum as f32 / 65535.0 - 2.0) * 3f32.sqrt()
}

/// `sin(x)` without a library call: reduced to [-pi/2, pi/2], then a degree-9 Taylor
/// polynomial. Within 1e-5 plus 3e-7 |x| (the reduction's rounding), plenty for a
/// texture; libm's `sinf` is several times slower, and the rings need one per pixel.
fn fast_sin(x: f32) -> f32 {
    const INV_TAU: f32 = 1.0 / TAU;
    // Truncation toward zero then one correction: r in [-pi, pi].
    let mut r = x - (x * INV_TAU) as i32 as f32 * TAU;
    if r > PI {
        r -= TAU;
    } else if r < -PI {
        r += TAU;
    }
    if r > PI / 2.0 {
        r = PI - r;
    } else if r < -PI / 2.0 {
        r = -PI - r;
    }
    let r2 = r * r;
    r * (1.0
        + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362_880.0)))))
}

/// Renders the morphology `m` into `fields` for one `size` x `size` patch. `fibre_angle`
/// is the slide's dominant fibre direction (radians); `rng` is the patch's own stream.
/// Returns the fraction of the patch that nuclei cover by more than half.
pub(super) fn render(
    m: &Morphology,
    fibre_angle: f32,
    size: usize,
    rng: &mut SplitMix64,
    fields: &mut Fields,
) -> f32 {
    fields.reset(size);
    let side = size as f32;
    // A whorl centre anywhere over the patch and a margin around it.
    let whorl = (
        uniform(rng, -0.25, 1.25) * side,
        uniform(rng, -0.25, 1.25) * side,
    );
    let coverage = render_nuclei(m, fibre_angle, whorl, size, rng, &mut fields.nuclei);
    render_tissue(m, fibre_angle, whorl, size, rng, fields);
    coverage
}

fn render_nuclei(
    m: &Morphology,
    fibre_angle: f32,
    whorl: (f32, f32),
    size: usize,
    rng: &mut SplitMix64,
    out: &mut [f32],
) -> f32 {
    let side = size as f32;
    // Nuclei centred up to a nucleus outside the patch still reach into it.
    let margin = (m.radius * m.elongation.sqrt() * 2.0).ceil() + 1.0;
    let extent = side + 2.0 * margin;
    let mean_area = PI * m.radius * m.radius * (2.0 * m.pleomorphism * m.pleomorphism).exp();
    let count = ((NUCLEAR_COVERAGE * extent * extent / mean_area).round() as usize).max(1);

    // Several times the expected number of centres, in a random order; nuclei are
    // drawn until they cover NUCLEAR_COVERAGE of the patch, so crowding (nests) and
    // size do not change how much of it is nuclear.
    let candidates = 4 * count;
    let mut centres = Vec::with_capacity(candidates);
    match m.arrangement {
        Arrangement::Scattered => {
            for _ in 0..candidates {
                centres.push((
                    uniform(rng, 0.0, extent) - margin,
                    uniform(rng, 0.0, extent) - margin,
                ));
            }
        }
        Arrangement::Nested { spread, per_nest } => {
            let nests = ((count as f32 / per_nest).round() as usize).max(1);
            let nest_centres: Vec<(f32, f32)> = (0..3 * nests)
                .map(|_| {
                    (
                        uniform(rng, 0.0, extent) - margin,
                        uniform(rng, 0.0, extent) - margin,
                    )
                })
                .collect();
            for _ in 0..candidates {
                let (nx, ny) = nest_centres[rng.below(nest_centres.len() as u64) as usize];
                centres.push((nx + spread * bell(rng), ny + spread * bell(rng)));
            }
        }
        Arrangement::Sheet => {
            // A slightly denser lattice than the coverage needs, so it is nearly full.
            let pitch = (extent * extent / count as f32).sqrt() * 0.95;
            let cells = (extent / pitch).ceil() as usize;
            let (ox, oy) = (uniform(rng, 0.0, pitch), uniform(rng, 0.0, pitch));
            let jitter = 0.22 * pitch;
            for gy in 0..cells {
                for gx in 0..cells {
                    centres.push((
                        ox + gx as f32 * pitch - margin + uniform(rng, -jitter, jitter),
                        oy + gy as f32 * pitch - margin + uniform(rng, -jitter, jitter),
                    ));
                }
            }
            rng.shuffle(&mut centres);
        }
    }

    let target = (NUCLEAR_COVERAGE * side * side).round() as usize;
    let mut covered = 0;
    let mut cover = vec![0.0f32; size * size];
    for (cx, cy) in centres {
        if covered >= target {
            break;
        }
        let radius = m.radius * (m.pleomorphism * bell(rng)).exp().clamp(0.5, 2.5);
        let aspect = (m.elongation * (0.1 * bell(rng)).exp()).max(1.0);
        let angle = match m.orientation {
            Orientation::Random => uniform(rng, 0.0, PI),
            Orientation::Aligned { spread } => fibre_angle + spread * bell(rng),
            Orientation::Whorled => (cy - whorl.1).atan2(cx - whorl.0) + PI / 2.0 + 0.2 * bell(rng),
        };
        let intensity = 1.0 - m.variability * rng.unit() as f32;
        let shape = Ellipse {
            centre: (cx, cy),
            radius,
            aspect,
            angle,
            intensity,
        };
        covered += shape.draw(out, &mut cover, size);
    }
    covered as f32 / (side * side)
}

/// A nucleus: a soft ellipse of the area of a circle of `radius`, its long axis
/// `aspect` times the short one, at `angle` radians.
struct Ellipse {
    centre: (f32, f32),
    radius: f32,
    aspect: f32,
    angle: f32,
    /// Value at its centre.
    intensity: f32,
}

impl Ellipse {
    /// Draws the ellipse into `out`, keeping the brighter value where nuclei overlap,
    /// and raises `cover` (how much of each pixel nuclei cover) to its own; returns
    /// how many pixels it took past one half. Branch-free in the pixel loop.
    fn draw(&self, out: &mut [f32], cover: &mut [f32], size: usize) -> usize {
        let Ellipse {
            centre,
            radius,
            aspect,
            angle,
            intensity,
        } = *self;
        let semi_major = radius * aspect.sqrt();
        let semi_minor = radius / aspect.sqrt();
        let (sin, cos) = angle.sin_cos();
        // About one pixel of soft edge, measured across the short axis.
        let sharpness = semi_minor.max(0.75);
        // Half-extents of the rotated ellipse's bounding box, plus the soft edge.
        let reach_x = (semi_major * cos).hypot(semi_minor * sin) + 1.0;
        let reach_y = (semi_major * sin).hypot(semi_minor * cos) + 1.0;
        let x0 = (centre.0 - reach_x).floor().max(0.0) as usize;
        let y0 = (centre.1 - reach_y).floor().max(0.0) as usize;
        let x1 = ((centre.0 + reach_x).ceil().max(0.0) as usize).min(size);
        let y1 = ((centre.1 + reach_y).ceil().max(0.0) as usize).min(size);
        if x0 >= x1 {
            return 0;
        }
        // The pixel's coordinates along and across the long axis, in units of the
        // semi-axes, are linear in dx and dy.
        let (along_x, along_y) = (cos / semi_major, sin / semi_major);
        let (across_x, across_y) = (-sin / semi_minor, cos / semi_minor);
        let mut newly_covered = 0;
        for y in y0..y1 {
            let dy = y as f32 + 0.5 - centre.1;
            let span = y * size + x0..y * size + x1;
            let pixels = out[span.clone()].iter_mut().zip(&mut cover[span]);
            for (i, (pixel, covered)) in pixels.enumerate() {
                let dx = (x0 + i) as f32 + 0.5 - centre.0;
                let along = dx * along_x + dy * along_y;
                let across = dx * across_x + dy * across_y;
                let distance = (along * along + across * across).sqrt();
                let here = ((1.0 - distance) * sharpness + 0.5).clamp(0.0, 1.0);
                newly_covered += usize::from((*covered <= 0.5) & (here > 0.5));
                *covered = covered.max(here);
                *pixel = pixel.max(here * intensity);
            }
        }
        newly_covered
    }
}

fn render_tissue(
    m: &Morphology,
    fibre_angle: f32,
    whorl: (f32, f32),
    size: usize,
    rng: &mut SplitMix64,
    fields: &mut Fields,
) {
    // Blobs: two octaves of value noise.
    let blobs = &mut fields.scratch;
    add_value_noise(blobs, size, m.blob_scale, 1.0, rng);
    if m.blob_scale >= 4.0 {
        add_value_noise(blobs, size, m.blob_scale / 2.0, 0.5, rng);
    }
    standardize(blobs);

    // Fibres, patchy: modulated by slow value noise.
    let fibres = &mut fields.tissue;
    if m.whorls {
        add_rings(fibres, size, whorl, m.fibre_wavelength, rng);
    } else {
        add_gratings(fibres, size, fibre_angle, m, rng);
    }
    let mut modulation = vec![0.0f32; size * size];
    add_value_noise(&mut modulation, size, 4.0 * m.fibre_wavelength, 1.0, rng);
    for (fibre, modulation) in fibres.iter_mut().zip(&modulation) {
        *fibre *= 0.65 + 0.35 * modulation;
    }
    standardize(fibres);

    let share = m.fibre_share;
    for (tissue, blob) in fields.tissue.iter_mut().zip(&fields.scratch) {
        *tissue = share * *tissue + (1.0 - share) * blob;
    }
    standardize(&mut fields.tissue);
}

/// Adds `weight` times smooth value noise of correlation length `spacing` pixels:
/// uniform values in [-1, 1] on a randomly offset lattice, smoothstep-interpolated.
fn add_value_noise(out: &mut [f32], size: usize, spacing: f32, weight: f32, rng: &mut SplitMix64) {
    let spacing = spacing.max(1.0);
    let nodes = (size as f32 / spacing).ceil() as usize + 2;
    let lattice: Vec<f32> = (0..nodes * nodes)
        .map(|_| uniform(rng, -1.0, 1.0))
        .collect();
    let axis = |offset: f32| -> Vec<(usize, f32)> {
        (0..size)
            .map(|i| {
                let position = (i as f32 + offset) / spacing;
                let cell = (position.floor() as usize).min(nodes - 2);
                let t = (position - cell as f32).clamp(0.0, 1.0);
                (cell, t * t * (3.0 - 2.0 * t))
            })
            .collect()
    };
    let columns = axis(uniform(rng, 0.0, spacing));
    let rows = axis(uniform(rng, 0.0, spacing));
    // Columns come in runs that share a lattice cell; within a run, a row of the
    // field is `a + b * wx` (vectorizes).
    let weights_x: Vec<f32> = columns.iter().map(|&(_, w)| w).collect();
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (cell, start, end)
    for (x, &(cell, _)) in columns.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.0 == cell => run.2 = x + 1,
            _ => runs.push((cell, x, x + 1)),
        }
    }
    for (y, &(cy, wy)) in rows.iter().enumerate() {
        let top = &lattice[cy * nodes..(cy + 1) * nodes];
        let bottom = &lattice[(cy + 1) * nodes..(cy + 2) * nodes];
        let row = &mut out[y * size..(y + 1) * size];
        for &(cx, start, end) in &runs {
            let left = top[cx] + wy * (bottom[cx] - top[cx]);
            let right = top[cx + 1] + wy * (bottom[cx + 1] - top[cx + 1]);
            let (a, b) = (weight * left, weight * (right - left));
            for (pixel, &wx) in row[start..end].iter_mut().zip(&weights_x[start..end]) {
                *pixel += a + b * wx;
            }
        }
    }
}

/// Adds [`FIBRE_GRATINGS`] sinusoids of random phase whose directions spread around
/// `fibre_angle` and whose wavelengths spread around the morphology's. Each is
/// separable (`sin(ax + by + p) = sin(ax + p) cos(by) + cos(ax + p) sin(by)`), so a
/// pixel costs two multiply-adds per grating.
fn add_gratings(
    out: &mut [f32],
    size: usize,
    fibre_angle: f32,
    m: &Morphology,
    rng: &mut SplitMix64,
) {
    let mut row_sin = vec![0.0f32; size];
    let mut row_cos = vec![0.0f32; size];
    let mut col_sin = vec![0.0f32; size];
    let mut col_cos = vec![0.0f32; size];
    for _ in 0..FIBRE_GRATINGS {
        // The stripes run along `direction`; the wave vector is perpendicular to it.
        let direction = fibre_angle + m.fibre_spread * normal(rng);
        let wavelength = m.fibre_wavelength * (0.12 * normal(rng)).exp();
        let frequency = TAU / wavelength;
        let (kx, ky) = (-direction.sin() * frequency, direction.cos() * frequency);
        let phase = uniform(rng, 0.0, TAU);
        for i in 0..size {
            let (s, c) = (kx * i as f32 + phase).sin_cos();
            col_sin[i] = s;
            col_cos[i] = c;
            let (s, c) = (ky * i as f32).sin_cos();
            row_sin[i] = s;
            row_cos[i] = c;
        }
        for y in 0..size {
            let (sy, cy) = (row_sin[y], row_cos[y]);
            let row = &mut out[y * size..(y + 1) * size];
            for ((pixel, &sx), &cx) in row.iter_mut().zip(&col_sin).zip(&col_cos) {
                *pixel += sx * cy + cx * sy;
            }
        }
    }
}

/// Adds concentric rings around `centre` (a whorl), wobbling a little along x so they
/// are not perfect circles.
fn add_rings(
    out: &mut [f32],
    size: usize,
    centre: (f32, f32),
    wavelength: f32,
    rng: &mut SplitMix64,
) {
    let frequency = TAU / wavelength;
    let phase = uniform(rng, 0.0, TAU);
    let wobble_frequency = TAU / uniform(rng, 2.0 * wavelength, 4.0 * wavelength);
    let wobble_phase = uniform(rng, 0.0, TAU);
    // The rings breathe a little along x so they are not perfectly circular.
    let wobble: Vec<f32> = (0..size)
        .map(|x| phase + 0.8 * (wobble_frequency * x as f32 + wobble_phase).sin())
        .collect();
    for y in 0..size {
        let dy = y as f32 + 0.5 - centre.1;
        let row = &mut out[y * size..(y + 1) * size];
        for (x, (pixel, &shift)) in row.iter_mut().zip(&wobble).enumerate() {
            let dx = x as f32 + 0.5 - centre.0;
            let distance = (dx * dx + dy * dy).sqrt();
            *pixel += fast_sin(frequency * distance + shift);
        }
    }
}

/// Shifts and scales `values` to zero mean and unit variance; leaves a constant field
/// at zero.
pub(super) fn standardize(values: &mut [f32]) {
    if values.is_empty() {
        return;
    }
    let n = values.len() as f64;
    let mean = sum_f64(values, |v| v) / n;
    let mean32 = mean as f32;
    let variance = sum_f64(values, |v| (v - mean32) * (v - mean32)) / n;
    let sd = variance.sqrt();
    if sd < 1e-6 {
        values.fill(0.0);
        return;
    }
    let scale = (1.0 / sd) as f32;
    for value in values {
        *value = (*value - mean32) * scale;
    }
}

/// The sum of `f(v)` over `values`: eight f32 lanes per block of 1024 values (which
/// the compiler vectorizes), blocks added in f64. The order is fixed, so the result is
/// too.
fn sum_f64(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in values.chunks(1024) {
        let mut lanes = [0.0f32; 8];
        let chunks = block.chunks_exact(8);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f(v);
            }
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
        total += rest.iter().map(|&v| f64::from(f(v))).sum::<f64>();
    }
    total
}

/// Gaussian blur of standard deviation `sigma` pixels (separable, edges clamped).
/// `sigma` below 0.3 leaves the field as it is.
pub(super) fn blur(values: &mut [f32], size: usize, sigma: f32, scratch: &mut Vec<f32>) {
    if sigma < 0.3 || size == 0 {
        return;
    }
    let radius = (2.5 * sigma).ceil() as i32;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|w| *w /= total);

    let radius = radius as usize;
    scratch.clear();
    scratch.resize(values.len(), 0.0);
    // Rows into scratch: each row padded by repeating its end pixels, then one
    // multiply-add pass per kernel tap (vectorizes).
    let mut padded = vec![0.0f32; size + 2 * radius];
    for y in 0..size {
        let row = &values[y * size..(y + 1) * size];
        padded[..radius].fill(row[0]);
        padded[radius..radius + size].copy_from_slice(row);
        padded[radius + size..].fill(row[size - 1]);
        let out = &mut scratch[y * size..(y + 1) * size];
        out.fill(0.0);
        for (k, &w) in kernel.iter().enumerate() {
            for (pixel, &p) in out.iter_mut().zip(&padded[k..k + size]) {
                *pixel += w * p;
            }
        }
    }
    // Columns back into values, rows beyond the edges clamped.
    for y in 0..size {
        let out = &mut values[y * size..(y + 1) * size];
        out.fill(0.0);
        for (k, &w) in kernel.iter().enumerate() {
            let yi = (y + k).saturating_sub(radius).min(size - 1);
            let source = &scratch[yi * size..(yi + 1) * size];
            for (pixel, &s) in out.iter_mut().zip(source) {
                *pixel += w * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage(class: usize, size: usize, seeds: u64) -> f32 {
        let mut fields = Fields::default();
        let mut total = 0.0;
        for seed in 0..seeds {
            let mut rng = SplitMix64::new(seed);
            total += render(&class_morphology(class), 0.3, size, &mut rng, &mut fields);
        }
        total / seeds as f32
    }

    #[test]
    fn every_class_covers_about_the_same_area_with_nuclei() {
        let covers: Vec<f32> = (0..7).map(|class| coverage(class, 96, 12)).collect();
        for cover in &covers {
            // Nuclei are added until the target is reached: never short of candidates.
            assert!(
                (NUCLEAR_COVERAGE..NUCLEAR_COVERAGE + 0.02).contains(cover),
                "{covers:?}"
            );
        }
    }

    #[test]
    fn tissue_is_standardized_and_nuclei_are_in_unit_range() {
        let mut fields = Fields::default();
        for class in 0..7 {
            render(
                &class_morphology(class),
                1.0,
                64,
                &mut SplitMix64::new(5),
                &mut fields,
            );
            let mean = fields.tissue.iter().sum::<f32>() / fields.tissue.len() as f32;
            let var = fields
                .tissue
                .iter()
                .map(|v| (v - mean).powi(2))
                .sum::<f32>()
                / fields.tissue.len() as f32;
            assert!(
                mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-3,
                "{class}: {mean} {var}"
            );
            assert!(fields.nuclei.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn fast_sin_matches_sin() {
        for i in -200_000..200_000 {
            let x = i as f32 * 0.005;
            assert!((fast_sin(x) - x.sin()).abs() < 1e-5 + 3e-7 * x.abs(), "{x}");
        }
    }

    #[test]
    fn bell_has_unit_variance() {
        let mut rng = SplitMix64::new(9);
        let draws: Vec<f32> = (0..100_000).map(|_| bell(&mut rng)).collect();
        let mean = draws.iter().sum::<f32>() / draws.len() as f32;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f32>() / draws.len() as f32;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn blur_keeps_the_mean_and_lowers_the_contrast() {
        let mut values: Vec<f32> = (0..64 * 64)
            .map(|i| {
                if (i / 64 + i % 64) % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let before: f32 = values.iter().sum();
        blur(&mut values, 64, 1.0, &mut Vec::new());
        let after: f32 = values.iter().sum();
        assert!((before - after).abs() < 1.0, "{before} {after}");
        // Away from the clamped edges a one-pixel checkerboard is all but gone.
        let worst = (4..60)
            .flat_map(|y| (4..60).map(move |x| (x, y)))
            .fold(0f32, |m, (x, y)| m.max(values[y * 64 + x].abs()));
        assert!(worst < 0.01, "{worst}");
    }
}
