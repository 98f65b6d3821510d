//! Collectives: rendezvous, gradient averaging and state broadcast between worker
//! processes, on libtorch's own c10d (the engine PyTorch DDP uses) through a small C++
//! shim (`worker/csrc/c10d_shim.cpp`). In the pipeline it sits between backward and the
//! optimiser step: `backward -> GradientSync::average -> optimiser step`, and after any
//! membership change `broadcast_state` makes every rank start from root's state.
//!
//! - [`group`]: [`Store`] (c10d `TCPStore`, hosted by rank 0) and [`ProcessGroup`]
//!   (Gloo on CPU, NCCL on GPU with the `nccl` feature) on a per-generation prefix.
//! - [`sync`]: [`GradientSync`] (DDP-style flat buckets, weighted mean for uneven
//!   shards), [`broadcast_state`] and [`all_gather_rows`] (a step's embeddings, for
//!   the global loss).
//! - [`batch_norm`]: [`BatchNormSync`], synchronised batch norm (statistics over all
//!   ranks in the forward pass, the matching reductions in the backward pass).
//! - [`error`]: [`CollectiveError`], which says which group, peer or address failed and
//!   whether to regroup.
//! - `ffi`: the only `unsafe` code, the C ABI of the shim.
//!
//! A failed collective (a peer killed or hung) surfaces as an error within the group's
//! timeout; the process survives, drops the group and rendezvouses again on the same
//! store under a new prefix.

pub mod batch_norm;
pub mod error;
mod ffi;
pub mod group;
pub mod sync;

pub use batch_norm::BatchNormSync;
pub use error::{CollectiveError, GroupContext};
pub use group::{Backend, ProcessGroup, Store};
pub use sync::{DEFAULT_BUCKET_BYTES, GradientSync, SyncStats, all_gather_rows, broadcast_state};
