//! The CSV manifest reader: one row per patch, `patient,slide,path,label,split`.
//!
//! Every problem found is collected (with its line number; the header is line 1) and
//! returned together, so one run shows everything to fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{DatasetError, DatasetFormat, IndexNotes, PatientEntry, Slide, Split, assemble, count};

/// The columns, in the order messages list them.
const COLUMNS: [&str; 5] = ["patient", "slide", "path", "label", "split"];

/// Positions of the columns in a row, in [`COLUMNS`] order.
type ColumnMap = [usize; 5];

/// A patient while its rows are read.
struct PatientRows {
    label: String,
    label_line: u64,
    split: Split,
    split_text: String,
    split_line: u64,
    /// Slide id -> patch paths in row order.
    slides: BTreeMap<String, Vec<PathBuf>>,
}

pub(super) fn load(
    csv_path: &Path,
    root: Option<&Path>,
) -> Result<super::DatasetIndex, DatasetError> {
    let file = std::fs::File::open(csv_path).map_err(|source| DatasetError::Read {
        what: "the manifest",
        path: csv_path.to_path_buf(),
        hint: "check data.manifest and the file's permissions".to_owned(),
        source,
    })?;
    let root = match root {
        Some(root) => root.to_path_buf(),
        None => match csv_path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let fail = |problems: Vec<String>| DatasetError::Manifest {
        path: csv_path.to_path_buf(),
        problems,
    };

    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(std::io::BufReader::new(file));
    let header = reader
        .headers()
        .map_err(|err| fail(vec![csv_problem(&err)]))?
        .clone();
    let columns = column_map(&header).map_err(fail)?;

    let mut problems = Vec::new();
    let mut patients: BTreeMap<String, PatientRows> = BTreeMap::new();
    // (patient, slide, path) -> first line, to catch repeated rows.
    let mut seen: HashMap<(String, String, String), u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                let stop = matches!(err.kind(), csv::ErrorKind::Io(_));
                problems.push(csv_problem(&err));
                if stop {
                    break;
                }
                continue;
            }
        }
        let line = record.position().map_or(0, csv::Position::line);
        let field = |column: usize| record.get(columns[column]).unwrap_or_default();
        let [patient, slide, path, label, split_text] = [0, 1, 2, 3, 4].map(field);

        let empty: Vec<&str> = COLUMNS
            .iter()
            .zip([patient, slide, path, label, split_text])
            .filter(|(_, value)| value.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if !empty.is_empty() {
            problems.push(format!(
                "line {line}: empty {}: every row needs a patient, slide, path, label and split",
                empty.join(", ")
            ));
            continue;
        }
        let Some(split) = parse_split(split_text) else {
            problems.push(format!(
                "line {line}: split = {split_text:?}: must be \"train\" or \"val\" (\"valid\" is \
                 also accepted)"
            ));
            continue;
        };
        let key = (patient.to_owned(), slide.to_owned(), path.to_owned());
        if let Some(first) = seen.get(&key) {
            problems.push(format!(
                "line {line}: repeats line {first} (same patient, slide and path): remove one of \
                 them"
            ));
            continue;
        }
        seen.insert(key, line);

        let rows = patients
            .entry(patient.to_owned())
            .or_insert_with(|| PatientRows {
                label: label.to_owned(),
                label_line: line,
                split,
                split_text: split_text.to_owned(),
                split_line: line,
                slides: BTreeMap::new(),
            });
        if rows.label != label {
            problems.push(format!(
                "line {line}: patient {patient:?} has label {label:?} here but {:?} on line {}: \
                 a patient has one label; make the rows agree",
                rows.label, rows.label_line
            ));
            continue;
        }
        if rows.split != split {
            problems.push(format!(
                "line {line}: patient {patient:?} is in split {split_text:?} here but {:?} on \
                 line {}: a patient belongs to one split; make the rows agree",
                rows.split_text, rows.split_line
            ));
            continue;
        }
        let path = PathBuf::from(path);
        let path = if path.is_absolute() {
            path
        } else {
            root.join(path)
        };
        rows.slides.entry(slide.to_owned()).or_default().push(path);
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }

    let entries = patients
        .into_iter()
        .map(|(id, rows)| PatientEntry {
            id,
            class: rows.label,
            split: rows.split,
            slides: rows
                .slides
                .into_iter()
                .map(|(id, patches)| Slide { id, patches })
                .collect(),
        })
        .collect();
    Ok(assemble(
        DatasetFormat::Manifest,
        root,
        entries,
        IndexNotes::default(),
    ))
}

/// `train`, `val` or `valid`, in any letter case.
fn parse_split(text: &str) -> Option<Split> {
    match text.to_ascii_lowercase().as_str() {
        "train" => Some(Split::Train),
        "val" | "valid" => Some(Split::Val),
        _ => None,
    }
}

/// Where each column is; every header problem otherwise.
fn column_map(header: &csv::StringRecord) -> Result<ColumnMap, Vec<String>> {
    let expected = COLUMNS.join(",");
    let mut found: [Option<usize>; 5] = [None; 5];
    let mut problems = Vec::new();
    for (position, name) in header.iter().enumerate() {
        // A UTF-8 byte order mark (spreadsheet exports) is not part of the name.
        let name = name.trim_start_matches('\u{feff}');
        match COLUMNS.iter().position(|column| *column == name) {
            Some(column) if found[column].is_some() => problems.push(format!(
                "line 1: column {name:?} appears twice: the header must be exactly {expected} \
                 (in any order)"
            )),
            Some(column) => found[column] = Some(position),
            None => problems.push(format!(
                "line 1: unexpected column {name:?}: the header must be exactly {expected} (in \
                 any order, nothing else)"
            )),
        }
    }
    let missing: Vec<&str> = COLUMNS
        .iter()
        .zip(&found)
        .filter(|(_, position)| position.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "line 1: missing {} {}: the header must be exactly {expected} (in any order)",
            if missing.len() == 1 {
                "column"
            } else {
                "columns"
            },
            missing.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(found.map(Option::unwrap_or_default))
}

/// A CSV reader error as `line N: ...`.
fn csv_problem(err: &csv::Error) -> String {
    let line = err.position().map_or_else(String::new, |position| {
        format!("line {}: ", position.line())
    });
    match err.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "{line}{} where the header has {expected_len}: every row needs the same columns \
             (quote fields that contain commas)",
            count(usize::try_from(*len).unwrap_or(usize::MAX), "field")
        ),
        csv::ErrorKind::Utf8 { .. } => {
            format!("{line}not valid UTF-8 text: save the manifest as UTF-8")
        }
        csv::ErrorKind::Io(io) => format!("{line}cannot read the file: {io}"),
        _ => format!("{line}{err}"),
    }
}
