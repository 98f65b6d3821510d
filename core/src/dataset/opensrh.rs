//! The OpenSRH reader: `meta/opensrh.json` and `meta/train_val_split.json`.
//!
//! Both files are deserialized into `BTreeMap`s, so patients and slides are visited
//! in sorted id order whatever the order of the file. Lists of patches are read as
//! typed vectors (not a generic JSON tree): the metadata of the full dataset lists
//! millions of paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    DatasetError, DatasetFormat, DatasetIndex, IndexNotes, PatientEntry, Slide, Split, assemble,
};

/// The class whose patients contribute `normal_patches` (all others `tumor_patches`).
const NORMAL_CLASS: &str = "normal";

/// The layout `meta/opensrh.json` must have, for messages.
const META_LAYOUT: &str = "expected {patient_id: {\"class\": name, \"slides\": {slide_id: \
                           {\"normal_patches\": [path, ...], \"tumor_patches\": [path, ...]}}}}";

/// The layout of the split file, for messages.
const SPLIT_LAYOUT: &str = "expected {\"train\": [patient_id, ...], \"val\": [patient_id, ...]}";

/// One patient of the metadata; other keys are ignored.
#[derive(Debug, Deserialize)]
struct MetaPatient {
    class: String,
    slides: BTreeMap<String, MetaSlide>,
}

/// One slide of the metadata; a missing list is empty, other keys (for example
/// `nondiagnostic_patches`) are ignored.
#[derive(Debug, Deserialize)]
struct MetaSlide {
    #[serde(default)]
    normal_patches: Vec<String>,
    #[serde(default)]
    tumor_patches: Vec<String>,
}

/// The split file; other keys are ignored.
#[derive(Debug, Deserialize)]
struct SplitFile {
    train: Vec<String>,
    val: Vec<String>,
}

pub(super) fn load(
    root: &Path,
    meta_json: &str,
    split_json: &str,
) -> Result<DatasetIndex, DatasetError> {
    let meta_dir = root.join("meta");
    let hint = |name: &str| {
        format!(
            "data.db_root must be the OpenSRH folder, the one holding meta/{name}; check the path \
             and its permissions"
        )
    };
    let meta: BTreeMap<String, MetaPatient> = read_json(
        &meta_dir.join(meta_json),
        "the OpenSRH metadata",
        hint(meta_json),
        META_LAYOUT,
    )?;
    let split: SplitFile = read_json(
        &meta_dir.join(split_json),
        "the OpenSRH split file",
        hint(split_json),
        SPLIT_LAYOUT,
    )?;

    let mut notes = IndexNotes::default();
    let splits = assign_splits(&split, &mut notes);
    notes.unknown_split_ids = splits
        .keys()
        .filter(|id| !meta.contains_key(*id))
        .cloned()
        .collect();

    let mut entries = Vec::new();
    for (id, patient) in meta {
        let split = match splits.get(&id) {
            Some(Placement::One(split)) => *split,
            Some(Placement::Both) => continue, // noted in duplicate_split_ids
            None => {
                notes.unsplit_patients.push(id);
                continue;
            }
        };
        let normal = patient.class == NORMAL_CLASS;
        let mut slides = Vec::new();
        for (slide_id, slide) in patient.slides {
            let listed = if normal {
                slide.normal_patches
            } else {
                slide.tumor_patches
            };
            if listed.is_empty() {
                notes.dropped_slides.push((id.clone(), slide_id));
                continue;
            }
            slides.push(Slide {
                id: slide_id,
                patches: listed.iter().map(|path| root.join(path)).collect(),
            });
        }
        if slides.is_empty() {
            notes.dropped_patients.push(id);
            continue;
        }
        entries.push(PatientEntry {
            id,
            class: patient.class,
            split,
            slides,
        });
    }
    Ok(assemble(
        DatasetFormat::OpenSrh,
        root.to_path_buf(),
        entries,
        notes,
    ))
}

/// Where the split file puts a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    One(Split),
    /// In both lists: unusable (val would leak into training).
    Both,
}

/// Each listed id's placement; records ids listed twice in a list or in both lists.
fn assign_splits(split: &SplitFile, notes: &mut IndexNotes) -> BTreeMap<String, Placement> {
    let mut placements = BTreeMap::new();
    let mut repeated = BTreeSet::new();
    for (which, ids) in [(Split::Train, &split.train), (Split::Val, &split.val)] {
        let mut in_this_list = BTreeSet::new();
        for id in ids {
            if !in_this_list.insert(id.as_str()) {
                repeated.insert(id.clone());
                continue;
            }
            placements
                .entry(id.clone())
                .and_modify(|placement| *placement = Placement::Both)
                .or_insert(Placement::One(which));
        }
    }
    notes.repeated_split_ids = repeated.into_iter().collect();
    notes.duplicate_split_ids = placements
        .iter()
        .filter(|(_, placement)| **placement == Placement::Both)
        .map(|(id, _)| id.clone())
        .collect();
    placements
}

/// Reads and deserializes a JSON file; `layout` says what was expected.
fn read_json<T: DeserializeOwned>(
    path: &Path,
    what: &'static str,
    hint: String,
    layout: &str,
) -> Result<T, DatasetError> {
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Read {
        what,
        path: path.to_path_buf(),
        hint,
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|err| {
        let text = err.to_string();
        // serde_json appends " at line L column C"; the location is given separately.
        let message = text
            .rsplit_once(" at line ")
            .map_or(text.as_str(), |(message, _)| message);
        let advice = match err.classify() {
            serde_json::error::Category::Data => layout.to_owned(),
            _ => "the file is not valid JSON".to_owned(),
        };
        DatasetError::Json {
            path: path.to_path_buf(),
            location: format!("line {}, column {}", err.line(), err.column()),
            message: format!("{message} ({advice})"),
        }
    })
}
