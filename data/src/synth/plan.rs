//! The dataset before any pixel: patients, slides and patches with their ids, paths,
//! splits and the random parameters of each level. Pure: no I/O.
//!
//! Every parameter comes from its own [`derive_seed`] stream, so a patient's stain does
//! not depend on how many slides it has, and a patch's pixels depend only on the spec's
//! seed and the patch's coordinates (and its patient's and slide's parameters).
//!
//! Patient stains are **stratified within each class**: for each stain parameter the
//! class's patients take one value from each of `patients_per_class` equal slices of
//! its range, in a random order. Every class then spans the whole range with nearly
//! the same mean, so patients differ widely in colour while the class means stay
//! close: colour says who the patient is, not what they have. Slide brightness and
//! blur are stratified within each patient in the same way.

use hsat_core::rng::{SplitMix64, derive_seed};

use super::texture::{Morphology, class_morphology};
use super::{SynthFormat, SynthSpec};

// Tags of the derive_seed paths, one per kind of draw.
const TAG_STAIN_ORDER: u64 = 0x5e_0001;
const TAG_STAIN: u64 = 0x5e_0002;
const TAG_MORPHOLOGY: u64 = 0x5e_0003;
const TAG_SLIDE_ORDER: u64 = 0x5e_0004;
const TAG_SLIDE: u64 = 0x5e_0005;
const TAG_PATCH: u64 = 0x5e_0006;

/// Width of a slide in patches: patch positions (for the illumination gradient) are
/// drawn over a square of this many patch sides.
pub(super) const SLIDE_SPAN: f32 = 8.0;

/// Number of stain parameters drawn per patient (see [`Stain::from_quantiles`]).
const STAIN_PARAMETERS: usize = 8;

/// A patient's stain, applied to every pixel of every one of its patches.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stain {
    /// Per-channel gain (CH2, CH3, - for SRH; R, G, B for H&E).
    pub gain: [f32; 3],
    /// Per-channel offset, in units of the full range.
    pub offset: [f32; 3],
    /// How strongly nuclei take up their stain (hematoxylin, or CH3 protein signal).
    pub nuclear: f32,
    /// How strongly the tissue takes up its stain (eosin, or CH2 lipid signal).
    pub tissue: f32,
}

impl Stain {
    /// The stain whose parameters sit at quantiles `q` (each in [0, 1)) of their ranges.
    fn from_quantiles(q: [f64; STAIN_PARAMETERS], format: SynthFormat) -> Stain {
        let at = |i: usize, lo: f32, hi: f32| lo + (hi - lo) * q[i] as f32;
        let (gain, offset) = match format {
            SynthFormat::OpenSrh => {
                // One overall gain and a CH3/CH2 balance, so CH3 - CH2 stays sensible.
                let overall = at(0, 0.75, 1.3);
                let balance = at(1, 0.93, 1.07);
                (
                    [overall / balance, overall * balance, 1.0],
                    [at(3, -0.03, 0.03), at(4, -0.03, 0.03), 0.0],
                )
            }
            SynthFormat::Manifest => (
                [at(0, 0.82, 1.12), at(1, 0.82, 1.12), at(2, 0.82, 1.12)],
                [at(3, -0.05, 0.05), at(4, -0.05, 0.05), at(5, -0.05, 0.05)],
            ),
        };
        Stain {
            gain,
            offset,
            nuclear: at(6, 0.75, 1.25),
            tissue: at(7, 0.75, 1.25),
        }
    }
}

/// How a slide was imaged.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlideLook {
    /// Multiplies every channel.
    pub brightness: f32,
    /// Gaussian blur (defocus) in pixels; below 0.3 none.
    pub blur: f32,
    /// Dominant fibre direction, radians.
    pub fibre_angle: f32,
    /// Strength of the illumination gradient across the slide.
    pub gradient: f32,
    /// Direction of the illumination gradient, radians.
    pub gradient_angle: f32,
}

/// One patch to render.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PatchPlan {
    /// File path relative to the output directory, with `/` separators.
    pub path: String,
    /// Seed of the patch's own stream (its structures and position on the slide).
    pub seed: u64,
}

/// One slide.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlidePlan {
    /// `"1"`, `"2"`, ...
    pub id: String,
    pub look: SlideLook,
    pub patches: Vec<PatchPlan>,
}

/// One patient.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PatientPlan {
    /// `SYN_001`, ...
    pub id: String,
    /// Index into [`CLASS_NAMES`](super::CLASS_NAMES).
    pub class: usize,
    pub val: bool,
    pub stain: Stain,
    pub morphology: Morphology,
    pub slides: Vec<SlidePlan>,
}

/// The whole dataset.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub patients: Vec<PatientPlan>,
}

impl Plan {
    /// Patches over all patients.
    pub(super) fn patch_count(&self) -> usize {
        self.patients
            .iter()
            .flat_map(|p| &p.slides)
            .map(|s| s.patches.len())
            .sum()
    }

    /// Slides over all patients.
    pub(super) fn slide_count(&self) -> usize {
        self.patients.iter().map(|p| p.slides.len()).sum()
    }

    /// Every patch as (patient index, slide index, patch index).
    pub(super) fn patch_coordinates(&self) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::with_capacity(self.patch_count());
        for (p, patient) in self.patients.iter().enumerate() {
            for (s, slide) in patient.slides.iter().enumerate() {
                out.extend((0..slide.patches.len()).map(|k| (p, s, k)));
            }
        }
        out
    }
}

/// `n` values, one uniformly inside each of the slices `[i/n, (i+1)/n)`, in a random
/// order: `order_seed` picks the order, `jitter_seed(j)` the position of value `j`
/// inside its slice.
fn stratified(n: usize, order_seed: u64, jitter_seed: impl Fn(usize) -> u64) -> Vec<f64> {
    let mut slices: Vec<usize> = (0..n).collect();
    SplitMix64::new(order_seed).shuffle(&mut slices);
    slices
        .into_iter()
        .enumerate()
        .map(|(j, slice)| (slice as f64 + SplitMix64::new(jitter_seed(j)).unit()) / n as f64)
        .collect()
}

/// Number of digits of patient numbers: at least 3 (`SYN_001`).
fn id_width(patients: usize) -> usize {
    patients.to_string().len().max(3)
}

/// Lays out the dataset of `spec` (which must be valid).
///
/// Patient `i` (0-based) is `SYN_<i+1>` of class `i % classes`, the `i / classes`-th
/// patient of its class; the last `val_patients_per_class` of each class are val.
pub(super) fn plan(spec: &SynthSpec) -> Plan {
    let seed = spec.seed;
    let total = spec.classes * spec.patients_per_class;
    let width = id_width(total);
    let extension = match spec.format {
        SynthFormat::OpenSrh => "tif",
        SynthFormat::Manifest => "png",
    };

    // Stain quantiles: [class][parameter] -> one value per patient of the class.
    let quantiles: Vec<Vec<Vec<f64>>> = (0..spec.classes)
        .map(|class| {
            (0..STAIN_PARAMETERS)
                .map(|parameter| {
                    stratified(
                        spec.patients_per_class,
                        derive_seed(seed, &[TAG_STAIN_ORDER, class as u64, parameter as u64]),
                        |j| {
                            derive_seed(
                                seed,
                                &[TAG_STAIN, class as u64, j as u64, parameter as u64],
                            )
                        },
                    )
                })
                .collect()
        })
        .collect();

    let patients = (0..total)
        .map(|i| {
            let class = i % spec.classes;
            let within = i / spec.classes;
            let id = format!("SYN_{:0width$}", i + 1);
            // `stain_spread` shrinks every range around its middle: at 0 all patients
            // share one stain and morphology is the only thing telling them apart.
            let q: [f64; STAIN_PARAMETERS] = std::array::from_fn(|parameter| {
                0.5 + (quantiles[class][parameter][within] - 0.5) * spec.stain_spread
            });
            let stain = Stain::from_quantiles(q, spec.format);
            let mut rng = SplitMix64::new(derive_seed(seed, &[TAG_MORPHOLOGY, i as u64]));
            let morphology =
                class_morphology(class).for_patient(std::array::from_fn(|_| rng.unit()));
            let slides = plan_slides(spec, i, &id, extension);
            PatientPlan {
                id,
                class,
                val: within >= spec.patients_per_class - spec.val_patients_per_class,
                stain,
                morphology,
                slides,
            }
        })
        .collect();
    Plan { patients }
}

fn plan_slides(
    spec: &SynthSpec,
    patient: usize,
    patient_id: &str,
    extension: &str,
) -> Vec<SlidePlan> {
    let seed = spec.seed;
    let n = spec.slides_per_patient;
    let level = |parameter: u64| {
        stratified(
            n,
            derive_seed(seed, &[TAG_SLIDE_ORDER, patient as u64, parameter]),
            |s| derive_seed(seed, &[TAG_SLIDE, patient as u64, s as u64, parameter]),
        )
    };
    let brightness = level(0);
    let blur = level(1);
    (0..n)
        .map(|s| {
            let id = (s + 1).to_string();
            let mut rng = SplitMix64::new(derive_seed(seed, &[TAG_SLIDE, patient as u64, s as u64, 99]));
            let look = SlideLook {
                brightness: 0.95 + 0.1 * brightness[s] as f32,
                blur: 0.6 * blur[s] as f32,
                fibre_angle: std::f32::consts::PI * rng.unit() as f32,
                gradient: 0.02 + 0.05 * rng.unit() as f32,
                gradient_angle: std::f32::consts::TAU * rng.unit() as f32,
            };
            let patches = (0..spec.patches_per_slide)
                .map(|k| {
                    let path = match spec.format {
                        SynthFormat::OpenSrh => {
                            format!("studies/{patient_id}/{id}/patches/{patient_id}-{id}-{}.{extension}", k + 1)
                        }
                        SynthFormat::Manifest => format!("tiles/{patient_id}/{id}/{}.{extension}", k + 1),
                    };
                    PatchPlan {
                        path,
                        seed: derive_seed(seed, &[TAG_PATCH, patient as u64, s as u64, k as u64]),
                    }
                })
                .collect();
            SlidePlan { id, look, patches }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: SynthFormat) -> SynthSpec {
        SynthSpec::new("unused", format)
    }

    #[test]
    fn ids_classes_splits_and_paths() {
        let plan = plan(&spec(SynthFormat::OpenSrh));
        assert_eq!(plan.patients.len(), 12);
        assert_eq!(plan.slide_count(), 24);
        assert_eq!(plan.patch_count(), 96);
        let first = &plan.patients[0];
        assert_eq!(
            (first.id.as_str(), first.class, first.val),
            ("SYN_001", 0, false)
        );
        assert_eq!(first.slides[1].id, "2");
        assert_eq!(
            first.slides[1].patches[3].path,
            "studies/SYN_001/2/patches/SYN_001-2-4.tif"
        );
        for class in 0..3 {
            let val: Vec<&str> = plan
                .patients
                .iter()
                .filter(|p| p.class == class && p.val)
                .map(|p| p.id.as_str())
                .collect();
            assert_eq!(val.len(), 1, "{class}");
        }
        assert!(plan.patients[9].val && plan.patients[11].val && !plan.patients[8].val);
        let manifest = plan_of(SynthFormat::Manifest);
        assert_eq!(
            manifest.patients[2].slides[0].patches[0].path,
            "tiles/SYN_003/1/1.png"
        );
    }

    fn plan_of(format: SynthFormat) -> Plan {
        plan(&spec(format))
    }

    #[test]
    fn stratified_values_take_one_slice_each() {
        let values = stratified(5, 1, |j| j as u64 + 10);
        let mut slices: Vec<usize> = values.iter().map(|v| (v * 5.0) as usize).collect();
        slices.sort_unstable();
        assert_eq!(slices, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn class_means_of_the_stain_are_close_while_patients_spread() {
        let mut s = spec(SynthFormat::OpenSrh);
        s.classes = 7;
        s.patients_per_class = 6;
        let plan = plan(&s);
        let gain = |p: &PatientPlan| f64::from(p.stain.gain[1]);
        let all: Vec<f64> = plan.patients.iter().map(gain).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let sd = (all.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
        for class in 0..7 {
            let of_class: Vec<f64> = plan
                .patients
                .iter()
                .filter(|p| p.class == class)
                .map(gain)
                .collect();
            let class_mean = of_class.iter().sum::<f64>() / of_class.len() as f64;
            assert!(
                (class_mean - mean).abs() < 0.25 * sd,
                "{class}: {class_mean} vs {mean} (sd {sd})"
            );
        }
    }

    #[test]
    fn a_patients_stain_does_not_depend_on_its_slides() {
        let mut more = spec(SynthFormat::OpenSrh);
        more.slides_per_patient = 5;
        let (a, b) = (plan(&spec(SynthFormat::OpenSrh)), plan(&more));
        assert_eq!(a.patients[4].stain, b.patients[4].stain);
        assert_eq!(
            a.patients[4].slides[1].patches[0],
            b.patients[4].slides[1].patches[0]
        );
    }
}
