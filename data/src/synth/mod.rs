//! `hsat synth`: writes a synthetic dataset to disk, as real image files with the
//! patient -> slide -> patch hierarchy, in either format hsat reads (method.md §1).
//!
//! It is the first stage of a run on fabricated data: `hsat synth` -> dataset index
//! -> sampler -> loader -> training -> kNN evaluation. The images are made so that
//! the evaluation means something: **class is texture** (the size, shape and
//! arrangement of nuclei, the wavelength and orientation spread of fibres, the scale of
//! blobs), never mean colour or brightness; **patient is stain** (per-channel gain and
//! offset, stratified so every class spans the same range); **slide is optics**
//! (brightness, blur, an illumination gradient); **patch** is its own random
//! placement of every structure. A model that learns the hierarchy can beat chance at
//! kNN patient classification; per-class mean pixel values give nothing away.
//!
//! Formats:
//!
//! - `opensrh`: `meta/opensrh.json`, `meta/train_val_split.json` and 2-channel
//!   16-bit TIFF patches (CH2, CH3) at
//!   `studies/<patient>/<slide>/patches/<patient>-<slide>-<k>.tif`, written in exactly
//!   the layout `tifffile.imwrite` gives a `(2, H, W)` `uint16` array;
//! - `manifest`: `manifest.csv` (`patient,slide,path,label,split`) and RGB 8-bit PNG
//!   tiles in an H&E-like palette at `tiles/<patient>/<slide>/<k>.png`.
//!
//! The same spec gives byte-identical files, whatever the number of threads.
//!
//! Layout: this file (the spec, the summary, the error and [`synthesize`]), `plan`
//! (ids, paths, splits and the random parameters of each level; pure), `texture`
//! (class morphology), `render` (stain and optics to pixels), `tiff` (the TIFF
//! writer), `output` (the directory, markers, metadata and the parallel writer). The
//! folder's README lists the invariants.

mod output;
mod plan;
mod render;
mod texture;
mod tiff;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Class names, in OpenSRH's order; a dataset of `n` classes uses the first `n`.
pub const CLASS_NAMES: [&str; 7] = [
    "normal", "hgg", "lgg", "mening", "metast", "pituita", "schwan",
];

/// Name of the marker file of a finished output (written last).
pub const COMPLETE_MARKER: &str = ".hsat-synth-complete";

/// Name of the marker file of an output being written (written first, renamed to
/// [`COMPLETE_MARKER`] at the end): if it is there, the run was interrupted.
pub const INCOMPLETE_MARKER: &str = ".hsat-synth-incomplete";

/// Most patches one run may write (a guard against typos in the counts).
pub const MAX_PATCHES: usize = 10_000_000;

/// The on-disk layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynthFormat {
    /// OpenSRH: JSON metadata and 2-channel 16-bit TIFF patches.
    OpenSrh,
    /// A CSV manifest and RGB PNG tiles.
    Manifest,
}

impl SynthFormat {
    /// `"opensrh"` or `"manifest"`, as `data.source` spells them.
    pub fn name(self) -> &'static str {
        match self {
            SynthFormat::OpenSrh => "opensrh",
            SynthFormat::Manifest => "manifest",
        }
    }
}

impl fmt::Display for SynthFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthFormat {
    type Err = SynthError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "opensrh" => Ok(SynthFormat::OpenSrh),
            "manifest" => Ok(SynthFormat::Manifest),
            other => Err(SynthError::UnknownFormat(other.to_owned())),
        }
    }
}

/// What to generate. [`SynthSpec::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Output directory: absent, empty, or a previous complete `hsat synth` output
    /// (which is replaced).
    pub out: PathBuf,
    /// Layout and image type.
    pub format: SynthFormat,
    /// Number of classes, 2 ..= 7 (the first names of [`CLASS_NAMES`]); default 3.
    pub classes: usize,
    /// Patients per class, train and val together, >= 1; default 4.
    pub patients_per_class: usize,
    /// Of those, patients per class in the val split, < `patients_per_class` (every
    /// class keeps a train patient); default 1.
    pub val_patients_per_class: usize,
    /// Slides per patient, >= 1; default 2.
    pub slides_per_patient: usize,
    /// Patches per slide, >= 1; default 4.
    pub patches_per_slide: usize,
    /// Patch side in pixels, 8 ..= 1024; default 64 (OpenSRH patches are 300).
    pub size: usize,
    /// Seed: the same spec gives byte-identical files; default 0.
    pub seed: u64,
    /// How far patients' stains spread, as a fraction of the full ranges, 0 ..= 1;
    /// default 1. Small values make class morphology, not the patient's stain, the
    /// strongest signal a patient's patches share (what a kNN over learned features
    /// then picks up).
    pub stain_spread: f64,
}

impl SynthSpec {
    /// The default dataset (3 classes x 4 patients x 2 slides x 4 patches of 64 px,
    /// seed 0) in `format` at `out`.
    pub fn new(out: impl Into<PathBuf>, format: SynthFormat) -> Self {
        SynthSpec {
            out: out.into(),
            format,
            classes: 3,
            patients_per_class: 4,
            val_patients_per_class: 1,
            slides_per_patient: 2,
            patches_per_slide: 4,
            size: 64,
            seed: 0,
            stain_spread: 1.0,
        }
    }

    /// Checks the counts and the size; the first problem found.
    pub fn validate(&self) -> Result<(), SynthError> {
        let problem = |field: &'static str, value: usize, rule: &str| {
            Err(SynthError::Spec {
                field,
                value,
                rule: rule.to_owned(),
            })
        };
        if !(2..=CLASS_NAMES.len()).contains(&self.classes) {
            return problem(
                "classes",
                self.classes,
                "must be 2 to 7 (one per OpenSRH class name: normal, hgg, lgg, mening, metast, pituita, schwan)",
            );
        }
        if self.patients_per_class == 0 {
            return problem("patients_per_class", 0, "must be at least 1");
        }
        if self.val_patients_per_class >= self.patients_per_class {
            return Err(SynthError::Spec {
                field: "val_patients_per_class",
                value: self.val_patients_per_class,
                rule: format!(
                    "must be less than patients_per_class ({}) so every class keeps a train patient; \
                     lower it or raise patients_per_class",
                    self.patients_per_class
                ),
            });
        }
        if self.slides_per_patient == 0 {
            return problem("slides_per_patient", 0, "must be at least 1");
        }
        if self.patches_per_slide == 0 {
            return problem("patches_per_slide", 0, "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.stain_spread) {
            return Err(SynthError::Spec {
                field: "stain_spread",
                value: 0,
                rule: format!(
                    "must be between 0 and 1 (got {}): the fraction of the stain ranges patients spread over",
                    self.stain_spread
                ),
            });
        }
        if !(8..=1024).contains(&self.size) {
            return problem(
                "size",
                self.size,
                "must be 8 to 1024 pixels (OpenSRH patches are 300)",
            );
        }
        let patches = [
            self.patients_per_class,
            self.slides_per_patient,
            self.patches_per_slide,
        ]
        .iter()
        .try_fold(self.classes, |total, &n| total.checked_mul(n));
        if patches.is_none_or(|n| n > MAX_PATCHES) {
            return Err(SynthError::Spec {
                field: "patches_per_slide",
                value: self.patches_per_slide,
                rule: format!(
                    "classes x patients_per_class x slides_per_patient x patches_per_slide must be at \
                     most {MAX_PATCHES}; lower one of them"
                ),
            });
        }
        Ok(())
    }
}

/// What [`synthesize`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// Patients written (train and val).
    pub patients: usize,
    /// Slides written.
    pub slides: usize,
    /// Patch files written.
    pub patches: usize,
    /// Bytes written: patches, metadata and markers.
    pub bytes: u64,
    /// The `data.*` config lines (TOML, dotted keys, for the top level of a config
    /// file) that train on the dataset, one per line.
    pub config_hint: String,
}

/// Everything that can stop [`synthesize`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A count or the size is out of range.
    #[error("{field} = {value}: {rule}")]
    Spec {
        /// The [`SynthSpec`] field.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The rule it breaks, and what to do.
        rule: String,
    },

    /// A format name that is neither `opensrh` nor `manifest`.
    #[error("unknown dataset format {0:?}: use \"opensrh\" or \"manifest\"")]
    UnknownFormat(String),

    /// The output path exists and is a file.
    #[error("{} exists and is not a directory: choose another output directory", path.display())]
    NotADirectory {
        /// The output path.
        path: PathBuf,
    },

    /// The output directory holds files that no `hsat synth` run wrote.
    #[error(
        "{} is not empty and is not an hsat synth output (it holds {entries}): choose a new or \
         empty directory, or delete this one",
        path.display()
    )]
    NotEmpty {
        /// The output directory.
        path: PathBuf,
        /// A few of the entries found.
        entries: String,
    },

    /// A previous run into the directory did not finish.
    #[error(
        "{} holds an unfinished hsat synth output ({INCOMPLETE_MARKER} is there: the run that \
         wrote it was interrupted or failed): delete the directory and run hsat synth again",
        path.display()
    )]
    Interrupted {
        /// The output directory.
        path: PathBuf,
    },

    /// A previous complete output, plus files that `hsat synth` does not write.
    #[error(
        "{} holds an hsat synth output but also {entries}, which hsat synth did not write: move \
         them out of the directory or choose another one",
        path.display()
    )]
    Foreign {
        /// The output directory.
        path: PathBuf,
        /// The entries that are not ours.
        entries: String,
    },

    /// Reading or writing a file or directory failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`writing`, `creating`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The PNG encoder failed.
    #[error("encoding {}: {source}", path.display())]
    Png {
        /// The tile being written.
        path: PathBuf,
        /// The encoder's error.
        source: png::EncodingError,
    },
}

impl SynthError {
    /// Wraps an I/O error with what was being done and to which path.
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| SynthError::Io {
            action,
            path,
            source,
        }
    }
}

/// Writes the dataset of `spec` and returns what it wrote. `progress(done, total)` is
/// called (on the calling thread) with the number of patch files written so far,
/// first with `done = 0`.
///
/// The output directory must be absent, empty, or a previous complete `hsat synth`
/// output (then its files are replaced). A marker written first and renamed last
/// ([`INCOMPLETE_MARKER`] -> [`COMPLETE_MARKER`]) tells a finished output from an
/// interrupted one; the metadata (`meta/*.json` or `manifest.csv`) is written after
/// every patch, so it never lists a file that is not there.
pub fn synthesize(
    spec: &SynthSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary, SynthError> {
    spec.validate()?;
    let plan = plan::plan(spec);
    output::write(spec, &plan, progress)
}
