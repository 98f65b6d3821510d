//! An in-memory synthetic dataset with the patient -> slide -> patch hierarchy.
//!
//! Each class has its own colour and stripe frequency, each patient a colour shift,
//! each slide a brightness, each patch a stripe phase and orientation, and each view a
//! small random brightness change and flip: a model that learns the hierarchy can
//! tell patients and classes apart. Pixels are made with tensor ops on the device.

use std::f64::consts::PI;

use hsat_core::rng::{SplitMix64, derive_seed};
use tch::{Device, Kind, Tensor};

use super::{Batch, BatchSource};
use crate::error::{Result, WorkerError};

/// Shape and seed of a synthetic dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Number of patients (patient `p` has class `p % num_classes`).
    pub num_patients: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Patients per step.
    pub batch_size: usize,
    /// Slides per patient in a batch (S).
    pub slides: usize,
    /// Patches per slide in a batch (P).
    pub patches: usize,
    /// Augmented views per patch (V).
    pub views: usize,
    /// Image side in pixels.
    pub image_size: usize,
    /// Job seed.
    pub seed: u64,
}

/// The in-memory source.
#[derive(Debug)]
pub struct SyntheticSource {
    spec: SyntheticSpec,
    device: Device,
}

impl SyntheticSource {
    /// Creates the source; errors on an empty dataset or batch.
    pub fn new(spec: SyntheticSpec, device: Device) -> Result<Self> {
        let dims = [
            spec.num_patients,
            spec.num_classes,
            spec.batch_size,
            spec.slides,
            spec.patches,
            spec.views,
            spec.image_size,
        ];
        if dims.contains(&0) {
            return Err(WorkerError::Config(format!(
                "synthetic dataset with a zero dimension: {spec:?}"
            )));
        }
        Ok(SyntheticSource { spec, device })
    }

    /// Class of a patient.
    pub fn class_of(&self, patient: usize) -> u32 {
        (patient % self.spec.num_classes) as u32
    }

    /// The epoch's patient order: a seeded permutation.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.spec.num_patients).collect();
        let mut rng = SplitMix64::new(derive_seed(self.spec.seed, &[0x5eed_0001, epoch]));
        for i in (1..order.len()).rev() {
            let j = (rng.below(i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }

    fn image(
        &self,
        patient: usize,
        slide: usize,
        patch: usize,
        view_seed: u64,
        grid: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let class = self.class_of(patient) as usize;
        let mut patient_rng = SplitMix64::new(derive_seed(self.spec.seed, &[1, patient as u64]));
        let mut slide_rng = SplitMix64::new(derive_seed(
            self.spec.seed,
            &[2, patient as u64, slide as u64],
        ));
        let mut patch_rng = SplitMix64::new(derive_seed(
            self.spec.seed,
            &[3, patient as u64, slide as u64, patch as u64],
        ));
        let mut view_rng = SplitMix64::new(view_seed);

        let hue = 2.0 * PI * class as f64 / self.spec.num_classes as f64;
        let base = [
            0.5 + 0.2 * hue.cos(),
            0.5 + 0.2 * (hue + 2.0).cos(),
            0.5 + 0.2 * (hue + 4.0).cos(),
        ];
        let shift: Vec<f64> = (0..3)
            .map(|_| 0.08 * (2.0 * patient_rng.unit() - 1.0))
            .collect();
        let brightness =
            0.06 * (2.0 * slide_rng.unit() - 1.0) + 0.04 * (2.0 * view_rng.unit() - 1.0);
        let frequency = 2.0 * PI * (2.0 + 1.5 * class as f64) / self.spec.image_size as f64;
        let angle = PI * patch_rng.unit();
        let phase = 2.0 * PI * patch_rng.unit();

        let (xs, ys) = grid;
        let along = xs
            .f_mul_scalar(angle.cos())?
            .f_add(&ys.f_mul_scalar(angle.sin())?)?;
        let stripes = along
            .f_mul_scalar(frequency)?
            .f_add_scalar(phase)?
            .f_sin()?
            .f_mul_scalar(0.15)?;
        let channels = (0..3)
            .map(|c| stripes.f_add_scalar(base[c] + shift[c] + brightness))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut image = Tensor::f_stack(&channels, 0)?;
        if view_rng.unit() < 0.5 {
            image = image.f_flip([2i64].as_slice())?;
        }
        Ok(image.f_clamp(0.0, 1.0)?)
    }
}

impl BatchSource for SyntheticSource {
    fn steps_per_epoch(&self) -> u64 {
        self.spec.num_patients.div_ceil(self.spec.batch_size) as u64
    }

    fn batch(&mut self, step: u64) -> Result<Batch> {
        let spe = self.steps_per_epoch();
        let epoch = step / spe;
        let position = (step % spe) as usize;
        let order = self.epoch_order(epoch);
        let start = position * self.spec.batch_size;
        let patients = &order[start..(start + self.spec.batch_size).min(order.len())];
        let size = self.spec.image_size as i64;
        let axis = Tensor::f_arange(size, (Kind::Float, self.device))?;
        let grid = (
            axis.f_unsqueeze(0)?.f_expand([size, size], false)?,
            axis.f_unsqueeze(1)?.f_expand([size, size], false)?,
        );
        let (s, p, v) = (self.spec.slides, self.spec.patches, self.spec.views);
        let mut images = Vec::with_capacity(patients.len() * s * p * v);
        for &patient in patients {
            for slide in 0..s {
                for patch in 0..p {
                    for view in 0..v {
                        let view_seed = derive_seed(
                            self.spec.seed,
                            &[
                                4,
                                step,
                                patient as u64,
                                slide as u64,
                                patch as u64,
                                view as u64,
                            ],
                        );
                        images.push(self.image(patient, slide, patch, view_seed, &grid)?);
                    }
                }
            }
        }
        let images = Tensor::f_stack(&images, 0)?.f_reshape([
            patients.len() as i64,
            s as i64,
            p as i64,
            v as i64,
            3,
            size,
            size,
        ])?;
        Ok(Batch {
            step,
            epoch,
            images,
            labels: patients.iter().map(|&pt| self.class_of(pt)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(batch_size: usize) -> SyntheticSource {
        let spec = SyntheticSpec {
            num_patients: 5,
            num_classes: 2,
            batch_size,
            slides: 2,
            patches: 2,
            views: 2,
            image_size: 8,
            seed: 7,
        };
        SyntheticSource::new(spec, Device::Cpu).expect("valid spec")
    }

    #[test]
    fn every_patient_once_per_epoch() {
        let mut src = source(2);
        assert_eq!(src.steps_per_epoch(), 3);
        let mut seen = Vec::new();
        for step in 3..6 {
            let batch = src.batch(step).expect("batch");
            assert_eq!(batch.epoch, 1);
            seen.extend(batch.labels);
        }
        assert_eq!(seen.len(), 5);
        let mut order = src.epoch_order(1);
        order.sort_unstable();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn batches_are_deterministic_and_in_range() {
        let mut a = source(2);
        let mut b = source(2);
        let x = a.batch(4).expect("batch").images;
        let y = b.batch(4).expect("batch").images;
        assert_eq!(x.size(), vec![2, 2, 2, 2, 3, 8, 8]);
        assert!(x.equal(&y));
        assert!(x.min().double_value(&[]) >= 0.0 && x.max().double_value(&[]) <= 1.0);
        let other = a.batch(5).expect("batch").images;
        assert!(!other.equal(&x.narrow(0, 0, other.size()[0])));
    }
}
