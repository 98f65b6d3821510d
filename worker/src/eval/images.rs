//! The patches of one split, decoded and base-processed in batches on a thread pool
//! while the model works on the previous batch.

use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};
use hsat_core::dataset::{DatasetIndex, Split};

use super::EvalRunError;
use hsat_data::image::{base_process, decode_file, resize_to};

/// One patch of the evaluation, with the ids it is aggregated under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchRecord {
    /// The image file.
    pub path: PathBuf,
    /// Its patient's id.
    pub patient: String,
    /// Its slide's id, made unique across patients as `<patient>/<slide>` (the
    /// reference groups slides by that pair too).
    pub slide: String,
    /// Its patient's class index.
    pub label: usize,
}

/// Every patch of `split`, patient by patient, slide by slide, in index order.
pub fn patches_of(index: &DatasetIndex, split: Split) -> Vec<PatchRecord> {
    let mut out = Vec::new();
    for patient in index.patients.iter().filter(|p| p.split == split) {
        for slide in &patient.slides {
            for path in &slide.patches {
                out.push(PatchRecord {
                    path: path.clone(),
                    patient: patient.id.clone(),
                    slide: format!("{}/{}", patient.id, slide.id),
                    label: patient.class,
                });
            }
        }
    }
    out
}

/// How patches become model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    /// Side of the square input (patches of another size are resized, bilinear with
    /// antialias, as the training loader does).
    pub image_size: usize,
    /// Patches per batch (>= 1).
    pub batch_size: usize,
    /// Decode threads (>= 1).
    pub threads: usize,
}

/// One decoded batch: `len` images, CHW f32 one after the other.
#[derive(Debug)]
pub struct ImageBatch {
    /// Index of the batch's first patch in the list given to [`ImageBatches::start`].
    pub start: usize,
    /// Number of images.
    pub len: usize,
    /// `len * 3 * size * size` values in [0, 1].
    pub data: Vec<f32>,
}

/// Batches of decoded patches in order, prepared one batch ahead on a background thread
/// that spreads each batch's decoding over `threads` scoped threads.
#[derive(Debug)]
pub struct ImageBatches {
    receiver: Option<Receiver<Result<ImageBatch, EvalRunError>>>,
    producer: Option<JoinHandle<()>>,
}

impl ImageBatches {
    /// Starts decoding `patches`.
    pub fn start(patches: Vec<PathBuf>, spec: BatchSpec) -> Result<Self, EvalRunError> {
        let (sender, receiver) = bounded(1);
        let producer = std::thread::Builder::new()
            .name("hsat-eval-decode".into())
            .spawn(move || {
                let batch_size = spec.batch_size.max(1);
                for (number, chunk) in patches.chunks(batch_size).enumerate() {
                    let batch = decode_batch(chunk, spec).map(|data| ImageBatch {
                        start: number * batch_size,
                        len: chunk.len(),
                        data,
                    });
                    let failed = batch.is_err();
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(EvalRunError::DecodeThread)?;
        Ok(ImageBatches {
            receiver: Some(receiver),
            producer: Some(producer),
        })
    }
}

impl Iterator for ImageBatches {
    type Item = Result<ImageBatch, EvalRunError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for ImageBatches {
    fn drop(&mut self) {
        // Closing the channel first makes a producer blocked in `send` return.
        self.receiver.take();
        if let Some(producer) = self.producer.take() {
            let _ = producer.join();
        }
    }
}

/// Decodes `paths` on up to `spec.threads` threads; the images in order.
fn decode_batch(paths: &[PathBuf], spec: BatchSpec) -> Result<Vec<f32>, EvalRunError> {
    let per_image = 3 * spec.image_size * spec.image_size;
    let threads = spec.threads.clamp(1, paths.len().max(1));
    let per_thread = paths.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<f32>, EvalRunError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut data = Vec::with_capacity(part.len() * per_image);
                    for path in part {
                        data.extend_from_slice(&load(path, spec.image_size)?);
                    }
                    Ok(data)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or(Err(EvalRunError::ThreadPanicked {
                    what: "a patch decode",
                }))
            })
            .collect()
    });
    let mut data = Vec::with_capacity(paths.len() * per_image);
    for part in parts {
        data.extend_from_slice(&part?);
    }
    Ok(data)
}

/// One patch: decoded, base-processed, resized to `size` if needed (CHW).
pub fn load(path: &std::path::Path, size: usize) -> Result<Vec<f32>, EvalRunError> {
    let decoded = decode_file(path).map_err(|source| EvalRunError::Patch {
        path: path.to_owned(),
        source,
    })?;
    let image = base_process(&decoded);
    if image.height == size && image.width == size {
        return Ok(image.data);
    }
    Ok(resize_to(&image, size).data)
}
