//! Fixture files written by the scripts in `scripts/fixtures/`: PyTorch's tensors for
//! the same inputs, in one `.safetensors` file per test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

/// The tensors of one fixture file, by name.
pub struct Fixtures {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
    script: &'static str,
}

impl Fixtures {
    /// Loads `worker/tests/fixtures/<file>`, written by `scripts/fixtures/<script>`
    /// (named in the panic that a missing or unreadable file gives).
    pub fn load(file: &str, script: &'static str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(file);
        let entries = Tensor::read_safetensors(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/fixtures/{script}",
                path.display()
            )
        });
        Fixtures {
            tensors: entries.into_iter().collect(),
            path,
            script,
        }
    }

    /// The file the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `key`; panics naming the script to run again when it is missing.
    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| {
            panic!(
                "fixture key {key} missing; regenerate with scripts/fixtures/{}",
                self.script
            )
        })
    }

    /// The tensors whose names start with `prefix`, the prefix removed, sorted by name.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .map(|rest| (rest.to_owned(), v.shallow_clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
