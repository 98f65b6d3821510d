//! The dataset index: every patient, slide and patch of a dataset on disk, built once
//! at start-up, immutable afterwards, and fingerprinted.
//!
//! The index is the first stage of the data flow (index -> sampler -> scheduler ->
//! worker loader). It holds ids, labels, splits and patch paths, never pixels: it
//! never opens an image, so building it is cheap and it can be shipped to every
//! worker. The [`sampler`](crate::sampler) refers to patients, slides and patches by
//! their position in it, which is why the order of everything here is fixed by the
//! content (sorted ids), never by the order of a file or of a directory listing.
//!
//! Two formats (method.md §1):
//!
//! - **OpenSRH**: `<db_root>/meta/opensrh.json` (patients -> class and slides ->
//!   `normal_patches`/`tumor_patches`) and `<db_root>/meta/train_val_split.json`
//!   (`{"train": [...], "val": [...]}`); see [`DatasetIndex::load_opensrh`].
//! - **Manifest**: a CSV file with the header `patient,slide,path,label,split`, one
//!   row per patch; see [`DatasetIndex::load_manifest`].
//!
//! Problems that make a file unusable (unreadable, malformed, contradictory) are
//! errors of [`DatasetIndex::load`]. Problems that leave a usable index (a slide
//! without patches, a split id unknown to the metadata) are kept in
//! [`IndexNotes`] and judged by [`check`], which also looks at the patch files.
//!
//! Layout: this file (types, errors, assembly, fingerprint), `opensrh` and
//! `manifest` (the two readers), [`check`] (the validation report).

pub mod check;
mod manifest;
mod opensrh;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{DataConfig, DataSource};

/// Which part of the dataset a patient belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    /// Trained on (and the kNN bank of the evaluation).
    Train,
    /// Held out: the evaluation's queries.
    Val,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Val];

    /// `"train"` or `"val"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The on-disk layout an index was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetFormat {
    /// `meta/opensrh.json` + `meta/train_val_split.json`.
    OpenSrh,
    /// A CSV manifest `patient,slide,path,label,split`.
    Manifest,
}

impl DatasetFormat {
    /// `"opensrh"` or `"manifest"`, as `data.source` spells them.
    pub fn name(self) -> &'static str {
        match self {
            DatasetFormat::OpenSrh => "opensrh",
            DatasetFormat::Manifest => "manifest",
        }
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One slide of a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slide {
    /// The slide id, unique within its patient.
    pub id: String,
    /// Patch files, never empty: metadata paths joined to the dataset root (absolute
    /// paths in a manifest are kept), in the order the metadata lists them.
    pub patches: Vec<PathBuf>,
}

/// One patient: a class label, a split and at least one slide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patient {
    /// The patient id, unique in the index.
    pub id: String,
    /// Index into [`DatasetIndex::classes`].
    pub class: usize,
    /// Train or val.
    pub split: Split,
    /// The patient's slides with at least one patch, never empty; sorted by id.
    pub slides: Vec<Slide>,
}

impl Patient {
    /// Patches over all slides.
    pub fn num_patches(&self) -> usize {
        self.slides.iter().map(|slide| slide.patches.len()).sum()
    }
}

/// What the reader left out or could not place, for [`check`] to report. Every list
/// is sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexNotes {
    /// `(patient, slide)` of slides without a usable patch; left out.
    pub dropped_slides: Vec<(String, String)>,
    /// Patients of a split without any slide left; left out (an error in [`check`]).
    pub dropped_patients: Vec<String>,
    /// Ids of the split file that the metadata does not know (an error in [`check`]).
    pub unknown_split_ids: Vec<String>,
    /// Patients of the metadata in no split; left out, as in the reference.
    pub unsplit_patients: Vec<String>,
    /// Patients listed in both train and val; left out (an error in [`check`]).
    pub duplicate_split_ids: Vec<String>,
    /// Ids listed more than once in the same split list; used once.
    pub repeated_split_ids: Vec<String>,
}

/// Every patient, slide and patch of a dataset; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetIndex {
    /// The layout it was read from.
    pub format: DatasetFormat,
    /// The folder relative patch paths were joined to.
    pub root: PathBuf,
    /// Class names, sorted and distinct; [`Patient::class`] indexes this list. Only
    /// classes of indexed patients (either split) appear.
    pub classes: Vec<String>,
    /// Patients of both splits, sorted by id.
    pub patients: Vec<Patient>,
    /// Hex SHA-256 of the index content (format, classes, and for each patient its
    /// id, class, split, slide ids and patch paths relative to `root`): equal for the
    /// same dataset wherever it is stored, different when any id, path, label or
    /// split differs. Checkpoints record it so a resume can tell the data changed.
    pub fingerprint: String,
    /// What was left out while reading.
    pub notes: IndexNotes,
}

/// Why a dataset could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// `data.source` is synthetic: there are no files.
    #[error(
        "data.source = \"synthetic\" has no files to index: set data.source to \"opensrh\" \
         or \"manifest\" to use a dataset on disk"
    )]
    NoFiles,
    /// A config key the source needs is empty.
    #[error("{key} is empty: set it to {what} when data.source = \"{data_source}\"")]
    MissingSetting {
        /// The dotted config key.
        key: &'static str,
        /// The source that needs it.
        data_source: DataSource,
        /// What the key must hold.
        what: &'static str,
    },
    /// A metadata, split or manifest file cannot be read.
    #[error("cannot read {what} {} ({hint})", path.display())]
    Read {
        /// Which file it is (`the OpenSRH metadata`).
        what: &'static str,
        /// The path tried.
        path: PathBuf,
        /// What to check.
        hint: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON or does not have the expected layout.
    #[error("{}: {location}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Where in it: `line 3, column 17`.
        location: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A manifest has problems: header, rows, contradictions. All found are listed.
    #[error(
        "manifest {} has {} to fix:{}",
        path.display(),
        count(problems.len(), "problem"),
        listed(problems)
    )]
    Manifest {
        /// The CSV file.
        path: PathBuf,
        /// One message per problem, each starting with its line: `line 7: ...`.
        problems: Vec<String>,
    },
}

/// `1 problem`, `3 problems`.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Problems shown in an error message, one per line; long lists are cut.
fn listed(problems: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text: String = problems
        .iter()
        .take(SHOWN)
        .map(|problem| format!("\n  {problem}"))
        .collect();
    if problems.len() > SHOWN {
        text.push_str(&format!("\n  ... and {} more", problems.len() - SHOWN));
    }
    text
}

impl DatasetIndex {
    /// Indexes the dataset `cfg` names (`data.source`, `data.db_root`, ...).
    pub fn load(cfg: &DataConfig) -> Result<DatasetIndex, DatasetError> {
        match cfg.source {
            DataSource::Synthetic => Err(DatasetError::NoFiles),
            DataSource::OpenSrh => {
                if cfg.db_root.as_os_str().is_empty() {
                    return Err(DatasetError::MissingSetting {
                        key: "data.db_root",
                        data_source: cfg.source,
                        what: "the OpenSRH folder (the one holding meta/)",
                    });
                }
                Self::load_opensrh(&cfg.db_root, &cfg.meta_json, &cfg.meta_split_json)
            }
            DataSource::Manifest => {
                let Some(manifest) = &cfg.manifest else {
                    return Err(DatasetError::MissingSetting {
                        key: "data.manifest",
                        data_source: cfg.source,
                        what: "the CSV file listing the patches",
                    });
                };
                let root = (!cfg.db_root.as_os_str().is_empty()).then_some(cfg.db_root.as_path());
                Self::load_manifest(manifest, root)
            }
        }
    }

    /// Indexes OpenSRH at `root`: reads `<root>/meta/<meta_json>` and
    /// `<root>/meta/<split_json>`.
    ///
    /// A patient of class `normal` contributes its slides' `normal_patches`, any other
    /// class its `tumor_patches` (other keys of a slide are ignored); patch paths are
    /// relative to `root`. Slides without a usable patch, patients left without a
    /// slide, patients in no split or in both, and split ids the metadata does not
    /// know are left out and recorded in [`IndexNotes`].
    pub fn load_opensrh(
        root: &Path,
        meta_json: &str,
        split_json: &str,
    ) -> Result<DatasetIndex, DatasetError> {
        opensrh::load(root, meta_json, split_json)
    }

    /// Indexes the CSV manifest `csv`: header `patient,slide,path,label,split` (any
    /// column order, nothing else), one row per patch; `split` is `train` or `val`
    /// (`valid` is accepted), `label` the class name. Relative paths are joined to
    /// `root`, or to the manifest's folder when `root` is `None`.
    ///
    /// Slides are sorted by id; patches keep the order of their rows. A patient with
    /// two labels or two splits, a repeated row, an empty field or a bad split is an
    /// error naming the lines.
    pub fn load_manifest(csv: &Path, root: Option<&Path>) -> Result<DatasetIndex, DatasetError> {
        manifest::load(csv, root)
    }

    /// Positions in [`patients`](Self::patients) of the patients of `split`, in index
    /// (id) order.
    pub fn patients_in(&self, split: Split) -> Vec<usize> {
        self.patients
            .iter()
            .enumerate()
            .filter(|(_, patient)| patient.split == split)
            .map(|(position, _)| position)
            .collect()
    }

    /// Patches over all patients and slides.
    pub fn num_patches(&self) -> usize {
        self.patients.iter().map(Patient::num_patches).sum()
    }
}

/// A patient as a reader found it, before classes are numbered.
#[derive(Debug, Clone)]
pub(crate) struct PatientEntry {
    pub id: String,
    pub class: String,
    pub split: Split,
    pub slides: Vec<Slide>,
}

/// Numbers the classes, orders patients and notes, and fingerprints the result.
///
/// Callers give distinct patient ids and non-empty slides of non-empty patches.
pub(crate) fn assemble(
    format: DatasetFormat,
    root: PathBuf,
    mut entries: Vec<PatientEntry>,
    mut notes: IndexNotes,
) -> DatasetIndex {
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    debug_assert!(entries.windows(2).all(|pair| pair[0].id != pair[1].id));
    debug_assert!(entries.iter().all(|entry| !entry.slides.is_empty()
        && entry.slides.iter().all(|slide| !slide.patches.is_empty())));
    let classes: Vec<String> = entries
        .iter()
        .map(|entry| entry.class.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let patients: Vec<Patient> = entries
        .into_iter()
        .map(|entry| Patient {
            // Every entry's class is in `classes`, which is sorted.
            class: classes.binary_search(&entry.class).unwrap_or_default(),
            id: entry.id,
            split: entry.split,
            slides: entry.slides,
        })
        .collect();
    notes.dropped_slides.sort();
    notes.dropped_patients.sort();
    notes.unknown_split_ids.sort();
    notes.unsplit_patients.sort();
    notes.duplicate_split_ids.sort();
    notes.repeated_split_ids.sort();
    let fingerprint = fingerprint(format, &root, &classes, &patients);
    DatasetIndex {
        format,
        root,
        classes,
        patients,
        fingerprint,
        notes,
    }
}

/// Feeds an unambiguous serialisation into SHA-256: every text is preceded by its
/// length and every list by its count, so no two different indexes write the same
/// bytes.
struct Canonical(Sha256);

impl Canonical {
    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }

    fn text(&mut self, text: &str) {
        self.count(text.len());
        self.0.update(text.as_bytes());
    }
}

/// `path` relative to `root` (or whole, when it is not under it), with `/` between
/// components whatever the platform.
fn relative_text(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    relative
        .components()
        .map(|component| component.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn fingerprint(
    format: DatasetFormat,
    root: &Path,
    classes: &[String],
    patients: &[Patient],
) -> String {
    let mut canonical = Canonical(Sha256::new());
    canonical.text("hsat dataset index v1");
    canonical.text(format.name());
    canonical.count(classes.len());
    for class in classes {
        canonical.text(class);
    }
    canonical.count(patients.len());
    for patient in patients {
        canonical.text(&patient.id);
        canonical.text(&classes[patient.class]);
        canonical.text(patient.split.name());
        canonical.count(patient.slides.len());
        for slide in &patient.slides {
            canonical.text(&slide.id);
            canonical.count(slide.patches.len());
            for patch in &slide.patches {
                canonical.text(&relative_text(root, patch));
            }
        }
    }
    canonical
        .0
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
