//! Reading OpenSRH and manifests from small datasets in temporary folders (empty
//! files: the index never opens images), fingerprints, and the check report.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::check::{self, CheckReport, FindingKind};
use super::*;

/// Writes `meta/opensrh.json` and `meta/train_val_split.json` under `root`, and an
/// empty file for every listed patch.
fn write_opensrh(root: &Path, meta: &serde_json::Value, split: &serde_json::Value) {
    fs::create_dir_all(root.join("meta")).unwrap();
    fs::write(
        root.join("meta/opensrh.json"),
        serde_json::to_vec_pretty(meta).unwrap(),
    )
    .unwrap();
    fs::write(
        root.join("meta/train_val_split.json"),
        serde_json::to_vec_pretty(split).unwrap(),
    )
    .unwrap();
    for patient in meta.as_object().unwrap().values() {
        for slide in patient["slides"].as_object().unwrap().values() {
            for list in ["normal_patches", "tumor_patches"] {
                for path in slide[list].as_array().into_iter().flatten() {
                    touch(&root.join(path.as_str().unwrap()));
                }
            }
        }
    }
}

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"").unwrap();
}

/// Two slides per patient; "normal" patients have both lists filled so the choice
/// of list shows.
fn opensrh_meta() -> serde_json::Value {
    let slide = |patient: &str, slide: &str| {
        json!({
            "normal_patches": [
                format!("patches/{patient}/{slide}/patches/n0.tif"),
            ],
            "tumor_patches": [
                format!("patches/{patient}/{slide}/patches/t0.tif"),
                format!("patches/{patient}/{slide}/patches/t1.tif"),
            ],
            "nondiagnostic_patches": [],
        })
    };
    json!({
        "NIO_003": {"class": "normal", "slides": {"1": slide("NIO_003", "1"), "2": slide("NIO_003", "2")}},
        "NIO_001": {"class": "hgg", "slides": {"2": slide("NIO_001", "2"), "1": slide("NIO_001", "1")}},
        "NIO_002": {"class": "lgg", "slides": {"1": slide("NIO_002", "1")}},
        "NIO_004": {"class": "hgg", "slides": {"1": slide("NIO_004", "1")}},
        "NIO_005": {"class": "lgg", "slides": {"1": slide("NIO_005", "1")}},
    })
}

fn opensrh_split() -> serde_json::Value {
    json!({"train": ["NIO_001", "NIO_002", "NIO_003"], "val": ["NIO_004", "NIO_005"]})
}

fn load_opensrh(root: &Path) -> DatasetIndex {
    DatasetIndex::load_opensrh(root, "opensrh.json", "train_val_split.json").unwrap()
}

fn kinds(findings: &[check::Finding]) -> Vec<FindingKind> {
    findings.iter().map(|finding| finding.kind).collect()
}

#[test]
fn opensrh_normal_patients_use_normal_patches() {
    let dir = tempfile::tempdir().unwrap();
    write_opensrh(dir.path(), &opensrh_meta(), &opensrh_split());
    let index = load_opensrh(dir.path());

    assert_eq!(index.format, DatasetFormat::OpenSrh);
    assert_eq!(index.root, dir.path());
    assert_eq!(index.classes, ["hgg", "lgg", "normal"]);
    let ids: Vec<&str> = index.patients.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["NIO_001", "NIO_002", "NIO_003", "NIO_004", "NIO_005"]);

    let tumor = &index.patients[0];
    assert_eq!((tumor.class, tumor.split), (0, Split::Train));
    // Slides in id order whatever the file's order; patches as listed, root-joined.
    let slide_ids: Vec<&str> = tumor.slides.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(slide_ids, ["1", "2"]);
    assert_eq!(
        tumor.slides[0].patches,
        [
            dir.path().join("patches/NIO_001/1/patches/t0.tif"),
            dir.path().join("patches/NIO_001/1/patches/t1.tif"),
        ]
    );
    let normal = &index.patients[2];
    assert_eq!(index.classes[normal.class], "normal");
    assert_eq!(
        normal.slides[1].patches,
        [dir.path().join("patches/NIO_003/2/patches/n0.tif")]
    );
    assert_eq!(index.patients[3].split, Split::Val);

    assert_eq!(index.patients_in(Split::Train), [0, 1, 2]);
    assert_eq!(index.patients_in(Split::Val), [3, 4]);
    assert_eq!(index.num_patches(), 4 + 2 + 2 + 2 + 2);
    assert_eq!(index.notes, IndexNotes::default());
    assert_eq!(index.fingerprint.len(), 64);
    assert!(index.fingerprint.chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn opensrh_drops_empty_slides_and_patients_without_slides() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = opensrh_meta();
    // NIO_001's slide 2 keeps only normal patches: useless for a tumor patient.
    meta["NIO_001"]["slides"]["2"]["tumor_patches"] = json!([]);
    // NIO_002's only slide has no tumor list at all.
    meta["NIO_002"]["slides"]["1"]
        .as_object_mut()
        .unwrap()
        .remove("tumor_patches");
    write_opensrh(dir.path(), &meta, &opensrh_split());
    let index = load_opensrh(dir.path());

    let ids: Vec<&str> = index.patients.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["NIO_001", "NIO_003", "NIO_004", "NIO_005"]);
    assert_eq!(index.patients[0].slides.len(), 1);
    assert_eq!(
        index.notes.dropped_slides,
        [
            ("NIO_001".to_owned(), "2".to_owned()),
            ("NIO_002".to_owned(), "1".to_owned())
        ]
    );
    assert_eq!(index.notes.dropped_patients, ["NIO_002"]);
    assert_eq!(index.classes, ["hgg", "lgg", "normal"]);

    let report = check::quick_check(&index);
    assert_eq!(kinds(&report.errors), [FindingKind::PatientWithoutSlides]);
    assert_eq!(report.errors[0].examples, ["NIO_002"]);
    assert!(kinds(&report.warnings).contains(&FindingKind::DroppedSlides));
    assert!(!report.is_ok());
}

#[test]
fn opensrh_split_problems_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let split = json!({
        "train": ["NIO_001", "NIO_002", "NIO_002", "NIO_404", "NIO_004"],
        "val": ["NIO_004"],
        "test": ["ignored"],
    });
    write_opensrh(dir.path(), &opensrh_meta(), &split);
    let index = load_opensrh(dir.path());

    let ids: Vec<&str> = index.patients.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["NIO_001", "NIO_002"]);
    let notes = &index.notes;
    assert_eq!(notes.unknown_split_ids, ["NIO_404"]);
    assert_eq!(notes.duplicate_split_ids, ["NIO_004"]);
    assert_eq!(notes.repeated_split_ids, ["NIO_002"]);
    assert_eq!(notes.unsplit_patients, ["NIO_003", "NIO_005"]);

    let report = check::quick_check(&index);
    assert_eq!(
        kinds(&report.errors),
        [
            FindingKind::UnknownSplitIds,
            FindingKind::DuplicatePatientInSplits,
        ]
    );
    assert_eq!(report.errors[0].examples, ["NIO_404"]);
    assert_eq!(
        kinds(&report.warnings),
        [
            FindingKind::EmptySplit,
            FindingKind::UnsplitPatients,
            FindingKind::RepeatedSplitIds,
        ]
    );
    assert_eq!(report.warnings[0].examples, ["val"]);
}

#[test]
fn opensrh_index_does_not_depend_on_file_order() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    write_opensrh(first.path(), &opensrh_meta(), &opensrh_split());
    write_opensrh(second.path(), &opensrh_meta(), &opensrh_split());
    // Same content, keys in another order (serde_json writes objects sorted, so
    // write this one by hand) and the split lists reversed.
    let reordered = r#"{"NIO_004": {"slides": {"1": {"tumor_patches": ["patches/NIO_004/1/patches/t0.tif", "patches/NIO_004/1/patches/t1.tif"], "normal_patches": ["patches/NIO_004/1/patches/n0.tif"]}}, "class": "hgg"}}"#;
    let single_split = r#"{"val": ["NIO_004"], "train": []}"#;
    fs::write(second.path().join("meta/opensrh.json"), reordered).unwrap();
    fs::write(
        second.path().join("meta/train_val_split.json"),
        single_split,
    )
    .unwrap();
    let mut meta = opensrh_meta();
    meta.as_object_mut()
        .unwrap()
        .retain(|id, _| id.as_str() == "NIO_004");
    write_opensrh(
        first.path(),
        &meta,
        &json!({"train": [], "val": ["NIO_004"]}),
    );
    let (a, b) = (load_opensrh(first.path()), load_opensrh(second.path()));
    assert_eq!(a.patients.len(), 1);
    assert_eq!(a.fingerprint, b.fingerprint);
}

#[test]
fn opensrh_file_errors_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        DatasetIndex::load_opensrh(dir.path(), "opensrh.json", "train_val_split.json").unwrap_err();
    assert!(matches!(err, DatasetError::Read { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read the OpenSRH metadata {} (data.db_root must be the OpenSRH folder, the \
             one holding meta/opensrh.json; check the path and its permissions)",
            dir.path().join("meta/opensrh.json").display()
        )
    );

    write_opensrh(dir.path(), &opensrh_meta(), &opensrh_split());
    let meta_path = dir.path().join("meta/opensrh.json");
    fs::write(
        &meta_path,
        "{\"NIO_001\": {\"class\": \"hgg\",\n \"slides\": {\"1\": 3}}}",
    )
    .unwrap();
    let err = load_opensrh_err(dir.path());
    let DatasetError::Json {
        path,
        location,
        message,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(path, &meta_path);
    assert!(location.starts_with("line 2, column"), "{location}");
    assert!(
        message.starts_with("invalid type: integer `3`"),
        "{message}"
    );
    assert!(
        message.contains("(expected {patient_id: {\"class\""),
        "{message}"
    );

    fs::write(&meta_path, "{\"NIO_001\": ").unwrap();
    let err = load_opensrh_err(dir.path());
    assert!(
        err.to_string().ends_with("(the file is not valid JSON)"),
        "{err}"
    );

    write_opensrh(dir.path(), &opensrh_meta(), &json!({"train": []}));
    let err = load_opensrh_err(dir.path());
    assert!(err.to_string().contains("missing field `val`"), "{err}");
}

fn load_opensrh_err(root: &Path) -> DatasetError {
    DatasetIndex::load_opensrh(root, "opensrh.json", "train_val_split.json").unwrap_err()
}

#[test]
fn load_dispatches_on_the_source() {
    let dir = tempfile::tempdir().unwrap();
    write_opensrh(dir.path(), &opensrh_meta(), &opensrh_split());
    let mut cfg = crate::config::Config::default().data;
    let err = DatasetIndex::load(&cfg).unwrap_err();
    assert!(matches!(err, DatasetError::NoFiles));
    assert!(
        err.to_string()
            .contains("set data.source to \"opensrh\" or \"manifest\"")
    );

    cfg.source = DataSource::OpenSrh;
    let err = DatasetIndex::load(&cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data.db_root is empty: set it to the OpenSRH folder (the one holding meta/) when \
         data.source = \"opensrh\""
    );
    cfg.db_root = dir.path().to_path_buf();
    assert_eq!(DatasetIndex::load(&cfg).unwrap(), load_opensrh(dir.path()));

    cfg.source = DataSource::Manifest;
    assert!(matches!(
        DatasetIndex::load(&cfg).unwrap_err(),
        DatasetError::MissingSetting {
            key: "data.manifest",
            ..
        }
    ));
    let manifest = dir.path().join("list.csv");
    fs::write(
        &manifest,
        "patient,slide,path,label,split\nA,1,tiles/a.png,x,train\n",
    )
    .unwrap();
    cfg.manifest = Some(manifest);
    // db_root set: relative tile paths resolve against it.
    cfg.db_root = PathBuf::from("/data/he");
    let index = DatasetIndex::load(&cfg).unwrap();
    assert_eq!(index.root, PathBuf::from("/data/he"));
    assert_eq!(
        index.patients[0].slides[0].patches,
        [PathBuf::from("/data/he/tiles/a.png")]
    );
}

/// Writes `text` as `manifest.csv` in `dir`.
fn manifest_in(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("manifest.csv");
    fs::write(&path, text).unwrap();
    path
}

fn manifest_problems(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    match DatasetIndex::load_manifest(&manifest_in(dir.path(), text), None) {
        Err(DatasetError::Manifest { problems, .. }) => problems,
        other => panic!("{other:?}"),
    }
}

const MANIFEST: &str = "\
split,label,patient,slide,path
train,tumor,P2,s2,tiles/P2/s2/0.png
train,tumor,P2,s1,tiles/P2/s1/1.png
train,tumor,P2,s1,tiles/P2/s1/0.png
valid,normal,P1,s1,/abs/P1/0.png
Train,normal,P3,s1,tiles/P3/s1/0.png
";

#[test]
fn manifest_columns_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let index = DatasetIndex::load_manifest(&manifest_in(dir.path(), MANIFEST), None).unwrap();
    assert_eq!(index.format, DatasetFormat::Manifest);
    assert_eq!(index.root, dir.path());
    assert_eq!(index.classes, ["normal", "tumor"]);
    let ids: Vec<&str> = index.patients.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["P1", "P2", "P3"]);
    let p1 = &index.patients[0];
    assert_eq!((p1.class, p1.split), (0, Split::Val));
    // Absolute paths are kept as they are.
    assert_eq!(p1.slides[0].patches, [PathBuf::from("/abs/P1/0.png")]);
    let p2 = &index.patients[1];
    assert_eq!((p2.class, p2.split), (1, Split::Train));
    // Slides sorted by id, patches in row order.
    let slide_ids: Vec<&str> = p2.slides.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(slide_ids, ["s1", "s2"]);
    assert_eq!(
        p2.slides[0].patches,
        [
            dir.path().join("tiles/P2/s1/1.png"),
            dir.path().join("tiles/P2/s1/0.png")
        ]
    );
    assert_eq!(index.patients[2].split, Split::Train);
    assert_eq!(index.num_patches(), 5);
    assert_eq!(index.notes, IndexNotes::default());

    // A byte order mark and spaces around fields are ignored.
    let with_bom = "\u{feff}patient, slide ,path,label,split\n P1 ,s1,a.png,x,val\n";
    let index = DatasetIndex::load_manifest(&manifest_in(dir.path(), with_bom), None).unwrap();
    assert_eq!(index.patients[0].id, "P1");
}

#[test]
fn manifest_with_a_conflicting_label_names_the_rows() {
    let problems = manifest_problems(
        "patient,slide,path,label,split\nP1,s1,a.png,tumor,train\nP1,s2,b.png,normal,train\n\
         P1,s2,c.png,tumor,val\n",
    );
    assert_eq!(
        problems,
        [
            "line 3: patient \"P1\" has label \"normal\" here but \"tumor\" on line 2: a patient \
             has one label; make the rows agree",
            "line 4: patient \"P1\" is in split \"val\" here but \"train\" on line 2: a patient \
             belongs to one split; make the rows agree",
        ]
    );
}

#[test]
fn manifest_header_must_be_exact() {
    assert_eq!(
        manifest_problems("patient,slide,path,split\nP1,s1,a.png,train\n"),
        ["line 1: missing column label: the header must be exactly \
             patient,slide,path,label,split (in any order)"]
    );
    assert_eq!(
        manifest_problems("patient,slide,path,label,split,stain\nP1,s1,a.png,x,train,he\n"),
        [
            "line 1: unexpected column \"stain\": the header must be exactly \
             patient,slide,path,label,split (in any order, nothing else)"
        ]
    );
    let problems = manifest_problems("patient,slide,path,label,patient\n");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("line 1: column \"patient\" appears twice"));
    assert!(problems[1].starts_with("line 1: missing column split"));
}

#[test]
fn manifest_rows_are_checked_with_line_numbers() {
    let problems = manifest_problems(
        "patient,slide,path,label,split\n\
         P1,s1,a.png,x,train\n\
         P1,s1,b.png,x\n\
         P1,,c.png,,train\n\
         P1,s1,d.png,x,test\n\
         P1,s1,a.png,x,train\n",
    );
    assert_eq!(
        problems,
        [
            "line 3: 4 fields where the header has 5: every row needs the same columns (quote \
             fields that contain commas)",
            "line 4: empty slide, label: every row needs a patient, slide, path, label and split",
            "line 5: split = \"test\": must be \"train\" or \"val\" (\"valid\" is also accepted)",
            "line 6: repeats line 2 (same patient, slide and path): remove one of them",
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let err = DatasetIndex::load_manifest(&manifest_in(dir.path(), "patient\n"), None).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "manifest {} has 1 problem to fix:\n  line 1: missing columns \
             slide, path, label, split",
            dir.path().join("manifest.csv").display()
        )),
        "{err}"
    );
    let missing = DatasetIndex::load_manifest(&dir.path().join("nope.csv"), None).unwrap_err();
    assert!(missing.to_string().starts_with("cannot read the manifest "));
}

#[test]
fn fingerprint_survives_relocation_and_sees_every_change() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    write_opensrh(first.path(), &opensrh_meta(), &opensrh_split());
    write_opensrh(second.path(), &opensrh_meta(), &opensrh_split());
    let base = load_opensrh(first.path());
    let moved = load_opensrh(second.path());
    assert_ne!(base.root, moved.root);
    assert_eq!(base.fingerprint, moved.fingerprint);

    let variant = |edit: &dyn Fn(&mut serde_json::Value, &mut serde_json::Value)| {
        let dir = tempfile::tempdir().unwrap();
        let (mut meta, mut split) = (opensrh_meta(), opensrh_split());
        edit(&mut meta, &mut split);
        write_opensrh(dir.path(), &meta, &split);
        load_opensrh(dir.path()).fingerprint
    };
    let changed = [
        variant(&|meta, _| meta["NIO_004"]["class"] = json!("lgg")),
        variant(&|_, split| {
            *split =
                json!({"train": ["NIO_001", "NIO_002"], "val": ["NIO_003", "NIO_004", "NIO_005"]});
        }),
        variant(&|meta, _| {
            meta["NIO_001"]["slides"]["1"]["tumor_patches"][1] =
                json!("patches/NIO_001/1/patches/t9.tif")
        }),
        variant(&|meta, _| {
            let slide = meta["NIO_002"]["slides"]["1"].clone();
            meta["NIO_002"]["slides"] = json!({"7": slide});
        }),
        variant(&|meta, split| {
            let patient = meta.as_object_mut().unwrap().remove("NIO_002").unwrap();
            meta["NIO_020"] = patient;
            split["train"][1] = json!("NIO_020");
        }),
    ];
    for fingerprint in &changed {
        assert_ne!(fingerprint, &base.fingerprint);
    }
    let distinct: std::collections::BTreeSet<&String> = changed.iter().collect();
    assert_eq!(distinct.len(), changed.len());

    // A manifest moved with its tiles keeps its fingerprint; a label change does not.
    let manifest_fingerprint = |dir: &Path, text: &str| {
        DatasetIndex::load_manifest(&manifest_in(dir, text), None)
            .unwrap()
            .fingerprint
    };
    let a = manifest_fingerprint(first.path(), MANIFEST.replace("/abs/", "").as_str());
    let b = manifest_fingerprint(second.path(), MANIFEST.replace("/abs/", "").as_str());
    assert_eq!(a, b);
    let relabelled = MANIFEST
        .replace("/abs/", "")
        .replace("Train,normal", "Train,tumor");
    assert_ne!(manifest_fingerprint(second.path(), &relabelled), a);
    // The same dataset in the other format is another dataset.
    assert_ne!(a, base.fingerprint);
}

#[test]
fn check_reports_missing_and_unreadable_patches() {
    let dir = tempfile::tempdir().unwrap();
    write_opensrh(dir.path(), &opensrh_meta(), &opensrh_split());
    let index = load_opensrh(dir.path());
    let gone = dir.path().join("patches/NIO_001/1/patches/t1.tif");
    fs::remove_file(&gone).unwrap();
    let broken = dir.path().join("patches/NIO_002/1/patches/t0.tif");

    let mut probed = Vec::new();
    let mut probe = |path: &Path| {
        probed.push(path.to_path_buf());
        if path == broken {
            Err("not a TIFF file".to_owned())
        } else {
            Ok(())
        }
    };
    let mut calls = Vec::new();
    let report = check::check(&index, &mut probe, &mut |done, total| {
        calls.push((done, total));
    });
    // The missing file is never probed; every other patch is, once.
    assert_eq!(probed.len(), index.num_patches() - 1);
    assert!(!probed.contains(&gone));
    assert_eq!(calls.first(), Some(&(0, 12)));
    assert_eq!(calls.last(), Some(&(12, 12)));
    assert_eq!(calls.len(), 13);

    assert_eq!(
        kinds(&report.errors),
        [FindingKind::MissingFiles, FindingKind::UnreadableImages]
    );
    assert_eq!(report.errors[0].count, 1);
    assert_eq!(report.errors[0].examples, [gone.display().to_string()]);
    assert_eq!(
        report.errors[1].examples,
        [format!("{}: not a TIFF file", broken.display())]
    );
    assert_eq!(
        kinds(&report.warnings),
        [FindingKind::ClassMissingFromSplit]
    );
    assert_eq!(
        report.warnings[0].examples,
        ["\"normal\" has no val patients"]
    );
    assert!(!report.is_ok());

    // quick_check sees the missing file but decodes nothing.
    let quick = check::quick_check(&index);
    assert_eq!(kinds(&quick.errors), [FindingKind::MissingFiles]);
}

#[test]
fn single_class_splits_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = opensrh_meta();
    meta["NIO_002"]["class"] = json!("hgg");
    meta["NIO_003"]["class"] = json!("hgg");
    meta["NIO_005"]["class"] = json!("hgg");
    write_opensrh(dir.path(), &meta, &opensrh_split());
    let report = check::quick_check(&load_opensrh(dir.path()));
    assert_eq!(kinds(&report.errors), [FindingKind::SingleClassSplit]);
    assert_eq!(
        report.errors[0].examples,
        [
            "train: every patient has class \"hgg\"",
            "val: every patient has class \"hgg\""
        ]
    );
}

#[test]
fn report_renders_table_and_findings() {
    let dir = tempfile::tempdir().unwrap();
    write_opensrh(dir.path(), &opensrh_meta(), &opensrh_split());
    let index = load_opensrh(dir.path());
    let report = check::quick_check(&index);
    assert_eq!(
        report.rows,
        [
            check::SummaryRow {
                split: Split::Train,
                class: "hgg".into(),
                patients: 1,
                slides: 2,
                patches: 4
            },
            check::SummaryRow {
                split: Split::Train,
                class: "lgg".into(),
                patients: 1,
                slides: 1,
                patches: 2
            },
            check::SummaryRow {
                split: Split::Train,
                class: "normal".into(),
                patients: 1,
                slides: 2,
                patches: 2
            },
            check::SummaryRow {
                split: Split::Val,
                class: "hgg".into(),
                patients: 1,
                slides: 1,
                patches: 2
            },
            check::SummaryRow {
                split: Split::Val,
                class: "lgg".into(),
                patients: 1,
                slides: 1,
                patches: 2
            },
        ]
    );
    let mut report: CheckReport = report;
    report.errors.push(check::Finding {
        kind: FindingKind::MissingFiles,
        count: 7,
        examples: vec!["a.tif".into(), "b.tif".into()],
        advice: "copy them".into(),
    });
    let text = report.render();
    let expected = "\
split  class   patients  slides  patches
train  hgg            1       2        4
train  lgg            1       1        2
train  normal         1       2        2
val    hgg            1       1        2
val    lgg            1       1        2
total                 5       7       12

1 error:
  missing patch files: 7
    e.g. a.tif
         b.tif
         ... and 5 more
    what to do: copy them

1 warning:
  classes missing from a split: 1
    e.g. \"normal\" has no val patients
    what to do: ";
    assert!(text.starts_with(expected), "{text}");
    assert!(!report.is_ok());
}
