//! hsat-proto: the control plane between the coordinator and the workers (gRPC
//! package `hsat.v1`, `proto/hsat/v1/hsat.proto`), and the one place where wire
//! messages become domain types. Nothing outside this crate sees generated code.
//!
//! Layout:
//!
//! - [`domain`]: the messages as validated domain types (`Registration`,
//!   `Assignment`, `StepReport`, `JobStatus`, ...).
//! - [`error`]: [`ApiError`], the one error of the control plane, and its
//!   `tonic::Code` table.
//! - [`auth`]: the job token, per-worker session tokens, where a process finds its
//!   token, the server's checks.
//! - [`client`]: [`client::CoordinatorClient`], async methods over domain types.
//! - [`server`]: [`server::CoordinatorHandler`], the trait the coordinator
//!   implements, [`server::routes`], the gRPC services over it (with
//!   `grpc.health.v1`), and the server's limits ([`server::Limits`]).
//! - [`tls`]: server TLS, mutual TLS and the client side, from `[security]`.
//! - [`worker_protocol`]: the worker's side of the protocol as a pure state
//!   machine, driven by the real worker and the simulated ones.
//! - [`retry`]: exponential backoff up to a deadline for retryable errors.
//! - `convert` (private): `TryFrom` wire -> domain with validation, `From` back.
//!
//! The protocol flow is documented at the top of the `.proto` file.

pub mod auth;
pub mod client;
mod convert;
#[cfg(test)]
mod convert_tests;
pub mod domain;
pub mod error;
pub mod retry;
pub mod server;
pub mod tls;
pub mod worker_protocol;

pub use convert::StorePublication;
pub use error::ApiError;

/// The hsat version of this build; workers and coordinator must agree on it.
pub const HSAT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Generated code; private to this crate.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
mod pb {
    tonic::include_proto!("hsat.v1");
}
