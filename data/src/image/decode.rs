//! Patch files to samples: TIFF, PNG and JPEG, recognised by their magic bytes.
//!
//! OpenSRH patches are 2-channel uint16 TIFFs (`tifffile.imread` gives `(2, H, W)`).
//! Depending on how they were written, tifffile stores them as
//!
//! - two pages of `H x W`, one sample each (`imwrite(path, (2, H, W) array)`, the
//!   default, or a second page appended to a one-page file);
//! - one page with two samples per pixel, planar (`planarconfig='separate'`) or
//!   interleaved (`(H, W, 2)` array with `planarconfig='contig'`);
//! - `H` pages of `W x 2`, one sample each (`(H, W, 2)` array with only
//!   `photometric='minisblack'`): tifffile then records the true shape in the first
//!   page's description (`{"shape": [H, W, 2]}`), which is how it is recognised here.
//!
//! All of them decode to the same [`Decoded::Srh`].

use std::io::Cursor;
use std::path::{Path, PathBuf};

use tiff::decoder::{Decoder as TiffDecoder, DecodingResult};
use tiff::tags::Tag;
use tiff::{ColorType, TiffError};

/// Pages read from one TIFF at most; more is not a patch.
const MAX_TIFF_PAGES: usize = 4096;

/// What a patch file holds, before base processing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Stimulated Raman histology: the CH2 and CH3 planes, row-major.
    Srh {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// CH2, `height * width` samples.
        ch2: Vec<u16>,
        /// CH3, `height * width` samples.
        ch3: Vec<u16>,
    },
    /// 8-bit RGB (alpha, if the file had one, dropped).
    Rgb8 {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// `height * width * 3` samples, interleaved (HWC).
        data: Vec<u8>,
    },
    /// 8-bit grayscale (alpha dropped).
    Gray8 {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// `height * width` samples.
        data: Vec<u8>,
    },
    /// 16-bit RGB (alpha dropped; a 16-bit gray PNG has its channel repeated three times).
    Rgb16 {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// `height * width * 3` samples, interleaved (HWC).
        data: Vec<u16>,
    },
}

impl Decoded {
    /// Rows of the image.
    pub fn height(&self) -> usize {
        match self {
            Decoded::Srh { height, .. }
            | Decoded::Rgb8 { height, .. }
            | Decoded::Gray8 { height, .. }
            | Decoded::Rgb16 { height, .. } => *height,
        }
    }

    /// Columns of the image.
    pub fn width(&self) -> usize {
        match self {
            Decoded::Srh { width, .. }
            | Decoded::Rgb8 { width, .. }
            | Decoded::Gray8 { width, .. }
            | Decoded::Rgb16 { width, .. } => *width,
        }
    }
}

/// Why a patch could not be decoded. Every variant names the file (`<bytes>` for
/// [`decode_bytes`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The data ends before the image does.
    #[error("{path}: truncated {format} file ({detail}); re-export or re-download it")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// `TIFF`, `PNG` or `JPEG`.
        format: &'static str,
        /// What the decoder was reading when the data ran out.
        detail: String,
    },

    /// The data is not a valid file of its format.
    #[error("{path}: corrupt {format} file: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// `TIFF`, `PNG` or `JPEG`.
        format: &'static str,
        /// The decoder's message.
        detail: String,
    },

    /// A valid file whose layout is not a patch hsat can use.
    #[error(
        "{path}: unsupported {format} layout: {layout}; patches must be 2-channel 16-bit SRH TIFFs or 8-bit RGB/gray images"
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// `TIFF`, `PNG` or `JPEG`.
        format: &'static str,
        /// The layout found (pages, samples, bits, photometric, planar configuration).
        layout: String,
    },

    /// Not a TIFF, PNG or JPEG file.
    #[error(
        "{path}: not a TIFF, PNG or JPEG file (first bytes {magic}); patches must be one of those"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// The first bytes, in hex.
        magic: String,
    },
}

/// Decodes the patch file at `path`; the format comes from its first bytes, not its
/// extension.
pub fn decode_file(path: &Path) -> Result<Decoded, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode_with_origin(&bytes, path)
}

/// Decodes an in-memory patch file (errors name it `<bytes>`).
pub fn decode_bytes(bytes: &[u8]) -> Result<Decoded, ImageError> {
    decode_with_origin(bytes, Path::new("<bytes>"))
}

fn decode_with_origin(bytes: &[u8], origin: &Path) -> Result<Decoded, ImageError> {
    if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        decode_tiff(bytes, origin)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes, origin)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        decode_jpeg(bytes, origin)
    } else {
        let magic = bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        Err(ImageError::UnknownFormat {
            path: origin.to_owned(),
            magic: if magic.is_empty() {
                "none: the file is empty".to_owned()
            } else {
                magic
            },
        })
    }
}

// ------------------------------------------------------------------------------ TIFF

/// One decoded TIFF page.
struct Page {
    width: usize,
    height: usize,
    color: ColorType,
    planar: bool,
    samples: Vec<u16>,
}

impl Page {
    fn describe(&self) -> String {
        format!(
            "{}x{} {:?}{}",
            self.width,
            self.height,
            self.color,
            if self.planar { " planar" } else { "" }
        )
    }
}

fn tiff_error(origin: &Path, error: TiffError) -> ImageError {
    match error {
        TiffError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                path: origin.to_owned(),
                format: "TIFF",
                detail: io.to_string(),
            }
        }
        TiffError::UnsupportedError(unsupported) => ImageError::Unsupported {
            path: origin.to_owned(),
            format: "TIFF",
            layout: unsupported.to_string(),
        },
        other => ImageError::Corrupt {
            path: origin.to_owned(),
            format: "TIFF",
            detail: other.to_string(),
        },
    }
}

fn decode_tiff(bytes: &[u8], origin: &Path) -> Result<Decoded, ImageError> {
    let err = |e| tiff_error(origin, e);
    let mut decoder = TiffDecoder::new(Cursor::new(bytes)).map_err(err)?;
    let description = match decoder.find_tag(Tag::ImageDescription) {
        Ok(Some(value)) => value.into_string().ok(),
        _ => None,
    };
    let first = read_tiff_page(&mut decoder, origin)?;

    // 8-bit images and 16-bit RGB: the first page is the image (later pages of a
    // pyramidal TIFF are reduced copies).
    let (height, width) = (first.height, first.width);
    match (first.color, first.samples.len()) {
        (ColorType::Gray(8), _) => {
            return Ok(Decoded::Gray8 {
                height,
                width,
                data: narrow(&first.samples),
            });
        }
        (ColorType::RGB(8) | ColorType::RGBA(8), _) => {
            return Ok(Decoded::Rgb8 {
                height,
                width,
                data: narrow(&rgb_of(&first)),
            });
        }
        (ColorType::RGB(16) | ColorType::RGBA(16), _) => {
            return Ok(Decoded::Rgb16 {
                height,
                width,
                data: rgb_of(&first),
            });
        }
        (
            ColorType::Multiband {
                bit_depth: 16,
                num_samples: 2,
            },
            _,
        ) => {
            let plane = height * width;
            let (ch2, ch3) = if first.planar {
                let (a, b) = first.samples.split_at(plane);
                (a.to_vec(), b.to_vec())
            } else {
                first
                    .samples
                    .chunks_exact(2)
                    .map(|pair| (pair[0], pair[1]))
                    .unzip()
            };
            return Ok(Decoded::Srh {
                height,
                width,
                ch2,
                ch3,
            });
        }
        (ColorType::Gray(16), _) => {}
        _ => {
            return Err(ImageError::Unsupported {
                path: origin.to_owned(),
                format: "TIFF",
                layout: format!("first page {}", first.describe()),
            });
        }
    }

    // 16-bit single-sample pages: gather them all.
    let mut pages = vec![first];
    while decoder.more_images() {
        if pages.len() >= MAX_TIFF_PAGES {
            return Err(ImageError::Unsupported {
                path: origin.to_owned(),
                format: "TIFF",
                layout: format!("more than {MAX_TIFF_PAGES} pages"),
            });
        }
        decoder.next_image().map_err(err)?;
        pages.push(read_tiff_page(&mut decoder, origin)?);
    }
    let unsupported = |pages: &[Page], why: &str| ImageError::Unsupported {
        path: origin.to_owned(),
        format: "TIFF",
        layout: format!(
            "{} page(s) [{}]{}: {why}",
            pages.len(),
            pages
                .iter()
                .take(3)
                .map(Page::describe)
                .collect::<Vec<_>>()
                .join(", "),
            if pages.len() > 3 { ", ..." } else { "" }
        ),
    };
    if pages.iter().any(|p| p.color != ColorType::Gray(16)) {
        return Err(unsupported(&pages, "pages of different sample types"));
    }

    // tifffile's `(H, W, 2)` minisblack layout: H pages of W x 2.
    if let Some([h, w, 2]) = description.as_deref().and_then(tifffile_shape)
        && pages.len() == h
        && pages.iter().all(|p| p.height == w && p.width == 2)
    {
        let (ch2, ch3) = pages
            .iter()
            .flat_map(|p| p.samples.chunks_exact(2))
            .map(|pair| (pair[0], pair[1]))
            .unzip();
        return Ok(Decoded::Srh {
            height: h,
            width: w,
            ch2,
            ch3,
        });
    }
    match pages.as_mut_slice() {
        [a, b] if (a.height, a.width) == (b.height, b.width) => Ok(Decoded::Srh {
            height: a.height,
            width: a.width,
            ch2: std::mem::take(&mut a.samples),
            ch3: std::mem::take(&mut b.samples),
        }),
        [_] => Err(unsupported(
            &pages,
            "a single 16-bit channel, SRH patches have two (CH2, CH3)",
        )),
        _ => Err(unsupported(
            &pages,
            "expected two equal 16-bit pages (CH2, CH3)",
        )),
    }
}

/// The current page's samples, widened to u16 (only 8- and 16-bit pages are kept).
fn read_tiff_page(
    decoder: &mut TiffDecoder<Cursor<&[u8]>>,
    origin: &Path,
) -> Result<Page, ImageError> {
    let err = |e| tiff_error(origin, e);
    let (width, height) = decoder.dimensions().map_err(err)?;
    let color = decoder.colortype().map_err(err)?;
    let planar = decoder
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .map_err(err)?
        == Some(2);
    let (width, height) = (width as usize, height as usize);
    let expected = width * height * usize::from(color.num_samples());
    let mut buffer = DecodingResult::U8(Vec::new());
    decoder.read_image_to_buffer(&mut buffer).map_err(err)?;
    let samples = match buffer {
        DecodingResult::U8(v) => v.into_iter().map(u16::from).collect(),
        DecodingResult::U16(v) => v,
        _ => {
            return Err(ImageError::Unsupported {
                path: origin.to_owned(),
                format: "TIFF",
                layout: format!("{width}x{height} {color:?}: only 8- and 16-bit unsigned samples"),
            });
        }
    };
    if samples.len() != expected {
        return Err(ImageError::Unsupported {
            path: origin.to_owned(),
            format: "TIFF",
            layout: format!(
                "{width}x{height} {color:?}{}: decoded {} samples, expected {expected}",
                if planar { " planar" } else { "" },
                samples.len()
            ),
        });
    }
    Ok(Page {
        width,
        height,
        color,
        planar,
        samples,
    })
}

/// RGB samples (interleaved) of an RGB or RGBA page, alpha dropped.
fn rgb_of(page: &Page) -> Vec<u16> {
    let channels = usize::from(page.color.num_samples());
    let pixels = page.width * page.height;
    let mut out = Vec::with_capacity(pixels * 3);
    if page.planar {
        for i in 0..pixels {
            for c in 0..3 {
                out.push(page.samples[c * pixels + i]);
            }
        }
    } else {
        for pixel in page.samples.chunks_exact(channels) {
            out.extend_from_slice(&pixel[..3]);
        }
    }
    out
}

fn narrow(samples: &[u16]) -> Vec<u8> {
    // Only called on 8-bit pages, whose samples were widened from u8.
    samples.iter().map(|&v| v as u8).collect()
}

/// The `shape` tifffile writes into a page description (`{"shape": [2, 300, 300]}`).
fn tifffile_shape<const N: usize>(description: &str) -> Option<[usize; N]> {
    let start = description.find("\"shape\"")? + "\"shape\"".len();
    let rest = description[start..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start().strip_prefix('[')?;
    let inner = &rest[..rest.find(']')?];
    let mut shape = [0usize; N];
    let mut count = 0;
    for part in inner.split(',') {
        let value = part.trim().parse().ok()?;
        *shape.get_mut(count)? = value;
        count += 1;
    }
    (count == N).then_some(shape)
}

// ------------------------------------------------------------------------------- PNG

fn decode_png(bytes: &[u8], origin: &Path) -> Result<Decoded, ImageError> {
    let err = |e: png::DecodingError| match e {
        png::DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                path: origin.to_owned(),
                format: "PNG",
                detail: io.to_string(),
            }
        }
        other => ImageError::Corrupt {
            path: origin.to_owned(),
            format: "PNG",
            detail: other.to_string(),
        },
    };
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    // Palette to RGB, gray below 8 bits to 8 bits, tRNS to alpha (then dropped below).
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(err)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ImageError::Unsupported {
            path: origin.to_owned(),
            format: "PNG",
            layout: "image too large for this machine's address space".to_owned(),
        })?;
    let mut buffer = vec![0u8; size];
    let info = reader.next_frame(&mut buffer).map_err(err)?;
    let (height, width) = (info.height as usize, info.width as usize);
    buffer.truncate(info.line_size * height);
    let channels = info.color_type.samples();
    let rows = buffer.chunks_exact(info.line_size);
    match info.bit_depth {
        png::BitDepth::Eight => {
            let keep = if channels >= 3 { 3 } else { 1 };
            let mut data = Vec::with_capacity(height * width * keep);
            for row in rows {
                for pixel in row[..width * channels].chunks_exact(channels) {
                    data.extend_from_slice(&pixel[..keep]);
                }
            }
            Ok(if keep == 3 {
                Decoded::Rgb8 {
                    height,
                    width,
                    data,
                }
            } else {
                Decoded::Gray8 {
                    height,
                    width,
                    data,
                }
            })
        }
        png::BitDepth::Sixteen => {
            let mut data = Vec::with_capacity(height * width * 3);
            for row in rows {
                for pixel in row[..width * channels * 2].chunks_exact(channels * 2) {
                    let sample = |c: usize| u16::from_be_bytes([pixel[2 * c], pixel[2 * c + 1]]);
                    if channels >= 3 {
                        data.extend_from_slice(&[sample(0), sample(1), sample(2)]);
                    } else {
                        data.extend_from_slice(&[sample(0); 3]);
                    }
                }
            }
            Ok(Decoded::Rgb16 {
                height,
                width,
                data,
            })
        }
        depth => Err(ImageError::Unsupported {
            path: origin.to_owned(),
            format: "PNG",
            layout: format!("{:?} at {depth:?} after expansion", info.color_type),
        }),
    }
}

// ------------------------------------------------------------------------------ JPEG

fn decode_jpeg(bytes: &[u8], origin: &Path) -> Result<Decoded, ImageError> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    let data = decoder.decode().map_err(|e| match e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                path: origin.to_owned(),
                format: "JPEG",
                detail: io.to_string(),
            }
        }
        jpeg_decoder::Error::Unsupported(feature) => ImageError::Unsupported {
            path: origin.to_owned(),
            format: "JPEG",
            layout: format!("{feature:?}"),
        },
        other => ImageError::Corrupt {
            path: origin.to_owned(),
            format: "JPEG",
            detail: other.to_string(),
        },
    })?;
    let Some(info) = decoder.info() else {
        return Err(ImageError::Corrupt {
            path: origin.to_owned(),
            format: "JPEG",
            detail: "no frame header".to_owned(),
        });
    };
    let (height, width) = (usize::from(info.height), usize::from(info.width));
    let pixels = height * width;
    let check = |channels: usize| {
        if data.len() == pixels * channels {
            Ok(())
        } else {
            Err(ImageError::Truncated {
                path: origin.to_owned(),
                format: "JPEG",
                detail: format!(
                    "decoded {} bytes for {width}x{height}x{channels}",
                    data.len()
                ),
            })
        }
    };
    match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            check(3)?;
            Ok(Decoded::Rgb8 {
                height,
                width,
                data,
            })
        }
        jpeg_decoder::PixelFormat::L8 => {
            check(1)?;
            Ok(Decoded::Gray8 {
                height,
                width,
                data,
            })
        }
        format => Err(ImageError::Unsupported {
            path: origin.to_owned(),
            format: "JPEG",
            layout: format!("{format:?} pixels"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tifffile_shape_is_parsed() {
        assert_eq!(
            tifffile_shape::<3>("{\"shape\": [300, 300, 2]}"),
            Some([300, 300, 2])
        );
        assert_eq!(tifffile_shape::<3>("{\"shape\": [2, 4]}"), None);
        assert_eq!(tifffile_shape::<2>("{\"shape\": [2, 4]}"), Some([2, 4]));
        assert_eq!(tifffile_shape::<3>("ImageJ=1.52"), None);
    }

    #[test]
    fn unknown_and_empty_files_are_named() {
        let err = decode_bytes(b"GIF89a....").expect_err("gif");
        assert!(err.to_string().contains("47 49 46 38"), "{err}");
        let err = decode_bytes(b"").expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = decode_file(Path::new("/nonexistent/patch.tif")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/patch.tif"), "{err}");
    }
}
