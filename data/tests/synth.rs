//! `hsat synth`: the files it writes (read back with the `tiff` and `png` crates, not
//! with hsat's own decoder), determinism, the output directory rules, and the
//! statistics that make the dataset worth training on: mean colour says who the
//! patient is, not what class they have; texture says the class.
//!
//! `cargo test -p hsat-worker --test synth -- --ignored --nocapture` also prints
//! timings (build with `--release` for meaningful numbers).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hsat_data::synth::{
    CLASS_NAMES, COMPLETE_MARKER, INCOMPLETE_MARKER, SynthError, SynthFormat, SynthSpec,
    SynthSummary, synthesize,
};
use serde_json::Value;

fn run(spec: &SynthSpec) -> Result<SynthSummary, SynthError> {
    synthesize(spec, &mut |_, _| {})
}

fn spec_in(dir: &Path, format: SynthFormat) -> SynthSpec {
    SynthSpec::new(dir.join("out"), format)
}

/// Every file under `dir`, relative, with `/` separators, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap();
                let parts: Vec<String> = relative
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn total_size(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|f| fs::metadata(dir.join(f)).unwrap().len())
        .sum()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// A `(2, H, W)` TIFF as tifffile writes it: two 16-bit single-sample pages.
struct SrhPatch {
    width: usize,
    height: usize,
    ch2: Vec<u16>,
    ch3: Vec<u16>,
    description: String,
}

fn read_srh(path: &Path) -> SrhPatch {
    use tiff::ColorType;
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::tags::Tag;

    let mut decoder = Decoder::new(fs::File::open(path).unwrap()).unwrap();
    let page = |decoder: &mut Decoder<fs::File>| {
        assert_eq!(
            decoder.colortype().unwrap(),
            ColorType::Gray(16),
            "{}",
            path.display()
        );
        assert_eq!(decoder.find_tag(Tag::PlanarConfiguration).unwrap(), None);
        let (w, h) = decoder.dimensions().unwrap();
        let DecodingResult::U16(samples) = decoder.read_image().unwrap() else {
            panic!("{}: not 16-bit samples", path.display())
        };
        assert_eq!(samples.len(), (w * h) as usize);
        (w as usize, h as usize, samples)
    };
    let description = decoder.get_tag_ascii_string(Tag::ImageDescription).unwrap();
    let (width, height, ch2) = page(&mut decoder);
    assert!(decoder.more_images(), "{}: one page only", path.display());
    decoder.next_image().unwrap();
    let (w3, h3, ch3) = page(&mut decoder);
    assert_eq!((w3, h3), (width, height));
    assert!(
        !decoder.more_images(),
        "{}: more than two pages",
        path.display()
    );
    SrhPatch {
        width,
        height,
        ch2,
        ch3,
        description,
    }
}

/// An RGB 8-bit PNG: (width, height, interleaved samples).
fn read_rgb(path: &Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buffer).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    buffer.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buffer)
}

/// hsat's base processing of an SRH patch (method.md §1): channels (CH3 - CH2 +
/// 5000/65536, CH2, CH3) / 65536, clamped to [0, 1]; channel-major.
fn base_processed(patch: &SrhPatch) -> [Vec<f32>; 3] {
    let scale = |v: u16| f32::from(v) / 65536.0;
    let third = patch
        .ch2
        .iter()
        .zip(&patch.ch3)
        .map(|(&c2, &c3)| (scale(c3) - scale(c2) + 5000.0 / 65536.0).clamp(0.0, 1.0))
        .collect();
    [
        third,
        patch.ch2.iter().map(|&v| scale(v)).collect(),
        patch.ch3.iter().map(|&v| scale(v)).collect(),
    ]
}

#[test]
fn opensrh_writes_the_metadata_and_every_patch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), SynthFormat::OpenSrh);
    let summary = run(&spec).unwrap();
    assert_eq!(
        (summary.patients, summary.slides, summary.patches),
        (12, 24, 96)
    );
    let out = &spec.out;
    assert_eq!(summary.bytes, total_size(out));
    assert!(out.join(COMPLETE_MARKER).is_file());
    assert!(!out.join(INCOMPLETE_MARKER).exists());

    let meta = read_json(&out.join("meta/opensrh.json"));
    let patients = meta.as_object().unwrap();
    assert_eq!(patients.len(), 12);
    let mut listed = BTreeSet::new();
    for (id, patient) in patients {
        assert!(id.starts_with("SYN_") && id.len() == 7, "{id}");
        let class = patient["class"].as_str().unwrap();
        assert!(CLASS_NAMES[..3].contains(&class), "{class}");
        let slides = patient["slides"].as_object().unwrap();
        assert_eq!(slides.keys().collect::<Vec<_>>(), ["1", "2"]);
        for (slide_id, slide) in slides {
            let (used, empty) = if class == "normal" {
                ("normal_patches", "tumor_patches")
            } else {
                ("tumor_patches", "normal_patches")
            };
            assert_eq!(slide[empty].as_array().unwrap().len(), 0, "{id}/{slide_id}");
            let paths = slide[used].as_array().unwrap();
            assert_eq!(paths.len(), 4);
            for (k, path) in paths.iter().enumerate() {
                let path = path.as_str().unwrap();
                assert_eq!(
                    path,
                    format!(
                        "studies/{id}/{slide_id}/patches/{id}-{slide_id}-{}.tif",
                        k + 1
                    )
                );
                assert!(out.join(path).is_file(), "{path}");
                listed.insert(path.to_owned());
            }
        }
    }
    // Nothing on disk that the metadata does not list.
    let on_disk: BTreeSet<String> = files_under(out)
        .into_iter()
        .filter(|f| f.starts_with("studies/"))
        .collect();
    assert_eq!(on_disk, listed);

    let split = read_json(&out.join("meta/train_val_split.json"));
    let ids = |key: &str| -> BTreeSet<String> {
        split[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let (train, val) = (ids("train"), ids("val"));
    assert_eq!((train.len(), val.len()), (9, 3));
    assert!(train.is_disjoint(&val));
    assert_eq!(
        train.union(&val).cloned().collect::<BTreeSet<_>>(),
        patients.keys().cloned().collect()
    );
    let val_classes: BTreeSet<&str> = val
        .iter()
        .map(|id| patients[id]["class"].as_str().unwrap())
        .collect();
    assert_eq!(val_classes.len(), 3, "one val patient per class");

    let root = fs::canonicalize(out).unwrap();
    assert_eq!(
        summary.config_hint,
        format!(
            "data.source = \"opensrh\"\ndata.db_root = \"{}\"\ndata.meta_json = \"opensrh.json\"\n\
             data.meta_split_json = \"train_val_split.json\"\ndata.image_size = 64",
            root.display()
        )
    );
}

#[test]
fn tiff_patches_decode_as_tifffile_shaped_two_page_uint16() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec_in(dir.path(), SynthFormat::OpenSrh);
    spec.size = 48;
    spec.classes = 7;
    spec.patients_per_class = 2;
    run(&spec).unwrap();
    let mut all = Vec::new();
    for file in files_under(&spec.out)
        .iter()
        .filter(|f| f.ends_with(".tif"))
    {
        let patch = read_srh(&spec.out.join(file));
        assert_eq!((patch.width, patch.height), (48, 48));
        assert_eq!(patch.description, "{\"shape\": [2, 48, 48]}");
        assert_ne!(patch.ch2, patch.ch3);
        all.extend(patch.ch2.iter().chain(&patch.ch3).copied());
        // The base-processed third channel has a real spread of values.
        let [third, _, _] = base_processed(&patch);
        let mean = third.iter().sum::<f32>() / third.len() as f32;
        let sd =
            (third.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / third.len() as f32).sqrt();
        assert!(
            mean > 0.05 && mean < 0.5 && sd > 0.015,
            "{file}: third channel {mean} ± {sd}"
        );
    }
    all.sort_unstable();
    let quantile = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    let (low, high) = (quantile(0.01), quantile(0.99));
    // Well inside the 16-bit range (no saturation), at the structures' full contrast.
    assert!(
        low > 5_000 && high < 58_000,
        "1%..99% of samples: {low}..{high}"
    );
}

#[test]
fn manifest_writes_the_csv_and_every_tile() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), SynthFormat::Manifest);
    let summary = run(&spec).unwrap();
    assert_eq!(
        (summary.patients, summary.slides, summary.patches),
        (12, 24, 96)
    );
    let out = &spec.out;
    assert_eq!(summary.bytes, total_size(out));

    let csv = fs::read_to_string(out.join("manifest.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("patient,slide,path,label,split"));
    let mut label_of = BTreeMap::new();
    let mut split_of = BTreeMap::new();
    let mut rows = 0;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let [patient, slide, path, label, split] = fields[..] else {
            panic!("row {line:?}")
        };
        assert!(
            path.starts_with(&format!("tiles/{patient}/{slide}/")) && path.ends_with(".png"),
            "{path}"
        );
        assert!(CLASS_NAMES[..3].contains(&label), "{label}");
        assert!(split == "train" || split == "val", "{split}");
        assert_eq!(*label_of.entry(patient.to_owned()).or_insert(label), label);
        assert_eq!(*split_of.entry(patient.to_owned()).or_insert(split), split);
        let (w, h, rgb) = read_rgb(&out.join(path));
        assert_eq!((w, h, rgb.len()), (64, 64, 64 * 64 * 3));
        rows += 1;
    }
    assert_eq!(rows, 96);
    assert_eq!(label_of.len(), 12);
    assert_eq!(split_of.values().filter(|s| **s == "val").count(), 3);
    assert!(
        summary
            .config_hint
            .starts_with("data.source = \"manifest\"\ndata.manifest = \"")
    );
    assert!(
        summary
            .config_hint
            .contains("manifest.csv\"\ndata.image_size = 64")
    );
}

#[test]
fn the_same_spec_gives_byte_identical_files() {
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (spec_a, spec_b) = (spec_in(a.path(), format), spec_in(b.path(), format));
        run(&spec_a).unwrap();
        run(&spec_b).unwrap();
        let files = files_under(&spec_a.out);
        assert_eq!(files, files_under(&spec_b.out));
        for file in &files {
            let (x, y) = (
                fs::read(spec_a.out.join(file)).unwrap(),
                fs::read(spec_b.out.join(file)).unwrap(),
            );
            assert!(x == y, "{format}: {file} differs between two runs");
        }
    }
}

#[test]
fn different_seeds_give_different_patches() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = spec_in(dir.path(), SynthFormat::OpenSrh);
    a.out = dir.path().join("a");
    let mut b = a.clone();
    b.out = dir.path().join("b");
    b.seed = 1;
    run(&a).unwrap();
    run(&b).unwrap();
    let files = files_under(&a.out);
    assert_eq!(
        files,
        files_under(&b.out),
        "the layout depends on the counts only"
    );
    for file in files.iter().filter(|f| f.ends_with(".tif")) {
        assert_ne!(
            fs::read(a.out.join(file)).unwrap(),
            fs::read(b.out.join(file)).unwrap(),
            "{file}"
        );
    }
    // Within one dataset, no two patches are the same.
    let distinct: BTreeSet<Vec<u8>> = files
        .iter()
        .filter(|f| f.ends_with(".tif"))
        .map(|f| fs::read(a.out.join(f)).unwrap())
        .collect();
    assert_eq!(distinct.len(), 96);
}

#[test]
fn refuses_a_directory_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), SynthFormat::OpenSrh);
    fs::create_dir(&spec.out).unwrap();
    fs::write(spec.out.join("notes.txt"), "mine").unwrap();
    let err = run(&spec).unwrap_err();
    assert!(matches!(err, SynthError::NotEmpty { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("\"notes.txt\"") && message.contains("choose a new or empty directory"),
        "{message}"
    );
    assert_eq!(
        files_under(&spec.out),
        ["notes.txt"],
        "nothing written or removed"
    );

    let mut file_spec = spec.clone();
    file_spec.out = spec.out.join("notes.txt");
    assert!(matches!(
        run(&file_spec).unwrap_err(),
        SynthError::NotADirectory { .. }
    ));
}

#[test]
fn an_interrupted_output_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), SynthFormat::Manifest);
    run(&spec).unwrap();
    // What a run killed half-way leaves: the marker not yet renamed.
    fs::rename(
        spec.out.join(COMPLETE_MARKER),
        spec.out.join(INCOMPLETE_MARKER),
    )
    .unwrap();
    let err = run(&spec).unwrap_err();
    assert!(matches!(err, SynthError::Interrupted { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("delete the directory and run hsat synth again"),
        "{err}"
    );
}

#[test]
fn a_previous_output_is_replaced_but_not_one_with_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec_in(dir.path(), SynthFormat::OpenSrh);
    run(&spec).unwrap();
    // Again with fewer patches and in the other format: nothing stale is left.
    spec.patches_per_slide = 2;
    spec.format = SynthFormat::Manifest;
    let summary = run(&spec).unwrap();
    let files = files_under(&spec.out);
    assert_eq!(files.len(), 48 + 2, "{files:?}"); // tiles, manifest.csv, marker
    assert_eq!(summary.patches, 48);
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("tiles/") || f == "manifest.csv" || f == COMPLETE_MARKER)
    );

    fs::write(spec.out.join("results.csv"), "precious").unwrap();
    let err = run(&spec).unwrap_err();
    assert!(matches!(err, SynthError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("\"results.csv\""), "{err}");
    assert!(
        spec.out.join(COMPLETE_MARKER).is_file(),
        "the previous output is left alone"
    );
}

#[test]
fn invalid_specs_are_rejected_with_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let base = spec_in(dir.path(), SynthFormat::OpenSrh);
    type Change = fn(&mut SynthSpec);
    let cases: [(Change, &str); 6] = [
        (|s| s.classes = 8, "classes = 8: must be 2 to 7"),
        (|s| s.classes = 1, "classes = 1: must be 2 to 7"),
        (
            |s| s.val_patients_per_class = 4,
            "val_patients_per_class = 4: must be less than patients_per_class (4)",
        ),
        (
            |s| s.slides_per_patient = 0,
            "slides_per_patient = 0: must be at least 1",
        ),
        (|s| s.size = 4, "size = 4: must be 8 to 1024 pixels"),
        (
            |s| s.patches_per_slide = usize::MAX,
            "must be at most 10000000",
        ),
    ];
    for (change, expected) in cases {
        let mut spec = base.clone();
        change(&mut spec);
        let message = run(&spec).unwrap_err().to_string();
        assert!(message.contains(expected), "{message}");
    }
    assert!(!base.out.exists(), "nothing is created for an invalid spec");
}

#[test]
fn progress_counts_every_patch_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), SynthFormat::Manifest);
    let mut calls = Vec::new();
    synthesize(&spec, &mut |done, total| calls.push((done, total))).unwrap();
    let expected: Vec<(usize, usize)> = (0..=96).map(|done| (done, 96)).collect();
    assert_eq!(calls, expected);
}

#[test]
fn format_names_round_trip() {
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        assert_eq!(format.to_string().parse::<SynthFormat>().unwrap(), format);
    }
    let err = "tcga".parse::<SynthFormat>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown dataset format \"tcga\": use \"opensrh\" or \"manifest\""
    );
}

// ---- The structure: statistics over a larger dataset -------------------------------

/// Per-patch channel images of a dataset, with their patient's id and class.
struct Measured {
    patient: String,
    class: String,
    /// Channel-major pixel values in [0, 1]: base-processed SRH or RGB / 255.
    channels: Vec<Vec<f32>>,
    size: usize,
}

fn measure(spec: &SynthSpec) -> Vec<Measured> {
    run(spec).unwrap();
    let out = &spec.out;
    let mut patches = Vec::new();
    match spec.format {
        SynthFormat::OpenSrh => {
            let meta = read_json(&out.join("meta/opensrh.json"));
            for (id, patient) in meta.as_object().unwrap() {
                let class = patient["class"].as_str().unwrap();
                for slide in patient["slides"].as_object().unwrap().values() {
                    let key = if class == "normal" {
                        "normal_patches"
                    } else {
                        "tumor_patches"
                    };
                    for path in slide[key].as_array().unwrap() {
                        let patch = read_srh(&out.join(path.as_str().unwrap()));
                        patches.push(Measured {
                            patient: id.clone(),
                            class: class.to_owned(),
                            channels: base_processed(&patch).to_vec(),
                            size: patch.width,
                        });
                    }
                }
            }
        }
        SynthFormat::Manifest => {
            let csv = fs::read_to_string(out.join("manifest.csv")).unwrap();
            for line in csv.lines().skip(1) {
                let fields: Vec<&str> = line.split(',').collect();
                let (w, _, rgb) = read_rgb(&out.join(fields[2]));
                let channels = (0..3)
                    .map(|c| {
                        rgb.iter()
                            .skip(c)
                            .step_by(3)
                            .map(|&v| f32::from(v) / 255.0)
                            .collect()
                    })
                    .collect();
                patches.push(Measured {
                    patient: fields[0].to_owned(),
                    class: fields[3].to_owned(),
                    channels,
                    size: w,
                });
            }
        }
    }
    patches
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn sd(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

/// Averages per-patch feature vectors per patient: (class, mean vector) by patient.
fn per_patient(
    patches: &[Measured],
    feature: impl Fn(&Measured) -> Vec<f64>,
) -> BTreeMap<String, (String, Vec<f64>)> {
    let mut sums: BTreeMap<String, (String, Vec<f64>, usize)> = BTreeMap::new();
    for patch in patches {
        let f = feature(patch);
        let entry = sums
            .entry(patch.patient.clone())
            .or_insert_with(|| (patch.class.clone(), vec![0.0; f.len()], 0));
        entry.1.iter_mut().zip(&f).for_each(|(s, v)| *s += v);
        entry.2 += 1;
    }
    sums.into_iter()
        .map(|(id, (class, sum, n))| (id, (class, sum.into_iter().map(|s| s / n as f64).collect())))
        .collect()
}

fn channel_means(patch: &Measured) -> Vec<f64> {
    patch
        .channels
        .iter()
        .map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>() / c.len() as f64)
        .collect()
}

/// For each channel: (range of the class means, sd of the patient means).
fn class_and_patient_spread(patches: &[Measured]) -> Vec<(f64, f64)> {
    let patients = per_patient(patches, channel_means);
    let channels = patients.values().next().unwrap().1.len();
    (0..channels)
        .map(|c| {
            let patient_means: Vec<f64> = patients.values().map(|(_, m)| m[c]).collect();
            let mut by_class: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            for (class, m) in patients.values() {
                by_class.entry(class).or_default().push(m[c]);
            }
            let class_means: Vec<f64> = by_class.values().map(|v| mean(v)).collect();
            let range = class_means.iter().cloned().fold(f64::MIN, f64::max)
                - class_means.iter().cloned().fold(f64::MAX, f64::min);
            (range, sd(&patient_means))
        })
        .collect()
}

/// Rotation-invariant texture statistics of one channel of a patch, standardized over
/// the patch first (so no mean or contrast information is left): autocorrelation at a
/// few distances, the coherence of gradient orientations, and the skewness.
fn texture_features(patch: &Measured, channel: usize) -> Vec<f64> {
    let n = patch.size;
    let raw: Vec<f64> = patch.channels[channel]
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let (m, s) = (mean(&raw), sd(&raw).max(1e-9));
    let z: Vec<f64> = raw.iter().map(|v| (v - m) / s).collect();
    let at = |x: usize, y: usize| z[y * n + x];
    let mut features = Vec::new();
    for lag in [1, 2, 3, 5, 8, 12] {
        let mut sum = 0.0;
        let mut count = 0.0;
        for y in 0..n - lag {
            for x in 0..n - lag {
                sum += at(x, y) * (at(x + lag, y) + at(x, y + lag));
                count += 2.0;
            }
        }
        features.push(sum / count);
    }
    // Structure tensor over the patch: how aligned the gradients are.
    let (mut jxx, mut jyy, mut jxy) = (0.0, 0.0, 0.0);
    for y in 1..n - 1 {
        for x in 1..n - 1 {
            let gx = (at(x + 1, y) - at(x - 1, y)) / 2.0;
            let gy = (at(x, y + 1) - at(x, y - 1)) / 2.0;
            jxx += gx * gx;
            jyy += gy * gy;
            jxy += gx * gy;
        }
    }
    let coherence = ((jxx - jyy).powi(2) + 4.0 * jxy * jxy).sqrt() / (jxx + jyy).max(1e-9);
    features.push(coherence);
    features.push(z.iter().map(|v| v.powi(3)).sum::<f64>() / z.len() as f64);
    features
}

/// Leave-one-patient-out nearest class centroid on per-patient features (each feature
/// z-scored over patients): the fraction of patients whose class is predicted.
fn nearest_centroid_accuracy(patients: &BTreeMap<String, (String, Vec<f64>)>) -> f64 {
    let dims = patients.values().next().unwrap().1.len();
    let columns: Vec<(f64, f64)> = (0..dims)
        .map(|d| {
            let values: Vec<f64> = patients.values().map(|(_, f)| f[d]).collect();
            (mean(&values), sd(&values).max(1e-12))
        })
        .collect();
    let z = |f: &[f64]| -> Vec<f64> {
        f.iter()
            .zip(&columns)
            .map(|(v, (m, s))| (v - m) / s)
            .collect()
    };
    let mut correct = 0;
    for (held_out, (class, features)) in patients {
        let mut centroids: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
        for (id, (c, f)) in patients {
            if id == held_out {
                continue;
            }
            let entry = centroids.entry(c).or_insert_with(|| (vec![0.0; dims], 0));
            entry.0.iter_mut().zip(z(f)).for_each(|(s, v)| *s += v);
            entry.1 += 1;
        }
        let query = z(features);
        let predicted = centroids
            .iter()
            .map(|(c, (sum, n))| {
                let distance: f64 = sum
                    .iter()
                    .zip(&query)
                    .map(|(s, q)| (s / *n as f64 - q).powi(2))
                    .sum();
                (distance, *c)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap()
            .1;
        correct += usize::from(predicted == class);
    }
    correct as f64 / patients.len() as f64
}

fn structure_spec(dir: &Path, format: SynthFormat, seed: u64) -> SynthSpec {
    let mut spec = SynthSpec::new(dir.join(format!("{format}-{seed}")), format);
    spec.classes = 7;
    spec.patients_per_class = 6;
    spec.slides_per_patient = 2;
    spec.patches_per_slide = 4;
    spec.seed = seed;
    spec
}

#[test]
fn mean_colour_varies_by_patient_not_by_class() {
    let dir = tempfile::tempdir().unwrap();
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        for seed in [0, 7] {
            let patches = measure(&structure_spec(dir.path(), format, seed));
            for (channel, (class_range, patient_sd)) in
                class_and_patient_spread(&patches).into_iter().enumerate()
            {
                println!(
                    "{format} seed {seed} channel {channel}: class means differ by {class_range:.4}, \
                     patient means sd {patient_sd:.4} (ratio {:.2})",
                    class_range / patient_sd
                );
                assert!(
                    class_range < patient_sd,
                    "{format} seed {seed} channel {channel}: class means span {class_range}, patient sd {patient_sd}"
                );
            }
        }
    }
}

#[test]
fn texture_tells_the_class_and_mean_colour_does_not() {
    let dir = tempfile::tempdir().unwrap();
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        for seed in [3, 11] {
            let patches = measure(&structure_spec(dir.path(), format, seed));
            // The nuclear channel: base-processed CH3 - CH2, or green for H&E.
            let channel = match format {
                SynthFormat::OpenSrh => 0,
                SynthFormat::Manifest => 1,
            };
            let texture =
                nearest_centroid_accuracy(&per_patient(&patches, |p| texture_features(p, channel)));
            let colour = nearest_centroid_accuracy(&per_patient(&patches, channel_means));
            println!(
                "{format} seed {seed}: nearest-centroid patient accuracy (7 classes, chance 0.14): \
                 texture {texture:.2}, mean colour {colour:.2}"
            );
            assert!(
                texture >= 0.7,
                "{format} seed {seed}: texture accuracy {texture}"
            );
            assert!(
                colour <= 0.4,
                "{format} seed {seed}: mean-colour accuracy {colour}"
            );
        }
    }
}

/// Timings; run with `--release -- --ignored --nocapture`.
#[test]
#[ignore = "timing, not a check"]
fn timings() {
    let dir = tempfile::tempdir().unwrap();
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        let spec = SynthSpec::new(dir.path().join(format!("default-{format}")), format);
        let started = Instant::now();
        let summary = run(&spec).unwrap();
        println!(
            "{format} default ({} patches of 64 px): {:.3} s, {:.1} MB",
            summary.patches,
            started.elapsed().as_secs_f64(),
            summary.bytes as f64 / 1e6
        );
        let mut big = SynthSpec::new(dir.path().join(format!("big-{format}")), format);
        big.size = 300;
        big.classes = 7;
        big.patients_per_class = 4;
        big.patches_per_slide = 20;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let summary = run(&big).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{format} {} patches of 300 px on {threads} threads: {seconds:.2} s = {:.0} patches/s ({:.0} per thread), {:.1} MB",
            summary.patches,
            summary.patches as f64 / seconds,
            summary.patches as f64 / seconds / threads as f64,
            summary.bytes as f64 / 1e6
        );
    }
}

/// Keeps a default dataset of each format under `$HSAT_SYNTH_KEEP` for a look with
/// other tools (`scripts/check_synth.py`).
#[test]
#[ignore = "writes outside the temporary directory"]
fn keep_a_sample() {
    let Some(root) = std::env::var_os("HSAT_SYNTH_KEEP").map(PathBuf::from) else {
        return;
    };
    for format in [SynthFormat::OpenSrh, SynthFormat::Manifest] {
        let mut spec = SynthSpec::new(root.join(format.name()), format);
        spec.classes = 7;
        spec.size = 128;
        run(&spec).unwrap();
    }
}
