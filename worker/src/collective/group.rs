//! Rendezvous store and process groups: safe owners of c10d's `TCPStore` and of a
//! `ProcessGroupGloo`/`ProcessGroupNCCL` over a per-generation `PrefixStore`.

use std::time::Duration;

use tch::Tensor;

use super::error::{CollectiveError, GroupContext};
use super::ffi::{self, RawBackend, RawGroup, RawStore, RawWork};

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo over TCP: CPU tensors.
    Gloo,
    /// NCCL: CUDA tensors. Only in builds with the `nccl` feature.
    Nccl,
}

impl Backend {
    /// Whether this build can construct the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => true,
            Backend::Nccl => ffi::has_nccl(),
        }
    }
}

/// c10d's `TCPStore`: the key-value store ranks rendezvous through. Rank 0 hosts it
/// (and is also a client of it); the others connect. It outlives process groups: each
/// new generation builds its group on a fresh prefix of the same store.
#[derive(Debug)]
pub struct Store {
    raw: RawStore,
    addr: String,
}

impl Store {
    /// Rank 0: hosts a store on `bind_host:port` (port 0 lets the system choose; read it
    /// back with [`Store::port`]). `bind_host` must be an address of this machine that the
    /// other ranks can reach. Returns at once, without waiting for the others.
    pub fn host(
        bind_host: &str,
        port: u16,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Store, CollectiveError> {
        let raw = RawStore::new(bind_host, port, true, world_size, timeout).map_err(|e| {
            CollectiveError::StoreHost {
                addr: format!("{bind_host}:{port}"),
                message: e.message,
            }
        })?;
        let addr = format!("{bind_host}:{}", raw.port());
        Ok(Store { raw, addr })
    }

    /// Other ranks: connects to rank 0's store, retrying until `timeout`.
    pub fn connect(
        host: &str,
        port: u16,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Store, CollectiveError> {
        let addr = format!("{host}:{port}");
        let raw = RawStore::new(host, port, false, world_size, timeout).map_err(|e| {
            CollectiveError::StoreConnect {
                addr: addr.clone(),
                timeout,
                message: e.message,
            }
        })?;
        Ok(Store { raw, addr })
    }

    /// The store's port (the one the system chose when hosted on port 0).
    pub fn port(&self) -> u16 {
        self.raw.port()
    }

    /// `host:port` of the store.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// A c10d process group of one generation: `world_size` ranks that rendezvoused under
/// `prefix`. Collectives must be called in the same order on every rank. After a
/// failure ([`CollectiveError::needs_regroup`]) drop it and build a new group with a new
/// prefix; dropping never waits for a dead peer.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: RawGroup,
    prefix: String,
    rank: usize,
    world_size: usize,
    store_addr: String,
    timeout: Duration,
    backend: Backend,
}

impl ProcessGroup {
    /// Joins the group `prefix` as `rank` of `world_size`; blocks until every rank has
    /// joined (or `timeout`, which also bounds every later collective).
    pub fn new(
        store: &Store,
        prefix: &str,
        rank: usize,
        world_size: usize,
        backend: Backend,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if world_size == 0 || rank >= world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} is not in a group of {world_size}; ranks run from 0 to world_size - 1"
            )));
        }
        if prefix.is_empty() {
            return Err(CollectiveError::InvalidArgument(
                "the group prefix is empty; give each generation its own prefix, e.g. `gen-7`"
                    .into(),
            ));
        }
        let raw_backend = match backend {
            Backend::Gloo => RawBackend::Gloo,
            Backend::Nccl if ffi::has_nccl() => RawBackend::Nccl,
            Backend::Nccl => return Err(CollectiveError::NcclNotCompiled),
        };
        let context = GroupContext {
            op: "rendezvous",
            prefix: prefix.to_owned(),
            rank,
            world_size,
            store: store.addr.clone(),
            timeout,
        };
        let raw = RawGroup::new(&store.raw, prefix, rank, world_size, raw_backend, timeout)
            .map_err(|e| CollectiveError::from_raw(e, context))?;
        Ok(ProcessGroup {
            raw,
            prefix: prefix.to_owned(),
            rank,
            world_size,
            store_addr: store.addr.clone(),
            timeout,
            backend,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The generation prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The shim's handle (for other handles on the same backend).
    pub(crate) fn raw(&self) -> &RawGroup {
        &self.raw
    }

    pub(crate) fn context(&self, op: &'static str) -> GroupContext {
        GroupContext {
            op,
            prefix: self.prefix.clone(),
            rank: self.rank,
            world_size: self.world_size,
            store: self.store_addr.clone(),
            timeout: self.timeout,
        }
    }

    /// Sums each tensor over all ranks, in place (every rank ends with the sum).
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let work = self.start_all_reduce_sum(&refs)?;
        self.wait(work, "all_reduce")
    }

    /// Copies root's tensors into every other rank's, in place.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let work = self.start_broadcast(&refs, root)?;
        self.wait(work, "broadcast")
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), CollectiveError> {
        self.raw
            .barrier()
            .map_err(|e| CollectiveError::from_raw(e, self.context("barrier")))
    }

    /// Starts an in-place sum all-reduce of each tensor (dense, contiguous, on the
    /// backend's device); [`ProcessGroup::wait`] finishes it.
    pub(crate) fn start_all_reduce_sum(
        &self,
        tensors: &[&Tensor],
    ) -> Result<RawWork, CollectiveError> {
        check_tensors(tensors, "all_reduce")?;
        self.raw
            .all_reduce_sum(tensors)
            .map_err(|e| CollectiveError::from_raw(e, self.context("all_reduce")))
    }

    /// Starts a broadcast from `root` of each tensor.
    pub(crate) fn start_broadcast(
        &self,
        tensors: &[&Tensor],
        root: usize,
    ) -> Result<RawWork, CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is not a rank of group {:?} ({} ranks)",
                self.prefix, self.world_size
            )));
        }
        check_tensors(tensors, "broadcast")?;
        self.raw
            .broadcast(tensors, root)
            .map_err(|e| CollectiveError::from_raw(e, self.context("broadcast")))
    }

    /// Waits for started collectives.
    pub(crate) fn wait(&self, work: RawWork, op: &'static str) -> Result<(), CollectiveError> {
        self.raw
            .wait(work)
            .map_err(|e| CollectiveError::from_raw(e, self.context(op)))
    }
}

/// c10d needs dense, contiguous tensors; say so here rather than deep inside gloo.
fn check_tensors(tensors: &[&Tensor], op: &str) -> Result<(), CollectiveError> {
    for (i, t) in tensors.iter().enumerate() {
        if !t.defined() {
            return Err(CollectiveError::InvalidArgument(format!(
                "{op}: tensor {i} is undefined"
            )));
        }
        if !t.is_contiguous() {
            return Err(CollectiveError::InvalidArgument(format!(
                "{op}: tensor {i} (shape {:?}) is not contiguous; pass `.contiguous()` or use GradientSync's flat buckets",
                t.size()
            )));
        }
    }
    Ok(())
}
