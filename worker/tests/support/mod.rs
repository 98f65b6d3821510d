//! What several worker test binaries share: PyTorch fixtures and real-process ranks.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]
// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

pub mod fixtures;
pub mod ranks;
