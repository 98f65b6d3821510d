//! The I/O of `hsat synth`: claiming the output directory, writing the patches on
//! every core, then the metadata, then the completion marker.
//!
//! Order on disk, so that an interrupted run is always recognisable:
//!
//! 1. [`INCOMPLETE_MARKER`] (the spec, as JSON);
//! 2. the patch files;
//! 3. the metadata (`meta/opensrh.json` and `meta/train_val_split.json`, or
//!    `manifest.csv`), each written to a temporary name and renamed;
//! 4. the marker renamed to [`COMPLETE_MARKER`].

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::Serialize;

use super::plan::Plan;
use super::render::{self, Scratch};
use super::{
    CLASS_NAMES, COMPLETE_MARKER, INCOMPLETE_MARKER, SynthError, SynthFormat, SynthSpec,
    SynthSummary, tiff,
};

/// Version of the generator, recorded in the marker: bump it when the same spec
/// starts giving different files.
const GENERATOR_VERSION: u32 = 1;

/// Top-level entries an `hsat synth` output may hold.
const OWNED_ENTRIES: [&str; 5] = ["meta", "studies", "tiles", "manifest.csv", COMPLETE_MARKER];

/// The metadata file names under `meta/` (the defaults of `data.meta_json` and
/// `data.meta_split_json`).
const META_JSON: &str = "opensrh.json";
const SPLIT_JSON: &str = "train_val_split.json";
const MANIFEST_CSV: &str = "manifest.csv";

/// Writes `plan` (made from `spec`) under `spec.out`.
pub(super) fn write(
    spec: &SynthSpec,
    plan: &Plan,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary, SynthError> {
    let out = spec.out.as_path();
    claim_directory(out)?;
    let marker = out.join(INCOMPLETE_MARKER);
    let mut bytes = write_file(&marker, &marker_json(spec, plan))?;

    create_directories(spec, plan)?;
    bytes += write_patches(spec, plan, progress)?;
    bytes += match spec.format {
        SynthFormat::OpenSrh => {
            let meta = out.join("meta");
            fs::create_dir_all(&meta).map_err(SynthError::io("creating", &meta))?;
            write_atomically(&meta.join(META_JSON), &opensrh_json(plan))?
                + write_atomically(&meta.join(SPLIT_JSON), &split_json(plan))?
        }
        SynthFormat::Manifest => write_atomically(&out.join(MANIFEST_CSV), &manifest_csv(plan))?,
    };
    let complete = out.join(COMPLETE_MARKER);
    fs::rename(&marker, &complete).map_err(SynthError::io("renaming", &marker))?;

    Ok(SynthSummary {
        patients: plan.patients.len(),
        slides: plan.slide_count(),
        patches: plan.patch_count(),
        bytes,
        config_hint: config_hint(spec),
    })
}

/// Makes `out` an empty directory we may write into, or says why not.
fn claim_directory(out: &Path) -> Result<(), SynthError> {
    match fs::metadata(out) {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            return fs::create_dir_all(out).map_err(SynthError::io("creating", out));
        }
        Err(err) => return Err(SynthError::io("reading", out)(err)),
        Ok(meta) if !meta.is_dir() => {
            return Err(SynthError::NotADirectory {
                path: out.to_path_buf(),
            });
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(out).map_err(SynthError::io("listing", out))? {
        let entry = entry.map_err(SynthError::io("listing", out))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if names.iter().any(|name| name == INCOMPLETE_MARKER) {
        return Err(SynthError::Interrupted {
            path: out.to_path_buf(),
        });
    }
    if !names.iter().any(|name| name == COMPLETE_MARKER) {
        if names.is_empty() {
            return Ok(());
        }
        return Err(SynthError::NotEmpty {
            path: out.to_path_buf(),
            entries: some_of(&names),
        });
    }
    let foreign: Vec<String> = names
        .iter()
        .filter(|name| !OWNED_ENTRIES.contains(&name.as_str()))
        .cloned()
        .collect();
    if !foreign.is_empty() {
        return Err(SynthError::Foreign {
            path: out.to_path_buf(),
            entries: some_of(&foreign),
        });
    }
    // A previous output of ours: mark it unfinished first, so that an interruption
    // while it is being replaced is noticed, then clear it.
    let complete = out.join(COMPLETE_MARKER);
    let incomplete = out.join(INCOMPLETE_MARKER);
    fs::rename(&complete, &incomplete).map_err(SynthError::io("renaming", &complete))?;
    for name in &names {
        let path = out.join(name);
        if name == COMPLETE_MARKER {
            continue;
        }
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(SynthError::io("removing", &path))?;
    }
    Ok(())
}

/// Up to three names, quoted, and how many more.
fn some_of(names: &[String]) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(3)
        .map(|name| format!("{name:?}"))
        .collect();
    match names.len() {
        n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
        _ => shown.join(", "),
    }
}

/// The marker's content: what was asked for and what it makes.
fn marker_json(spec: &SynthSpec, plan: &Plan) -> Vec<u8> {
    #[derive(Serialize)]
    struct Marker<'a> {
        generator: &'a str,
        version: u32,
        format: &'a str,
        classes: usize,
        patients_per_class: usize,
        val_patients_per_class: usize,
        slides_per_patient: usize,
        patches_per_slide: usize,
        size: usize,
        seed: u64,
        patients: usize,
        patches: usize,
    }
    let marker = Marker {
        generator: "hsat synth",
        version: GENERATOR_VERSION,
        format: spec.format.name(),
        classes: spec.classes,
        patients_per_class: spec.patients_per_class,
        val_patients_per_class: spec.val_patients_per_class,
        slides_per_patient: spec.slides_per_patient,
        patches_per_slide: spec.patches_per_slide,
        size: spec.size,
        seed: spec.seed,
        patients: plan.patients.len(),
        patches: plan.patch_count(),
    };
    pretty_json(&marker)
}

/// Pretty JSON with a final newline. Serializing these plain structs cannot fail.
fn pretty_json(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// `out` joined with a `/`-separated relative path.
fn join(out: &Path, relative: &str) -> PathBuf {
    relative
        .split('/')
        .fold(out.to_path_buf(), |path, part| path.join(part))
}

/// Every directory that will hold patches.
fn create_directories(spec: &SynthSpec, plan: &Plan) -> Result<(), SynthError> {
    for patient in &plan.patients {
        for slide in &patient.slides {
            let Some(first) = slide.patches.first() else {
                continue;
            };
            let file = join(&spec.out, &first.path);
            let Some(dir) = file.parent() else { continue };
            fs::create_dir_all(dir).map_err(SynthError::io("creating", dir))?;
        }
    }
    Ok(())
}

/// Renders and writes every patch, on as many threads as there are cores; returns the
/// bytes written. Which thread makes which patch does not change any file.
fn write_patches(
    spec: &SynthSpec,
    plan: &Plan,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<u64, SynthError> {
    let coordinates = plan.patch_coordinates();
    let total = coordinates.len();
    progress(0, total);
    let threads = std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(total)
        .max(1);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel::<Result<u64, SynthError>>();

    std::thread::scope(|scope| {
        for _ in 0..threads {
            let sender = sender.clone();
            let (next, stop, coordinates) = (&next, &stop, &coordinates);
            scope.spawn(move || {
                let mut scratch = Scratch::default();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(p, s, k)) = coordinates.get(i) else {
                        break;
                    };
                    let result = write_patch(spec, plan, (p, s, k), &mut scratch);
                    if sender.send(result).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);

        let mut done = 0;
        let mut bytes = 0;
        let mut failure = None;
        for result in receiver {
            match result {
                Ok(written) => {
                    done += 1;
                    bytes += written;
                    progress(done, total);
                }
                Err(err) => {
                    stop.store(true, Ordering::Relaxed);
                    failure.get_or_insert(err);
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(bytes),
        }
    })
}

/// Renders and writes one patch; returns its size in bytes.
fn write_patch(
    spec: &SynthSpec,
    plan: &Plan,
    (p, s, k): (usize, usize, usize),
    scratch: &mut Scratch,
) -> Result<u64, SynthError> {
    let patient = &plan.patients[p];
    let slide = &patient.slides[s];
    let patch = &slide.patches[k];
    let path = join(&spec.out, &patch.path);
    let size = spec.size;
    let side = size as u32;
    let bytes = match spec.format {
        SynthFormat::OpenSrh => {
            let (ch2, ch3) = render::render_srh(patient, slide, patch.seed, size, scratch);
            tiff::encode_two_channel_u16(side, side, &ch2, &ch3)
        }
        SynthFormat::Manifest => {
            let rgb = render::render_rgb(patient, slide, patch.seed, size, scratch);
            encode_png(side, &rgb).map_err(|source| SynthError::Png {
                path: path.clone(),
                source,
            })?
        }
    };
    write_file(&path, &bytes)
}

/// An RGB 8-bit PNG of a `side` x `side` image.
fn encode_png(side: u32, rgb: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<u64, SynthError> {
    fs::write(path, bytes).map_err(SynthError::io("writing", path))?;
    Ok(bytes.len() as u64)
}

/// Writes `<path>.tmp`, then renames it to `path`: readers see all of it or nothing.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<u64, SynthError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let written = write_file(&temporary, bytes)?;
    fs::rename(&temporary, path).map_err(SynthError::io("renaming", &temporary))?;
    Ok(written)
}

/// `meta/opensrh.json`: patient -> class and slides -> patch lists.
fn opensrh_json(plan: &Plan) -> Vec<u8> {
    #[derive(Serialize)]
    struct SlideMeta<'a> {
        normal_patches: Vec<&'a str>,
        tumor_patches: Vec<&'a str>,
    }
    #[derive(Serialize)]
    struct PatientMeta<'a> {
        class: &'a str,
        slides: BTreeMap<&'a str, SlideMeta<'a>>,
    }
    let meta: BTreeMap<&str, PatientMeta<'_>> = plan
        .patients
        .iter()
        .map(|patient| {
            let class = CLASS_NAMES[patient.class];
            let slides = patient
                .slides
                .iter()
                .map(|slide| {
                    let paths: Vec<&str> = slide
                        .patches
                        .iter()
                        .map(|patch| patch.path.as_str())
                        .collect();
                    // A normal patient's patches are normal; anyone else's are tumour.
                    let meta = if class == "normal" {
                        SlideMeta {
                            normal_patches: paths,
                            tumor_patches: Vec::new(),
                        }
                    } else {
                        SlideMeta {
                            normal_patches: Vec::new(),
                            tumor_patches: paths,
                        }
                    };
                    (slide.id.as_str(), meta)
                })
                .collect();
            (patient.id.as_str(), PatientMeta { class, slides })
        })
        .collect();
    pretty_json(&meta)
}

/// `meta/train_val_split.json`: `{"train": [...], "val": [...]}`.
fn split_json(plan: &Plan) -> Vec<u8> {
    #[derive(Serialize)]
    struct SplitMeta<'a> {
        train: Vec<&'a str>,
        val: Vec<&'a str>,
    }
    let ids = |val: bool| {
        plan.patients
            .iter()
            .filter(|patient| patient.val == val)
            .map(|patient| patient.id.as_str())
            .collect()
    };
    pretty_json(&SplitMeta {
        train: ids(false),
        val: ids(true),
    })
}

/// `manifest.csv`: one row per patch; paths relative to the CSV's directory. Ids,
/// paths and labels never need quoting.
fn manifest_csv(plan: &Plan) -> Vec<u8> {
    let mut csv = String::from("patient,slide,path,label,split\n");
    for patient in &plan.patients {
        let split = if patient.val { "val" } else { "train" };
        for slide in &patient.slides {
            for patch in &slide.patches {
                csv.push_str(&format!(
                    "{},{},{},{},{split}\n",
                    patient.id, slide.id, patch.path, CLASS_NAMES[patient.class]
                ));
            }
        }
    }
    csv.into_bytes()
}

/// The `data.*` lines that train on the output (the path made absolute when it can
/// be, so they work from any directory).
fn config_hint(spec: &SynthSpec) -> String {
    let root = fs::canonicalize(&spec.out).unwrap_or_else(|_| spec.out.clone());
    // A JSON string literal is a valid TOML basic string.
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"));
    let root_text = root.to_string_lossy();
    let mut lines = vec![format!("data.source = {}", quote(spec.format.name()))];
    match spec.format {
        SynthFormat::OpenSrh => {
            lines.push(format!("data.db_root = {}", quote(&root_text)));
            lines.push(format!("data.meta_json = {}", quote(META_JSON)));
            lines.push(format!("data.meta_split_json = {}", quote(SPLIT_JSON)));
        }
        SynthFormat::Manifest => {
            let csv = root.join(MANIFEST_CSV);
            lines.push(format!("data.manifest = {}", quote(&csv.to_string_lossy())));
        }
    }
    lines.push(format!("data.image_size = {}", spec.size));
    lines.join("\n")
}
