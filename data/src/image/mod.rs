//! Decoding, base processing and augmentation of patches, in plain Rust on CPU.
//!
//! In the pipeline this is the per-view work of the data loader's thread pool:
//! a patch file becomes [`Decoded`] samples ([`decode_file`]), then a float [`Image`] in
//! [0, 1] ([`base_process`], method.md §1), then one augmented view ([`augment`],
//! method.md §6) of the patch size. No libtorch here: everything is single-threaded
//! per call, allocation-free per pixel, and deterministic for a given
//! [`SplitMix64`](hsat_core::rng::SplitMix64) stream.
//!
//! The numbers follow torchvision 0.28 on float tensors (what the HiDisc/HSAT
//! reference runs); `data/tests/augment_parity.rs` checks every deterministic op
//! against it. `README.md` in this folder lists the ops, their probabilities and
//! torchvision equivalents, and the known deviations.
//!
//! Layout:
//!
//! - [`decode`](decode_bytes): TIFF (2-channel 16-bit SRH in every layout tifffile
//!   writes, 8-bit RGB/gray, 16-bit RGB), PNG and JPEG, recognised by magic bytes.
//! - [`base_process`]: SRH channel arithmetic, or scaling of RGB/gray to [0, 1].
//! - [`ops`]: the deterministic operations with explicit parameters (flips, noise,
//!   colour, autocontrast, solarize, sharpness, blur, affine, resized crop, erasing,
//!   resize).
//! - [`augment`]: the random HiDisc/HSAT pipeline that draws those parameters.

mod augment;
mod base;
mod decode;
mod normal;
pub mod ops;

pub use augment::{AugmentConfig, augment};
pub use base::base_process;
pub use decode::{Decoded, ImageError, decode_bytes, decode_file};
pub use ops::resize_to;

/// A float image, channel-major (CHW).
///
/// Invariant: `data.len() == channels * height * width`. After [`base_process`] and
/// through every op, values are in [0, 1] and `channels` is 3.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Number of channels (planes).
    pub channels: usize,
    /// Rows per plane.
    pub height: usize,
    /// Columns per row.
    pub width: usize,
    /// The samples: plane after plane, each row-major.
    pub data: Vec<f32>,
}

impl Image {
    /// An image over `data` (CHW order).
    ///
    /// # Panics
    ///
    /// If `data.len()` is not `channels * height * width`.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            channels * height * width,
            "image data must hold channels * height * width = {channels} * {height} * {width} values"
        );
        Self {
            channels,
            height,
            width,
            data,
        }
    }

    /// An all-zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self::new(
            channels,
            height,
            width,
            vec![0.0; channels * height * width],
        )
    }

    /// Samples per plane (`height * width`).
    pub fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// Plane `channel`, row-major.
    pub fn plane(&self, channel: usize) -> &[f32] {
        let len = self.plane_len();
        &self.data[channel * len..(channel + 1) * len]
    }

    /// Plane `channel`, row-major, mutable.
    pub fn plane_mut(&mut self, channel: usize) -> &mut [f32] {
        let len = self.plane_len();
        &mut self.data[channel * len..(channel + 1) * len]
    }

    /// Makes `self` a `channels x height x width` image, reusing its allocation; the
    /// contents are unspecified until written.
    pub(crate) fn reshape_for_write(&mut self, channels: usize, height: usize, width: usize) {
        self.channels = channels;
        self.height = height;
        self.width = width;
        self.data.resize(channels * height * width, 0.0);
    }
}
