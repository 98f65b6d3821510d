//! A writer for the one TIFF layout OpenSRH patches have: what
//! `tifffile.imwrite(path, array)` produces for a `(2, H, W)` `uint16` array.
//!
//! That layout is a little-endian classic TIFF with **two pages** (CH2, then CH3),
//! each a single-sample 16-bit grayscale image (`PhotometricInterpretation` =
//! min-is-black, no `PlanarConfiguration` tag, no `SampleFormat` tag: unsigned by
//! default), uncompressed, in one strip. The first page carries tifffile's "shaped"
//! description `{"shape": [2, H, W]}`, which is what makes `tifffile.imread` return
//! one `(2, H, W)` array instead of a list of pages, and a `Software` tag.
//!
//! Byte positions follow tifffile too, so for the same array the file is byte-for-byte
//! what `tifffile.imwrite(path, array, software="hsat synth")` writes (tifffile
//! 2026.3; `scripts/check_synth.py` compares):
//!
//! ```text
//! 0     header "II", 42, offset of IFD 0 (8)
//! 8     IFD 0: 14 entries, then its out-of-line values: description (+16 spare
//!       NULs, padded to even), XResolution, YResolution, Software; NULs up to 256
//! 256   CH2 samples, then CH3 samples (contiguous, row-major, little-endian)
//! ...   IFD 1: 12 entries (no description, no software), then its two resolutions
//! ```

/// The `Software` tag value of every patch.
pub(super) const SOFTWARE: &str = "hsat synth";

/// Where the pixel data starts (tifffile reserves the first 256 bytes for IFD 0).
const DATA_OFFSET: usize = 256;

/// Spare NULs tifffile leaves after the shape description's terminating NUL (room to
/// rewrite it).
const DESCRIPTION_SPARE: usize = 15;

// TIFF field types.
const ASCII: u16 = 2;
const SHORT: u16 = 3;
const LONG: u16 = 4;
const RATIONAL: u16 = 5;

/// One IFD entry before its value is placed: inline (fits in 4 bytes) or out of line.
struct Entry {
    tag: u16,
    field_type: u16,
    count: u32,
    value: Value,
}

enum Value {
    /// Fits in the entry's 4-byte value field (little-endian, left-justified).
    Inline(u32),
    /// Written after the IFD; the entry holds its offset. The bytes include padding.
    OutOfLine(Vec<u8>),
}

fn short(tag: u16, value: u16) -> Entry {
    Entry {
        tag,
        field_type: SHORT,
        count: 1,
        value: Value::Inline(u32::from(value)),
    }
}

fn long(tag: u16, value: u32) -> Entry {
    Entry {
        tag,
        field_type: LONG,
        count: 1,
        value: Value::Inline(value),
    }
}

/// The rational 1/1 (tifffile's default resolution, with `ResolutionUnit` = none).
fn unit_rational(tag: u16) -> Entry {
    let mut bytes = Vec::with_capacity(8);
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    Entry {
        tag,
        field_type: RATIONAL,
        count: 1,
        value: Value::OutOfLine(bytes),
    }
}

/// A NUL-terminated string; `spare` extra NULs are stored but not counted.
fn ascii(tag: u16, text: &str, spare: usize) -> Entry {
    let mut bytes = Vec::with_capacity(text.len() + 1 + spare + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(0);
    let count = bytes.len() as u32;
    bytes.resize(bytes.len() + spare, 0);
    Entry {
        tag,
        field_type: ASCII,
        count,
        value: Value::OutOfLine(bytes),
    }
}

/// The entries of one page, sorted by tag as TIFF requires.
fn page_entries(width: u32, height: u32, strip_offset: u32, first: bool) -> Vec<Entry> {
    let strip_bytes = width * height * 2;
    let mut entries = vec![
        long(256, width),  // ImageWidth
        long(257, height), // ImageLength
        short(258, 16),    // BitsPerSample
        short(259, 1),     // Compression: none
        short(262, 1),     // PhotometricInterpretation: min-is-black
    ];
    if first {
        let shape = format!("{{\"shape\": [2, {height}, {width}]}}");
        entries.push(ascii(270, &shape, DESCRIPTION_SPARE)); // ImageDescription
    }
    entries.extend([
        long(273, strip_offset), // StripOffsets
        short(277, 1),           // SamplesPerPixel
        long(278, height),       // RowsPerStrip: one strip
        long(279, strip_bytes),  // StripByteCounts
        unit_rational(282),      // XResolution
        unit_rational(283),      // YResolution
        short(296, 1),           // ResolutionUnit: none
    ]);
    if first {
        entries.push(ascii(305, SOFTWARE, 0)); // Software
    }
    debug_assert!(entries.windows(2).all(|pair| pair[0].tag < pair[1].tag));
    entries
}

/// Appends the IFD of `entries` at the end of `out` (which must be at an even offset),
/// followed by its out-of-line values, each padded to an even length.
fn write_ifd(out: &mut Vec<u8>, entries: &[Entry], next_ifd: u32) {
    debug_assert!(out.len().is_multiple_of(2));
    let ifd_len = 2 + 12 * entries.len() + 4;
    let mut extra_offset = out.len() + ifd_len;
    let mut extras = Vec::new();
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.tag.to_le_bytes());
        out.extend_from_slice(&entry.field_type.to_le_bytes());
        out.extend_from_slice(&entry.count.to_le_bytes());
        match &entry.value {
            Value::Inline(value) => out.extend_from_slice(&value.to_le_bytes()),
            Value::OutOfLine(bytes) => {
                out.extend_from_slice(&(extra_offset as u32).to_le_bytes());
                extras.extend_from_slice(bytes);
                if !bytes.len().is_multiple_of(2) {
                    extras.push(0);
                }
                extra_offset += bytes.len().next_multiple_of(2);
            }
        }
    }
    out.extend_from_slice(&next_ifd.to_le_bytes());
    out.extend_from_slice(&extras);
}

/// Encodes a `(2, height, width)` `uint16` image, `ch2` and `ch3` row-major, as
/// tifffile does. Both planes must hold `width * height` samples; the image must fit a
/// classic (< 4 GiB) TIFF, which any patch does.
pub(super) fn encode_two_channel_u16(width: u32, height: u32, ch2: &[u16], ch3: &[u16]) -> Vec<u8> {
    let plane = width as usize * height as usize;
    debug_assert_eq!(ch2.len(), plane);
    debug_assert_eq!(ch3.len(), plane);
    let plane_bytes = plane * 2;
    let second_ifd = DATA_OFFSET + 2 * plane_bytes;

    let mut out = Vec::with_capacity(second_ifd + 256);
    out.extend_from_slice(b"II");
    out.extend_from_slice(&42u16.to_le_bytes());
    out.extend_from_slice(&8u32.to_le_bytes());
    write_ifd(
        &mut out,
        &page_entries(width, height, DATA_OFFSET as u32, true),
        second_ifd as u32,
    );
    debug_assert!(out.len() <= DATA_OFFSET, "IFD 0 overflows its 256 bytes");
    out.resize(DATA_OFFSET + 2 * plane_bytes, 0);
    let (first, second) = out[DATA_OFFSET..].split_at_mut(plane_bytes);
    for (bytes, plane) in [(first, ch2), (second, ch3)] {
        for (pair, &sample) in bytes.chunks_exact_mut(2).zip(plane) {
            pair.copy_from_slice(&sample.to_le_bytes());
        }
    }
    write_ifd(
        &mut out,
        &page_entries(width, height, (DATA_OFFSET + plane_bytes) as u32, false),
        0,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/check_synth.py --write-tiff-fixture` writes this file with tifffile:
    /// `imwrite(f, np.arange(70, dtype=np.uint16).reshape(2, 5, 7) * 937,
    /// software="hsat synth")` (tifffile 2026.3.3). Run it again to regenerate.
    const TIFFFILE_2X5X7: &[u8] = include_bytes!("fixtures/tifffile_2x5x7.tif");

    #[test]
    fn matches_tifffile_byte_for_byte() {
        let samples: Vec<u16> = (0..70u16).map(|v| v * 937).collect();
        let bytes = encode_two_channel_u16(7, 5, &samples[..35], &samples[35..]);
        assert_eq!(bytes, TIFFFILE_2X5X7);
    }

    #[test]
    fn the_first_ifd_fits_before_the_data_at_the_largest_size() {
        // 4-digit sides give the longest description; IFD 0 must still end by 256.
        let plane = vec![0u16; 1024 * 1024];
        let bytes = encode_two_channel_u16(1024, 1024, &plane, &plane);
        assert_eq!(bytes.len(), 256 + 4 * 1024 * 1024 + 2 + 12 * 12 + 4 + 16);
    }
}
