//! The validation report of an index: what is in it, per split and class, and what
//! is wrong with it, each problem with a count, the first examples and what to do.
//!
//! [`check`] looks at every patch file: a missing one is reported without being
//! opened, an existing one is handed to the caller's `probe` (which decodes it: this
//! crate has no image code). [`quick_check`] only checks that the files exist, for
//! training start-up. Both also judge the index's structure (splits, classes, the
//! [`IndexNotes`](super::IndexNotes)).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use super::{DatasetFormat, DatasetIndex, Split, count};

/// Examples kept per finding.
const EXAMPLES: usize = 5;

/// Counts of one (split, class) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// The split.
    pub split: Split,
    /// The class name.
    pub class: String,
    /// Patients of this class in this split.
    pub patients: usize,
    /// Their slides.
    pub slides: usize,
    /// Their patches.
    pub patches: usize,
}

/// What kind of problem a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingKind {
    /// Patch files listed in the index that do not exist (error).
    MissingFiles,
    /// Patch files that exist but the probe could not decode (error).
    UnreadableImages,
    /// Patients of a split with no slide left (error).
    PatientWithoutSlides,
    /// Split ids the metadata does not know (error).
    UnknownSplitIds,
    /// Patients in both train and val (error).
    DuplicatePatientInSplits,
    /// A split whose patients all have the same class (error).
    SingleClassSplit,
    /// A split without patients: an error for train, a warning for val.
    EmptySplit,
    /// Patients of the metadata in no split, left out (warning).
    UnsplitPatients,
    /// Slides without a usable patch, left out (warning).
    DroppedSlides,
    /// Ids listed twice in the same split list (warning).
    RepeatedSplitIds,
    /// Classes with patients in one split only (warning).
    ClassMissingFromSplit,
}

impl FindingKind {
    /// A short description, as the report's heading of the finding.
    pub fn describe(self) -> &'static str {
        match self {
            Self::MissingFiles => "missing patch files",
            Self::UnreadableImages => "unreadable patch images",
            Self::PatientWithoutSlides => "patients without a usable slide",
            Self::UnknownSplitIds => "split ids unknown to the metadata",
            Self::DuplicatePatientInSplits => "patients in both train and val",
            Self::SingleClassSplit => "splits with a single class",
            Self::EmptySplit => "empty split",
            Self::UnsplitPatients => "patients in no split",
            Self::DroppedSlides => "slides without a usable patch",
            Self::RepeatedSplitIds => "ids repeated within a split list",
            Self::ClassMissingFromSplit => "classes missing from a split",
        }
    }
}

/// One problem: how many things it affects, the first few, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of problem.
    pub kind: FindingKind,
    /// How many files, patients, ids or splits are affected.
    pub count: usize,
    /// The first (at most 5) of them.
    pub examples: Vec<String>,
    /// What to do about it.
    pub advice: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// One row per (split, class) with patients, splits in train, val order and
    /// classes in index order.
    pub rows: Vec<SummaryRow>,
    /// Problems that make the dataset unfit for training.
    pub errors: Vec<Finding>,
    /// Things worth knowing that do not stop training.
    pub warnings: Vec<Finding>,
}

/// Checks the index's structure and every patch file: missing files are reported as
/// [`FindingKind::MissingFiles`] without calling `probe`; existing ones are passed to
/// `probe` (which decodes them) and its errors reported as
/// [`FindingKind::UnreadableImages`]. `progress(done, total)` is called after each
/// patch (and once with `done = 0` first).
pub fn check(
    index: &DatasetIndex,
    probe: &mut dyn FnMut(&Path) -> Result<(), String>,
    progress: &mut dyn FnMut(usize, usize),
) -> CheckReport {
    run(index, Some(probe), progress)
}

/// [`check`] without decoding: the structure and the existence of every patch file.
/// For training start-up.
pub fn quick_check(index: &DatasetIndex) -> CheckReport {
    run(index, None, &mut |_, _| {})
}

impl CheckReport {
    /// True when there are no errors (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The report as plain text: the table of patients, slides and patches per split
    /// and class with a total line, then the errors and the warnings, each with its
    /// count, its first examples and what to do.
    pub fn render(&self) -> String {
        let mut out = self.table();
        for (title, findings) in [("error", &self.errors), ("warning", &self.warnings)] {
            if findings.is_empty() {
                let _ = writeln!(out, "\nno {title}s");
                continue;
            }
            let _ = writeln!(out, "\n{}:", count(findings.len(), title));
            for finding in findings {
                let _ = writeln!(out, "  {}: {}", finding.kind.describe(), finding.count);
                for (position, example) in finding.examples.iter().enumerate() {
                    let lead = if position == 0 { "e.g." } else { "    " };
                    let _ = writeln!(out, "    {lead} {example}");
                }
                if finding.count > finding.examples.len() {
                    let _ = writeln!(
                        out,
                        "         ... and {} more",
                        finding.count - finding.examples.len()
                    );
                }
                let _ = writeln!(out, "    what to do: {}", finding.advice);
            }
        }
        out.truncate(out.trim_end().len());
        out
    }

    fn table(&self) -> String {
        let header = ["split", "class", "patients", "slides", "patches"];
        let total = [
            self.rows.iter().map(|row| row.patients).sum::<usize>(),
            self.rows.iter().map(|row| row.slides).sum(),
            self.rows.iter().map(|row| row.patches).sum(),
        ];
        let mut lines: Vec<[String; 5]> = vec![header.map(str::to_owned)];
        for row in &self.rows {
            lines.push([
                row.split.to_string(),
                row.class.clone(),
                row.patients.to_string(),
                row.slides.to_string(),
                row.patches.to_string(),
            ]);
        }
        lines.push([
            "total".to_owned(),
            String::new(),
            total[0].to_string(),
            total[1].to_string(),
            total[2].to_string(),
        ]);
        let mut widths = [0usize; 5];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in &lines {
            let text = format!(
                "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}",
                line[0],
                line[1],
                line[2],
                line[3],
                line[4],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
                w4 = widths[4],
            );
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A finding under construction.
#[derive(Debug, Default)]
struct Tally {
    count: usize,
    examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }

    fn of<T: ToString>(items: impl IntoIterator<Item = T>) -> Self {
        let mut tally = Self::default();
        for item in items {
            tally.add(|| item.to_string());
        }
        tally
    }

    /// Pushes the finding when anything was counted.
    fn report(self, into: &mut Vec<Finding>, kind: FindingKind, advice: &str) {
        if self.count > 0 {
            into.push(Finding {
                kind,
                count: self.count,
                examples: self.examples,
                advice: advice.to_owned(),
            });
        }
    }
}

/// Decodes one patch file; `Err` says why it cannot be.
type Probe<'a> = &'a mut dyn FnMut(&Path) -> Result<(), String>;

fn run(
    index: &DatasetIndex,
    mut probe: Option<Probe<'_>>,
    progress: &mut dyn FnMut(usize, usize),
) -> CheckReport {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    structure(index, &mut errors, &mut warnings);

    let total = index.num_patches();
    progress(0, total);
    let mut missing = Tally::default();
    let mut unreadable = Tally::default();
    let mut done = 0;
    let patches = index
        .patients
        .iter()
        .flat_map(|patient| &patient.slides)
        .flat_map(|slide| &slide.patches);
    for path in patches {
        let is_file = std::fs::metadata(path).is_ok_and(|meta| meta.is_file());
        if !is_file {
            missing.add(|| path.display().to_string());
        } else if let Some(probe) = probe.as_mut()
            && let Err(err) = probe(path)
        {
            unreadable.add(|| format!("{}: {err}", path.display()));
        }
        done += 1;
        progress(done, total);
    }
    let root = index.root.display();
    let look_at = match index.format {
        DatasetFormat::OpenSrh => format!(
            "check data.db_root (now {root}; the metadata's patch paths are relative to it)"
        ),
        DatasetFormat::Manifest => format!(
            "check the manifest's paths (relative ones are joined to {root}: data.db_root when \
             set, else the manifest's folder)"
        ),
    };
    missing.report(
        &mut errors,
        FindingKind::MissingFiles,
        &format!(
            "these patch files are listed but do not exist: {look_at}, and that the dataset was \
             copied completely"
        ),
    );
    unreadable.report(
        &mut errors,
        FindingKind::UnreadableImages,
        "these files exist but cannot be decoded: re-export or replace them, or remove them from \
         the metadata or manifest (OpenSRH patches are 2-channel 16-bit TIFF; a manifest may list \
         PNG, JPEG or TIFF tiles)",
    );

    CheckReport {
        rows: summary(index),
        errors,
        warnings,
    }
}

/// Findings about splits, classes and what the reader left out.
fn structure(index: &DatasetIndex, errors: &mut Vec<Finding>, warnings: &mut Vec<Finding>) {
    let notes = &index.notes;
    Tally::of(&notes.dropped_patients).report(
        errors,
        FindingKind::PatientWithoutSlides,
        "these patients of the split file have no slide with a usable patch (a patient of class \
         normal uses normal_patches, any other tumor_patches): add patches or take them out of \
         the split file",
    );
    Tally::of(&notes.unknown_split_ids).report(
        errors,
        FindingKind::UnknownSplitIds,
        "the split file lists patients the metadata does not have: correct the ids or remove \
         them from the split file",
    );
    Tally::of(&notes.duplicate_split_ids).report(
        errors,
        FindingKind::DuplicatePatientInSplits,
        "these patients are listed in both train and val and are left out (val would leak into \
         training): keep each patient in one list",
    );

    let classes_of = |split: Split| -> BTreeSet<usize> {
        index
            .patients
            .iter()
            .filter(|patient| patient.split == split)
            .map(|patient| patient.class)
            .collect()
    };
    let train = classes_of(Split::Train);
    let val = classes_of(Split::Val);
    for (split, classes) in [(Split::Train, &train), (Split::Val, &val)] {
        if classes.is_empty() {
            let (into, advice) = match split {
                Split::Train => (
                    &mut *errors,
                    "the train split has no patients, so there is nothing to train on: check the \
                     split file or the manifest's split column",
                ),
                Split::Val => (
                    &mut *warnings,
                    "the val split has no patients, so the evaluation has nothing to score: add \
                     patients to val if you want the kNN evaluation",
                ),
            };
            Tally::of([split]).report(into, FindingKind::EmptySplit, advice);
        }
    }
    let single: Vec<String> = [(Split::Train, &train), (Split::Val, &val)]
        .into_iter()
        .filter(|(_, classes)| classes.len() == 1)
        .map(|(split, classes)| {
            let class = classes.first().map_or("", |&class| &index.classes[class]);
            format!("{split}: every patient has class {class:?}")
        })
        .collect();
    Tally::of(single).report(
        errors,
        FindingKind::SingleClassSplit,
        "class balancing and the kNN evaluation need at least two classes in each split: add \
         patients of another class or move patients between the splits",
    );

    let mut one_sided = Tally::default();
    if !train.is_empty() && !val.is_empty() {
        for (class, name) in index.classes.iter().enumerate() {
            let missing_from = match (train.contains(&class), val.contains(&class)) {
                (true, false) => Split::Val,
                (false, true) => Split::Train,
                _ => continue,
            };
            one_sided.add(|| format!("{name:?} has no {missing_from} patients"));
        }
    }
    one_sided.report(
        warnings,
        FindingKind::ClassMissingFromSplit,
        "a class without train patients cannot be predicted by the kNN evaluation, one without \
         val patients is never scored: move a patient if that matters",
    );
    Tally::of(&notes.unsplit_patients).report(
        warnings,
        FindingKind::UnsplitPatients,
        "these patients of the metadata are in neither list of the split file and are not used: \
         add them to train or val if they should be",
    );
    Tally::of(
        notes
            .dropped_slides
            .iter()
            .map(|(patient, slide)| format!("{patient}/{slide}")),
    )
    .report(
        warnings,
        FindingKind::DroppedSlides,
        "these slides have no usable patch and are left out (a patient of class normal uses \
         normal_patches, any other tumor_patches); nothing to do unless that is unexpected",
    );
    Tally::of(&notes.repeated_split_ids).report(
        warnings,
        FindingKind::RepeatedSplitIds,
        "these ids appear more than once in the same list of the split file and are used once: \
         remove the repeats",
    );
}

/// Patients, slides and patches per (split, class).
fn summary(index: &DatasetIndex) -> Vec<SummaryRow> {
    let mut rows = Vec::new();
    for split in Split::ALL {
        for (class, name) in index.classes.iter().enumerate() {
            let mut row = SummaryRow {
                split,
                class: name.clone(),
                patients: 0,
                slides: 0,
                patches: 0,
            };
            for patient in index
                .patients
                .iter()
                .filter(|patient| patient.split == split && patient.class == class)
            {
                row.patients += 1;
                row.slides += patient.slides.len();
                row.patches += patient.num_patches();
            }
            if row.patients > 0 {
                rows.push(row);
            }
        }
    }
    rows
}
