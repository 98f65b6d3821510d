//! Named parameters and buffers of a model, in registration order.
//!
//! tch's `VarStore` neither has `num_batches_tracked` (which torchvision's strict
//! loading needs) nor gives names with its trainable list, and the optimiser and the
//! checkpoint writer need both; so layers register their tensors here directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::collective::BatchNormSync;
use crate::error::{Result, WorkerError};

/// Where a model's batch-norm layers find the synchronised batch norm of the current
/// generation: one slot per [`ParamStore`], shared by every layer registered through
/// its [`Scope`], so installing a group reaches all of them without changing any
/// forward signature. Empty: each layer normalises its own input.
#[derive(Debug, Clone, Default)]
pub struct BatchNormSlot(Arc<Mutex<Option<Arc<BatchNormSync>>>>);

impl BatchNormSlot {
    /// Installs (`Some`) or removes (`None`) the synchronised batch norm.
    pub fn set(&self, sync: Option<Arc<BatchNormSync>>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = sync;
    }

    /// The installed synchronised batch norm, if any.
    pub fn get(&self) -> Option<Arc<BatchNormSync>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A tensor with its state-dict name (torchvision spelling, e.g. `layer1.0.bn1.weight`).
#[derive(Debug)]
pub struct Named {
    /// Full dotted name.
    pub name: String,
    /// The tensor; shared (shallow clone) with the layer that uses it.
    pub tensor: Tensor,
}

/// All tensors of one module tree: trainable parameters and non-trainable buffers.
#[derive(Debug, Default)]
pub struct ParamStore {
    params: Vec<Named>,
    buffers: Vec<Named>,
    batch_norm: BatchNormSlot,
}

impl ParamStore {
    /// Trainable parameters in registration order (the optimiser's order).
    pub fn params(&self) -> &[Named] {
        &self.params
    }

    /// Buffers (batch-norm running statistics and counters) in registration order.
    pub fn buffers(&self) -> &[Named] {
        &self.buffers
    }

    /// Parameters then buffers: the full state dict.
    pub fn state(&self) -> impl Iterator<Item = &Named> {
        self.params.iter().chain(self.buffers.iter())
    }

    /// The synchronised-batch-norm slot shared by this store's batch-norm layers.
    pub fn batch_norm_slot(&self) -> &BatchNormSlot {
        &self.batch_norm
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Turns gradient tracking of every parameter on or off.
    ///
    /// Off during the PGD attack: autograd then records no parameter edges, so the
    /// backward pass computes the input gradient only.
    pub fn set_requires_grad(&self, on: bool) -> Result<()> {
        for p in &self.params {
            let _ = p.tensor.f_set_requires_grad(on)?;
        }
        Ok(())
    }

    /// Writes the state dict as a `.safetensors` file (names as registered).
    pub fn save(&self, path: &Path) -> Result<()> {
        let entries: Vec<(&str, Tensor)> = self
            .state()
            .map(|n| n.tensor.f_detach().map(|t| (n.name.as_str(), t)))
            .collect::<std::result::Result<_, _>>()?;
        Tensor::write_safetensors(&entries, path)?;
        Ok(())
    }

    /// Copies values from `entries` into this store, checking names and shapes.
    ///
    /// `ignore` lists name prefixes of the file to skip (such as torchvision's `fc.`
    /// classifier, which the encoder does not have). Every tensor of the store must be
    /// present; the error lists what is missing or mismatched.
    pub fn load_entries(
        &mut self,
        entries: BTreeMap<String, Tensor>,
        origin: &Path,
        ignore: &[&str],
    ) -> Result<()> {
        let mut problems = Vec::new();
        let mut used = 0usize;
        for named in self.params.iter_mut().chain(self.buffers.iter_mut()) {
            let Some(src) = entries.get(&named.name) else {
                problems.push(format!("missing `{}`", named.name));
                continue;
            };
            used += 1;
            if src.size() != named.tensor.size() {
                problems.push(format!(
                    "`{}` has shape {:?}, the model needs {:?}",
                    named.name,
                    src.size(),
                    named.tensor.size()
                ));
                continue;
            }
            let src = src
                .f_to_kind(named.tensor.kind())?
                .f_to_device(named.tensor.device())?;
            tch::no_grad(|| named.tensor.f_copy_(&src))?;
        }
        let unexpected: Vec<&String> = entries
            .keys()
            .filter(|k| !ignore.iter().any(|prefix| k.starts_with(prefix)))
            .filter(|k| {
                !self
                    .params
                    .iter()
                    .chain(self.buffers.iter())
                    .any(|n| &n.name == *k)
            })
            .collect();
        if !unexpected.is_empty() {
            let shown: Vec<&str> = unexpected.iter().take(5).map(|s| s.as_str()).collect();
            problems.push(format!(
                "{} unexpected tensors (first: {}) — is this a checkpoint of another backbone?",
                unexpected.len(),
                shown.join(", ")
            ));
        }
        if problems.is_empty() {
            debug_assert_eq!(used, self.params.len() + self.buffers.len());
            return Ok(());
        }
        let shown = problems
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let more = problems.len().saturating_sub(8);
        Err(WorkerError::Weights {
            path: origin.to_path_buf(),
            reason: if more > 0 {
                format!("{shown}; and {more} more problems")
            } else {
                shown
            },
        })
    }

    /// Reads a `.safetensors` file and loads it (see [`ParamStore::load_entries`]).
    pub fn load(&mut self, path: &Path, strip_prefix: &str, ignore: &[&str]) -> Result<()> {
        let read = Tensor::read_safetensors(path).map_err(|err| WorkerError::Weights {
            path: path.to_path_buf(),
            reason: format!("cannot read it as safetensors ({err})"),
        })?;
        let entries = read
            .into_iter()
            .filter_map(|(name, t)| name.strip_prefix(strip_prefix).map(|n| (n.to_owned(), t)))
            .collect();
        self.load_entries(entries, path, ignore)
    }
}

/// Registers tensors under a dotted prefix while a module tree is built.
pub struct Scope<'a> {
    store: &'a mut ParamStore,
    prefix: String,
    device: Device,
}

impl<'a> Scope<'a> {
    /// The root scope of `store`.
    pub fn root(store: &'a mut ParamStore, device: Device) -> Self {
        Scope {
            store,
            prefix: String::new(),
            device,
        }
    }

    /// A child scope `prefix.name`.
    pub fn sub(&mut self, name: impl std::fmt::Display) -> Scope<'_> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Scope {
            store: self.store,
            prefix,
            device: self.device,
        }
    }

    /// The device new tensors are created on.
    pub fn device(&self) -> Device {
        self.device
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Registers a trainable parameter initialised to `init`.
    pub fn param(&mut self, name: &str, init: Tensor) -> Result<Tensor> {
        let tensor = init
            .f_to_device(self.device)?
            .f_detach()?
            .f_set_requires_grad(true)?;
        self.store.params.push(Named {
            name: self.full(name),
            tensor: tensor.shallow_clone(),
        });
        Ok(tensor)
    }

    /// Registers a buffer (no gradient) initialised to `init`.
    pub fn buffer(&mut self, name: &str, init: Tensor) -> Result<Tensor> {
        let tensor = init.f_to_device(self.device)?.f_detach()?;
        self.store.buffers.push(Named {
            name: self.full(name),
            tensor: tensor.shallow_clone(),
        });
        Ok(tensor)
    }

    /// The store's synchronised-batch-norm slot (for batch-norm layers to keep).
    pub fn batch_norm_slot(&self) -> BatchNormSlot {
        self.store.batch_norm.clone()
    }

    /// Float options on this scope's device.
    pub fn float(&self) -> (Kind, Device) {
        (Kind::Float, self.device)
    }
}
