//! Backbone features of the train bank and of the clean and attacked val patches.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::EvalRunError;
use super::attack::{FeatureAttack, random_start, restart_seed};
use super::images::{BatchSpec, ImageBatch, ImageBatches, PatchRecord};
use super::store::{FeatureFile, FeatureWriter};
use crate::model::{Encoder, Pass};

/// Feature rows, one per patch.
pub type Rows = Vec<Vec<f32>>;

/// The val features of an evaluation.
#[derive(Debug, Default)]
pub struct ValFeatures {
    /// `clean[m]`: model `m`'s features of the clean patches.
    pub clean: Vec<Rows>,
    /// `(source, attack, target)` -> the target model's features of the images the
    /// attack crafted against the source model. White-box entries have
    /// `source == target`; the others are transfer (black-box) results.
    pub adversarial: BTreeMap<(usize, usize, usize), Rows>,
}

/// Clean backbone features (eval mode, no gradient) of every patch.
///
/// `progress(done, total)` is called after each batch.
pub fn clean_features(
    model: &Encoder,
    patches: &[PatchRecord],
    spec: BatchSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Rows, EvalRunError> {
    let mut rows = Vec::with_capacity(patches.len());
    each_clean_batch(model, patches, spec, progress, &mut |batch| {
        rows.extend(batch);
        Ok(())
    })?;
    Ok(rows)
}

/// [`clean_features`] written to `path` (raw f32, [`FeatureWriter`]) batch by batch
/// as they are computed, so no more than one batch of rows is ever in memory: the
/// kNN bank of `eval.knn_device = "auto"`.
pub fn clean_features_to_file(
    model: &Encoder,
    patches: &[PatchRecord],
    spec: BatchSpec,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureFile, EvalRunError> {
    let mut writer = FeatureWriter::create(path)?;
    each_clean_batch(model, patches, spec, progress, &mut |batch| {
        writer.append(&batch)
    })?;
    writer.finish()
}

/// Embeds `patches` batch by batch and hands each batch's rows to `sink`.
fn each_clean_batch(
    model: &Encoder,
    patches: &[PatchRecord],
    spec: BatchSpec,
    progress: &mut dyn FnMut(usize, usize),
    sink: &mut dyn FnMut(Rows) -> Result<(), EvalRunError>,
) -> Result<(), EvalRunError> {
    let total = patches.len();
    progress(0, total);
    for batch in ImageBatches::start(paths(patches), spec)? {
        let batch = batch?;
        let images = to_tensor(&batch, spec.image_size, model.device())?;
        let features = tch::no_grad(|| model.features(&images, Pass::EVAL))?;
        sink(to_rows(&features)?)?;
        progress(batch.start + batch.len, total);
    }
    Ok(())
}

/// Clean features of every model and adversarial features for every attack crafted on
/// every model, in one pass over the val patches. With `transfer`, the images crafted
/// against each model are also embedded by every other model.
///
/// The random start of patch `i` under attack `a` (restart `r` of APGD) comes from
/// [`restart_seed`]`(seed, a, i, r)`, so results do not depend on the batch size.
pub fn val_features(
    models: &[&Encoder],
    patches: &[PatchRecord],
    attacks: &[FeatureAttack],
    transfer: bool,
    seed: u64,
    spec: BatchSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ValFeatures, EvalRunError> {
    let mut out = ValFeatures {
        clean: vec![Vec::with_capacity(patches.len()); models.len()],
        adversarial: BTreeMap::new(),
    };
    let total = patches.len();
    progress(0, total);
    for batch in ImageBatches::start(paths(patches), spec)? {
        let batch = batch?;
        for (m, model) in models.iter().enumerate() {
            let images = to_tensor(&batch, spec.image_size, model.device())?;
            let features = tch::no_grad(|| model.features(&images, Pass::EVAL))?;
            out.clean[m].extend(to_rows(&features)?);
        }
        for (a, attack) in attacks.iter().enumerate() {
            let numel = 3 * spec.image_size * spec.image_size;
            let starts: Vec<Vec<f32>> = (0..attack.starts())
                .map(|r| {
                    let mut start = Vec::with_capacity(batch.len * numel);
                    for i in batch.start..batch.start + batch.len {
                        start.extend(random_start(numel, attack.eps, restart_seed(seed, a, i, r)));
                    }
                    start
                })
                .collect();
            for (s, source) in models.iter().enumerate() {
                let images = to_tensor(&batch, spec.image_size, source.device())?;
                let deltas = starts
                    .iter()
                    .map(|start| {
                        Tensor::from_slice(start)
                            .f_reshape(images.size())?
                            .f_to_device(source.device())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let adv = attack.run(source, &images, &deltas)?;
                for (t, target) in models.iter().enumerate() {
                    if t != s && !transfer {
                        continue;
                    }
                    let adv = adv.f_to_device(target.device())?;
                    let features = tch::no_grad(|| target.features(&adv, Pass::EVAL))?;
                    out.adversarial
                        .entry((s, a, t))
                        .or_default()
                        .extend(to_rows(&features)?);
                }
            }
        }
        progress(batch.start + batch.len, total);
    }
    Ok(out)
}

fn paths(patches: &[PatchRecord]) -> Vec<std::path::PathBuf> {
    patches.iter().map(|p| p.path.clone()).collect()
}

/// `[len, 3, size, size]` on `device`.
fn to_tensor(batch: &ImageBatch, size: usize, device: Device) -> Result<Tensor, EvalRunError> {
    let side = size as i64;
    Ok(Tensor::from_slice(&batch.data)
        .f_reshape([batch.len as i64, 3, side, side])?
        .f_to_device(device)?)
}

/// Rows of a `[N, D]` tensor.
fn to_rows(features: &Tensor) -> Result<Rows, EvalRunError> {
    let size = features.size();
    let (n, d) = match size.as_slice() {
        [n, d] => (*n as usize, *d as usize),
        _ => {
            return Err(EvalRunError::FeatureShape { shape: size });
        }
    };
    let flat = features
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?
        .f_view([-1])?;
    let values = Vec::<f32>::try_from(&flat)?;
    debug_assert_eq!(values.len(), n * d);
    Ok(values.chunks(d.max(1)).map(<[f32]>::to_vec).collect())
}
