//! hsat-metrics: what the coordinator and the workers tell an operator besides
//! their logs, with no libtorch (the coordinator image uses it too).
//!
//! Stage in the pipeline: beside it. The coordinator and the workers keep their own
//! Prometheus registries (`coordinator/src/metrics.rs`, `worker/src/metrics.rs`);
//! this crate holds what both sides share:
//!
//! - [`http`]: the metrics endpoint, `GET /metrics` on its own port (hyper 1),
//!   OpenMetrics or the classic text format by the scraper's `Accept` header;
//! - [`exposition`]: encoding a registry, the classic text format, and a small
//!   parser of expositions (tests and tools read scrapes with it);
//! - [`auth`]: the hook the gRPC authentication layer calls on a refused call;
//! - [`families`]: metric families both sides export alike (losses by level and view);
//! - [`rpc`]: a tower layer counting and timing gRPC calls by method and code;
//! - [`jsonl`]: `<out_dir>/metrics.jsonl`, one line per committed step, written by
//!   the coordinator and by single-process `hsat run`, read by `hsat plot`.
//!
//! The metric names and their meaning are listed in the README's metric tables (a test checks
//! the list against a live scrape).

pub mod auth;
pub mod exposition;
pub mod families;
pub mod http;
pub mod jsonl;
pub mod rpc;

use std::path::PathBuf;

pub use auth::{AuthFailureHook, AuthFailures};
pub use exposition::Exposition;
pub use http::MetricsServer;
pub use jsonl::{MetricsLog, StepRecord};

/// Why telemetry could not be served or written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics address is not `IP:PORT`.
    #[error(
        "the metrics address {address:?} is not IP:PORT (e.g. \"127.0.0.1:0\" or \"0.0.0.0:9464\"); \
         leave it empty to turn metrics off"
    )]
    Address {
        /// What was given.
        address: String,
    },
    /// The metrics port could not be bound.
    #[error("cannot serve metrics on {address} (is the port in use?)")]
    Listen {
        /// The address asked for.
        address: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `metrics.jsonl` could not be opened, read or written.
    #[error("cannot write {} (check that infra.out_dir is writable)", path.display())]
    Log {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}
