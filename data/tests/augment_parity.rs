//! Parity of `hsat_data::image` with the Python reference on the same inputs:
//! every deterministic augmentation op against torchvision 0.28 on float32 tensors,
//! SRH base processing against HiDisc's, TIFF decoding against tifffile (every
//! 2-channel uint16 layout it writes, 8-bit RGB), PNG and JPEG decoding against PIL;
//! plus truncated files (errors, never panics) and, ignored by default, the throughput
//! of `augment` on 300x300 patches.
//!
//! The fixtures come from `scripts/fixtures/augment_fixtures.py`; regenerate them with
//!
//! ```text
//! bash scripts/setup.sh
//! ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/augment_fixtures.py
//! ```
//!
//! Run with `cargo test -p hsat-data --test augment_parity -- --nocapture` to see
//! the error of every op, and the throughput with
//! `cargo test --release -p hsat-data --test augment_parity -- --ignored --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hsat_core::rng::SplitMix64;
use hsat_data::image::{
    AugmentConfig, Decoded, Image, ImageError, augment, base_process, decode_bytes, decode_file,
    ops, resize_to,
};
use safetensors::{Dtype, SafeTensors};

/// Largest error tolerated against torchvision: one 8-bit grey level.
const TOLERANCE: f32 = 1.0 / 255.0;

/// Largest difference, in 8-bit levels, between our JPEG decoding and PIL's
/// (libjpeg-turbo); PNG and TIFF must match exactly.
const JPEG_TOLERANCE: u8 = 3;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/augment.safetensors")
}

/// The fixture file, read once per test.
struct Fixtures {
    bytes: Vec<u8>,
}

impl Fixtures {
    fn load() -> Self {
        let path = fixture_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/fixtures/augment_fixtures.py",
                path.display()
            )
        });
        Fixtures { bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("the fixture file is valid safetensors")
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    fn raw(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let tensors = self.tensors();
        let view = tensors
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture key {key} missing; regenerate the fixtures"));
        (view.dtype(), view.shape().to_vec(), view.data().to_vec())
    }

    fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.raw(key);
        assert_eq!(dtype, Dtype::F32, "{key}");
        let values = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (shape, values)
    }

    fn u16(&self, key: &str) -> (Vec<usize>, Vec<u16>) {
        let (dtype, shape, data) = self.raw(key);
        assert_eq!(dtype, Dtype::U16, "{key}");
        let values = data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        (shape, values)
    }

    fn u8(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let (dtype, shape, data) = self.raw(key);
        assert_eq!(dtype, Dtype::U8, "{key}");
        (shape, data)
    }

    /// A `[C, H, W]` float tensor as an image.
    fn image(&self, key: &str) -> Image {
        let (shape, data) = self.f32(key);
        assert_eq!(shape.len(), 3, "{key} has shape {shape:?}");
        Image::new(shape[0], shape[1], shape[2], data)
    }
}

/// Max absolute difference; infinite if the shapes differ.
fn max_error(got: &Image, expected: &Image) -> f32 {
    if (got.channels, got.height, got.width) != (expected.channels, expected.height, expected.width)
    {
        return f32::INFINITY;
    }
    got.data
        .iter()
        .zip(&expected.data)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() })
        .fold(0.0, f32::max)
}

type Op = Box<dyn Fn(&Image) -> Image>;

/// `(fixture name, input key, our op with the same parameters)`.
fn op_table(noise: Vec<f32>) -> Vec<(&'static str, &'static str, Op)> {
    let mut table: Vec<(&'static str, &'static str, Op)> = vec![
        ("hflip", "x", Box::new(ops::hflip)),
        ("vflip", "x", Box::new(ops::vflip)),
        (
            "noise_0.05",
            "x",
            Box::new(move |x| ops::gaussian_noise(x, 0.05, &noise)),
        ),
        (
            "brightness_1.3",
            "x",
            Box::new(|x| ops::adjust_brightness(x, 1.3)),
        ),
        (
            "brightness_0.6",
            "x",
            Box::new(|x| ops::adjust_brightness(x, 0.6)),
        ),
        (
            "contrast_1.4",
            "x",
            Box::new(|x| ops::adjust_contrast(x, 1.4)),
        ),
        (
            "contrast_0.7",
            "x",
            Box::new(|x| ops::adjust_contrast(x, 0.7)),
        ),
        (
            "saturation_1.5",
            "x",
            Box::new(|x| ops::adjust_saturation(x, 1.5)),
        ),
        (
            "saturation_0.3",
            "x",
            Box::new(|x| ops::adjust_saturation(x, 0.3)),
        ),
        ("hue_0.08", "x", Box::new(|x| ops::adjust_hue(x, 0.08))),
        ("hue_-0.1", "x", Box::new(|x| ops::adjust_hue(x, -0.1))),
        ("hue_0.5", "x", Box::new(|x| ops::adjust_hue(x, 0.5))),
        ("hue_-0.5", "x", Box::new(|x| ops::adjust_hue(x, -0.5))),
        ("autocontrast", "x_low", Box::new(ops::autocontrast)),
        ("autocontrast_x", "x", Box::new(ops::autocontrast)),
        ("solarize_0.2", "x", Box::new(|x| ops::solarize(x, 0.2))),
        ("solarize_0.6", "x", Box::new(|x| ops::solarize(x, 0.6))),
        (
            "sharpness_2.0",
            "x",
            Box::new(|x| ops::adjust_sharpness(x, 2.0)),
        ),
        (
            "sharpness_0.5",
            "x",
            Box::new(|x| ops::adjust_sharpness(x, 0.5)),
        ),
        (
            "blur_5_1.0",
            "x",
            Box::new(|x| ops::gaussian_blur(x, 5, 1.0)),
        ),
        (
            "blur_5_0.4",
            "x",
            Box::new(|x| ops::gaussian_blur(x, 5, 0.4)),
        ),
        (
            "blur_5_1.7",
            "x",
            Box::new(|x| ops::gaussian_blur(x, 5, 1.7)),
        ),
        (
            "affine_7.3_3_-5",
            "x",
            Box::new(|x| ops::affine(x, 7.3, (3, -5))),
        ),
        (
            "affine_-10.0_0_0",
            "x",
            Box::new(|x| ops::affine(x, -10.0, (0, 0))),
        ),
        (
            "affine_0.0_4_12",
            "x",
            Box::new(|x| ops::affine(x, 0.0, (4, 12))),
        ),
        (
            "affine_90.0_0_0",
            "x",
            Box::new(|x| ops::affine(x, 90.0, (0, 0))),
        ),
        (
            "affine_-4.2_-5_9",
            "x",
            Box::new(|x| ops::affine(x, -4.2, (-5, 9))),
        ),
        (
            "erase_5_7_10_20",
            "x",
            Box::new(|x| ops::erase(x, 5, 7, 10, 20)),
        ),
        ("resize_24", "x", Box::new(|x| resize_to(x, 24))),
        ("resize_64", "x", Box::new(|x| resize_to(x, 64))),
    ];
    for (name, (top, left, h, w, size)) in [
        ("resized_crop_3_5_30_40_16", (3, 5, 30, 40, 16)),
        ("resized_crop_10_7_12_20_56", (10, 7, 12, 20, 56)),
        ("resized_crop_0_0_40_48_40", (0, 0, 40, 48, 40)),
        ("resized_crop_2_3_17_33_64", (2, 3, 17, 33, 64)),
    ] {
        table.push((
            name,
            "x",
            Box::new(move |x| ops::resized_crop(x, top, left, h, w, size)),
        ));
    }
    table
}

#[test]
fn deterministic_ops_match_torchvision() {
    let fixtures = Fixtures::load();
    let (_, noise) = fixtures.f32("noise");
    let table = op_table(noise);
    let mut errors = BTreeMap::new();
    for (name, input, op) in &table {
        let got = op(&fixtures.image(input));
        let expected = fixtures.image(&format!("op.{name}"));
        errors.insert(*name, max_error(&got, &expected));
    }
    // Every op of the fixture file has a Rust counterpart in the table.
    let covered: Vec<String> = table.iter().map(|(n, _, _)| format!("op.{n}")).collect();
    for name in fixtures.names() {
        if name.starts_with("op.") {
            assert!(
                covered.contains(&name),
                "{name} has no Rust op in the table"
            );
        }
    }
    println!("max |rust - torchvision| per op:");
    for (name, error) in &errors {
        println!("  {name:<28} {error:.3e}");
    }
    let failed: Vec<_> = errors.iter().filter(|(_, e)| **e > TOLERANCE).collect();
    assert!(failed.is_empty(), "ops beyond 1/255: {failed:?}");
}

#[test]
fn srh_base_processing_matches_hidisc() {
    let fixtures = Fixtures::load();
    let (shape, srh) = fixtures.u16("srh");
    let (h, w) = (shape[1], shape[2]);
    let decoded = Decoded::Srh {
        height: h,
        width: w,
        ch2: srh[..h * w].to_vec(),
        ch3: srh[h * w..].to_vec(),
    };
    let got = base_process(&decoded);
    let expected = fixtures.image("base.srh");
    // Every step is exact in f32: bit-identical.
    assert_eq!(max_error(&got, &expected), 0.0);
    assert!(got.data.iter().all(|x| (0.0..=1.0).contains(x)));
}

fn decoded_srh(decoded: &Decoded) -> Vec<u16> {
    match decoded {
        Decoded::Srh { ch2, ch3, .. } => ch2.iter().chain(ch3).copied().collect(),
        other => panic!("expected an SRH patch, got {other:?}"),
    }
}

#[test]
fn tiff_layouts_written_by_tifffile_decode_to_identical_values() {
    let fixtures = Fixtures::load();
    let (shape, srh) = fixtures.u16("srh");
    let srh_files: Vec<String> = fixtures
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("file.srh_").map(str::to_owned))
        .collect();
    assert!(srh_files.len() >= 7, "{srh_files:?}");
    for layout in &srh_files {
        let (_, bytes) = fixtures.u8(&format!("file.srh_{layout}"));
        let (_, expected) = fixtures.u16(&format!("expect.srh_{layout}"));
        assert_eq!(expected, srh, "tifffile reads {layout} as the SRH array");
        let decoded = decode_bytes(&bytes).unwrap_or_else(|e| panic!("layout {layout}: {e}"));
        assert_eq!(
            (decoded.height(), decoded.width()),
            (shape[1], shape[2]),
            "{layout}"
        );
        assert_eq!(decoded_srh(&decoded), srh, "layout {layout}");
    }
    for name in ["tiff_rgb8", "tiff_rgb8_planar"] {
        let (_, bytes) = fixtures.u8(&format!("file.{name}"));
        let (_, expected) = fixtures.u8(&format!("expect.{name}"));
        match decode_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")) {
            Decoded::Rgb8 { data, .. } => assert_eq!(data, expected, "{name}"),
            other => panic!("{name}: expected RGB, got {other:?}"),
        }
    }
}

#[test]
fn png_and_jpeg_written_by_pil_decode_to_the_values_pil_reads() {
    let fixtures = Fixtures::load();
    for name in [
        "png_rgb8",
        "png_rgba8",
        "png_gray8",
        "png_palette",
        "jpeg_rgb_420",
        "jpeg_rgb_444",
        "jpeg_gray",
    ] {
        let (_, bytes) = fixtures.u8(&format!("file.{name}"));
        let (shape, expected) = fixtures.u8(&format!("expect.{name}"));
        let decoded = decode_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((decoded.height(), decoded.width()), (shape[0], shape[1]));
        let data = match (&decoded, shape.len()) {
            (Decoded::Rgb8 { data, .. }, 3) | (Decoded::Gray8 { data, .. }, 2) => data,
            (other, _) => panic!("{name}: unexpected {other:?} for PIL shape {shape:?}"),
        };
        let differing = data.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let worst = data
            .iter()
            .zip(&expected)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap_or(0);
        println!("{name:<14} samples differing from PIL: {differing}, max difference {worst}");
        if name.starts_with("png") {
            assert_eq!(
                differing, 0,
                "{name}: {differing} samples differ from PIL (max {worst})"
            );
        } else {
            // jpeg-decoder's IDCT (stb_image's) and chroma upsampling (one rounding bias
            // instead of libjpeg's alternating 8/7) differ from libjpeg-turbo's islow
            // IDCT and fancy upsampling by a few levels on some samples; README.md lists
            // this deviation.
            assert!(
                worst <= JPEG_TOLERANCE,
                "{name}: off by {worst} levels from PIL"
            );
            assert!(
                differing * 5 < data.len(),
                "{name}: {differing} of {} samples differ from PIL",
                data.len()
            );
        }
    }
    let (_, bytes) = fixtures.u8("file.png_gray16");
    let (_, expected) = fixtures.u16("expect.png_gray16");
    match decode_bytes(&bytes).expect("16-bit gray png") {
        Decoded::Rgb16 { data, .. } => assert_eq!(data, expected),
        other => panic!("expected 16-bit RGB, got {other:?}"),
    }
}

#[test]
fn decode_file_reads_by_magic_bytes_and_names_the_file() {
    let fixtures = Fixtures::load();
    let dir = tempfile::tempdir().expect("temp dir");
    // A TIFF with a .png name still decodes as TIFF.
    let (_, bytes) = fixtures.u8("file.srh_default");
    let path = dir.path().join("patch.png");
    std::fs::write(&path, &bytes).expect("write");
    let decoded = decode_file(&path).expect("decode");
    let (_, srh) = fixtures.u16("srh");
    assert_eq!(decoded_srh(&decoded), srh);

    let truncated = dir.path().join("cut.tif");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = decode_file(&truncated).expect_err("a truncated file is an error");
    let message = err.to_string();
    assert!(message.contains("cut.tif"), "{message}");
    assert!(matches!(err, ImageError::Truncated { .. }), "{err:?}");
}

#[test]
fn truncated_files_are_errors_never_panics() {
    let fixtures = Fixtures::load();
    for name in fixtures.names() {
        let Some(file) = name.strip_prefix("file.") else {
            continue;
        };
        let (_, bytes) = fixtures.u8(&name);
        let full = decode_bytes(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut decoded_cuts = 0;
        for len in 0..bytes.len() {
            // Every cut is an error or, when it only removes bytes the decoder never
            // reads (trailing tag values of a TIFF, a PNG's IEND chunk, a JPEG's EOI), the
            // full image: never a panic, never other pixels.
            match decode_bytes(&bytes[..len]) {
                Err(_) => {}
                Ok(decoded) if file.starts_with("jpeg") => {
                    // A JPEG decoder may fill a cut scan, as PIL does with
                    // LOAD_TRUNCATED_IMAGES; its size must still be right.
                    assert_eq!(
                        (decoded.height(), decoded.width()),
                        (full.height(), full.width()),
                        "{file} cut to {len}"
                    );
                }
                Ok(decoded) => {
                    assert_eq!(decoded, full, "{file} cut to {len} decoded to other pixels");
                    decoded_cuts += 1;
                }
            }
        }
        if !file.starts_with("jpeg") {
            assert!(decoded_cuts <= 32, "{file}: {decoded_cuts} cuts decoded");
            let err = decode_bytes(&bytes[..bytes.len() / 2]).expect_err("cut in half");
            assert!(
                matches!(err, ImageError::Truncated { .. }),
                "{file} cut in half: {err:?}"
            );
        }
    }
}

/// An op under measurement.
type Timed<'a> = Box<dyn Fn() -> Image + 'a>;

/// Median throughput of `augment` on 300x300 patches, one thread, reference settings.
#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn augment_throughput_on_300x300_patches() {
    let size = 300;
    let mut rng = SplitMix64::new(1);
    let patches: Vec<Image> = (0..8)
        .map(|_| {
            let ch2: Vec<u16> = (0..size * size)
                .map(|_| 2000 + rng.below(30000) as u16)
                .collect();
            let ch3: Vec<u16> = (0..size * size)
                .map(|_| 2000 + rng.below(30000) as u16)
                .collect();
            base_process(&Decoded::Srh {
                height: size,
                width: size,
                ch2,
                ch3,
            })
        })
        .collect();
    // Each op alone, median microseconds per call.
    let x = &patches[0];
    let noise_rng = std::cell::RefCell::new(SplitMix64::new(9));
    let timed: Vec<(&str, Timed<'_>)> = vec![
        ("clone", Box::new(|| x.clone())),
        ("hflip", Box::new(|| ops::hflip(x))),
        ("vflip", Box::new(|| ops::vflip(x))),
        (
            "noise",
            Box::new(|| ops::gaussian_noise_rng(x, 0.05, &mut noise_rng.borrow_mut())),
        ),
        ("brightness", Box::new(|| ops::adjust_brightness(x, 1.2))),
        ("contrast", Box::new(|| ops::adjust_contrast(x, 1.2))),
        ("saturation", Box::new(|| ops::adjust_saturation(x, 1.2))),
        ("hue", Box::new(|| ops::adjust_hue(x, 0.05))),
        ("autocontrast", Box::new(|| ops::autocontrast(x))),
        ("solarize", Box::new(|| ops::solarize(x, 0.2))),
        ("sharpness", Box::new(|| ops::adjust_sharpness(x, 2.0))),
        ("blur", Box::new(|| ops::gaussian_blur(x, 5, 1.0))),
        ("affine", Box::new(|| ops::affine(x, 7.3, (12, -40)))),
        (
            "resized_crop 200->300",
            Box::new(|| ops::resized_crop(x, 40, 50, 200, 180, size)),
        ),
        ("erase", Box::new(|| ops::erase(x, 10, 20, 100, 80))),
    ];
    for (name, op) in &timed {
        let mut micros: Vec<f64> = (0..60)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(op());
                started.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        micros.sort_by(f64::total_cmp);
        println!("  {name:<22} {:>7.0} us", micros[micros.len() / 2]);
    }
    for (name, cfg) in [
        ("main.yaml (p 0.3)", AugmentConfig::default()),
        (
            "dynamic (p 0.3, s 1)",
            AugmentConfig {
                dynamic: true,
                ..AugmentConfig::default()
            },
        ),
    ] {
        let mut rates = Vec::new();
        let per_round = 400;
        for round in 0..7u64 {
            let started = Instant::now();
            for i in 0..per_round {
                let mut rng = SplitMix64::new(round * 1_000_003 + i);
                let view = augment(&patches[i as usize % patches.len()], &cfg, &mut rng);
                assert_eq!(view.width, size);
            }
            rates.push(per_round as f64 / started.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "augment {name}: median {:.0} patches/s on one core (min {:.0}, max {:.0})",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
}
