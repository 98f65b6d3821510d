//! The one module that calls the C++ shim (`worker/csrc/c10d_shim.{h,cpp}`): raw
//! declarations plus owning handles whose `Drop` frees them. Everything above this
//! module is safe Rust.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;

use tch::Tensor;

/// `hsat_c10d_kind`: which C++ exception a call ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawKind {
    /// `c10::DistStoreError`: the key-value store (rendezvous).
    Store,
    /// `c10::DistNetworkError`: connecting, sending or receiving failed.
    Network,
    /// `c10d::TimeoutError`.
    Timeout,
    /// Any other `c10::Error` or `std::exception` (gloo's errors land here).
    Other,
}

/// A failure reported by the shim: the exception's kind and message (no backtrace).
#[derive(Debug, Clone)]
pub(crate) struct RawError {
    pub(crate) kind: RawKind,
    pub(crate) message: String,
}

impl RawError {
    fn local(message: impl Into<String>) -> Self {
        RawError {
            kind: RawKind::Other,
            message: message.into(),
        }
    }
}

type RawResult<T> = Result<T, RawError>;

#[repr(C)]
struct CStore {
    _private: [u8; 0],
}
#[repr(C)]
struct CGroup {
    _private: [u8; 0],
}
#[repr(C)]
struct CWork {
    _private: [u8; 0],
}
#[repr(C)]
struct CBnGroup {
    _private: [u8; 0],
}

const GLOO: c_int = 0;
const NCCL: c_int = 1;

unsafe extern "C" {
    fn hsat_c10d_free_error(error: *mut c_char);
    fn hsat_c10d_has_nccl() -> c_int;
    fn hsat_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        world_size: usize,
        timeout_ms: i64,
        out: *mut *mut CStore,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_store_port(store: *const CStore) -> u16;
    fn hsat_store_free(store: *mut CStore);
    fn hsat_pg_new(
        store: *const CStore,
        prefix: *const c_char,
        rank: c_int,
        world_size: c_int,
        backend: c_int,
        timeout_ms: i64,
        out: *mut *mut CGroup,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_pg_all_reduce_sum(
        pg: *mut CGroup,
        tensors: *const *mut c_void,
        n: usize,
        out: *mut *mut CWork,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_pg_broadcast(
        pg: *mut CGroup,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
        out: *mut *mut CWork,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_pg_barrier(pg: *mut CGroup, error: *mut *mut c_char) -> c_int;
    fn hsat_pg_free(pg: *mut CGroup, abort: c_int);
    fn hsat_work_wait(work: *mut CWork, error: *mut *mut c_char) -> c_int;
    fn hsat_work_free(work: *mut CWork);
    fn hsat_bn_group_new(
        pg: *const CGroup,
        out: *mut *mut CBnGroup,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_bn_group_free(group: *mut CBnGroup);
    fn hsat_bn_group_take_failure(group: *mut CBnGroup, error: *mut *mut c_char) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn hsat_sync_batch_norm(
        group: *mut CBnGroup,
        input: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
    fn hsat_tensor_set_grad(
        tensor: *mut c_void,
        grad: *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
}

/// Turns a shim status and its (possibly null) message into a result, freeing the message.
fn check(code: c_int, error: *mut c_char) -> RawResult<()> {
    if code == 0 {
        return Ok(());
    }
    let message = if error.is_null() {
        "unknown error (no message)".to_owned()
    } else {
        // SAFETY: a non-null `error` is a NUL-terminated string malloc'ed by the shim,
        // read once here and then freed once by the shim's own free function.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: see above; `error` is not used after this call.
        unsafe { hsat_c10d_free_error(error) };
        text
    };
    let kind = match code {
        1 => RawKind::Store,
        2 => RawKind::Network,
        3 => RawKind::Timeout,
        _ => RawKind::Other,
    };
    Err(RawError {
        kind,
        message: message.trim().to_owned(),
    })
}

fn c_string(what: &str, value: &str) -> RawResult<CString> {
    CString::new(value)
        .map_err(|_| RawError::local(format!("{what} {value:?} contains a NUL byte")))
}

fn timeout_ms(timeout: std::time::Duration) -> i64 {
    i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// Whether the shim was compiled with c10d's NCCL backend (the `nccl` feature).
pub(crate) fn has_nccl() -> bool {
    // SAFETY: no arguments, no state; returns a compile-time constant.
    unsafe { hsat_c10d_has_nccl() != 0 }
}

/// An owned `c10d::TCPStore` (server or client).
#[derive(Debug)]
pub(crate) struct RawStore(*mut CStore);

// SAFETY: c10d::TCPStore serialises its client operations with an internal mutex, and
// the handle is only freed once, by `Drop`.
unsafe impl Send for RawStore {}
// SAFETY: as above; every method of the store is safe to call from several threads.
unsafe impl Sync for RawStore {}

impl RawStore {
    pub(crate) fn new(
        host: &str,
        port: u16,
        is_server: bool,
        world_size: usize,
        timeout: std::time::Duration,
    ) -> RawResult<Self> {
        let host = c_string("host", host)?;
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: `host` outlives the call; `out` and `error` are valid out-pointers.
        let code = unsafe {
            hsat_store_new(
                host.as_ptr(),
                port,
                c_int::from(is_server),
                world_size,
                timeout_ms(timeout),
                &mut out,
                &mut error,
            )
        };
        check(code, error)?;
        Ok(RawStore(out))
    }

    pub(crate) fn port(&self) -> u16 {
        // SAFETY: `self.0` is a live store handle.
        unsafe { hsat_store_port(self.0) }
    }
}

impl Drop for RawStore {
    fn drop(&mut self) {
        // SAFETY: the handle came from `hsat_store_new` and is freed exactly once.
        unsafe { hsat_store_free(self.0) }
    }
}

/// An owned c10d backend (`ProcessGroupGloo` or `ProcessGroupNCCL`) over a `PrefixStore`.
/// The prefix store holds its own reference to the TCP store.
#[derive(Debug)]
pub(crate) struct RawGroup {
    ptr: *mut CGroup,
    /// Set after a failed collective: teardown then aborts instead of shutting down.
    failed: std::cell::Cell<bool>,
}

// SAFETY: the backend object may be used from any one thread at a time; `RawGroup` is
// not `Sync`, so calls never overlap.
unsafe impl Send for RawGroup {}

/// Which c10d backend to construct.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawBackend {
    Gloo,
    Nccl,
}

impl RawGroup {
    pub(crate) fn new(
        store: &RawStore,
        prefix: &str,
        rank: usize,
        world_size: usize,
        backend: RawBackend,
        timeout: std::time::Duration,
    ) -> RawResult<Self> {
        let prefix = c_string("prefix", prefix)?;
        let rank = c_int::try_from(rank).map_err(|_| RawError::local("rank too large"))?;
        let size =
            c_int::try_from(world_size).map_err(|_| RawError::local("world size too large"))?;
        let backend = match backend {
            RawBackend::Gloo => GLOO,
            RawBackend::Nccl => NCCL,
        };
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: `store` is a live handle (the new group keeps its own reference);
        // `prefix` outlives the call; `out` and `error` are valid out-pointers.
        let code = unsafe {
            hsat_pg_new(
                store.0,
                prefix.as_ptr(),
                rank,
                size,
                backend,
                timeout_ms(timeout),
                &mut out,
                &mut error,
            )
        };
        check(code, error)?;
        Ok(RawGroup {
            ptr: out,
            failed: std::cell::Cell::new(false),
        })
    }

    fn note(&self, result: RawResult<()>) -> RawResult<()> {
        if result.is_err() {
            self.failed.set(true);
        }
        result
    }

    /// Starts one in-place sum all-reduce per tensor.
    pub(crate) fn all_reduce_sum(&self, tensors: &[&Tensor]) -> RawResult<RawWork> {
        let ptrs = tensor_ptrs(tensors);
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: `self.ptr` is live; `ptrs` holds `at::Tensor*` handles of tensors
        // borrowed for the call (the shim copies the handles, sharing storage, so the
        // work keeps the storage alive however long it runs).
        let code = unsafe {
            hsat_pg_all_reduce_sum(self.ptr, ptrs.as_ptr(), ptrs.len(), &mut out, &mut error)
        };
        self.note(check(code, error))?;
        Ok(RawWork(out))
    }

    /// Starts one broadcast from `root` per tensor.
    pub(crate) fn broadcast(&self, tensors: &[&Tensor], root: usize) -> RawResult<RawWork> {
        let root = c_int::try_from(root).map_err(|_| RawError::local("root rank too large"))?;
        let ptrs = tensor_ptrs(tensors);
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: as in `all_reduce_sum`.
        let code = unsafe {
            hsat_pg_broadcast(
                self.ptr,
                ptrs.as_ptr(),
                ptrs.len(),
                root,
                &mut out,
                &mut error,
            )
        };
        self.note(check(code, error))?;
        Ok(RawWork(out))
    }

    pub(crate) fn barrier(&self) -> RawResult<()> {
        let mut error = ptr::null_mut();
        // SAFETY: `self.ptr` is live; `error` is a valid out-pointer.
        let code = unsafe { hsat_pg_barrier(self.ptr, &mut error) };
        self.note(check(code, error))
    }

    /// Waits for `work`, remembering a failure for teardown.
    pub(crate) fn wait(&self, work: RawWork) -> RawResult<()> {
        let result = work.wait();
        self.note(result)
    }
}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from `hsat_pg_new` and is freed exactly once.
        unsafe { hsat_pg_free(self.ptr, c_int::from(self.failed.get())) }
    }
}

/// Collectives in flight. Dropping it without waiting is safe: each collective holds
/// references to its tensors' storage and completes (or fails) on the backend's threads.
#[derive(Debug)]
pub(crate) struct RawWork(*mut CWork);

// SAFETY: a work handle is a list of c10d::Work, whose wait() may be called from any thread.
unsafe impl Send for RawWork {}

impl RawWork {
    fn wait(self) -> RawResult<()> {
        let mut error = ptr::null_mut();
        // SAFETY: `self.0` is live until `self` drops after this call.
        let code = unsafe { hsat_work_wait(self.0, &mut error) };
        check(code, error)
    }
}

impl Drop for RawWork {
    fn drop(&mut self) {
        // SAFETY: the handle came from the shim and is freed exactly once.
        unsafe { hsat_work_free(self.0) }
    }
}

/// A second reference to a group's c10d backend, for synchronised batch norm (the
/// model holds it while a step runs). Dropping it never shuts the backend down.
#[derive(Debug)]
pub(crate) struct RawBnGroup(*mut CBnGroup);

// SAFETY: the handle only holds a reference-counted c10d backend; c10d backends accept
// collectives from any thread (DDP issues them from its reducer's threads), and the
// handle is freed exactly once, by `Drop`.
unsafe impl Send for RawBnGroup {}
// SAFETY: as above: calls through a shared reference only enqueue collectives.
unsafe impl Sync for RawBnGroup {}

impl RawBnGroup {
    pub(crate) fn new(group: &RawGroup) -> RawResult<Self> {
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: `group.ptr` is a live group; `out` and `error` are valid out-pointers.
        let code = unsafe { hsat_bn_group_new(group.ptr, &mut out, &mut error) };
        check(code, error)?;
        Ok(RawBnGroup(out))
    }

    /// Batch norm in train mode with statistics over every rank (see the shim).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f64,
        eps: f64,
    ) -> RawResult<Tensor> {
        let mut out = ptr::null_mut();
        let mut error = ptr::null_mut();
        // SAFETY: `self.0` is live; the tensors are live `at::Tensor*` handles borrowed
        // for the call (the autograd node keeps its own references); on success `out`
        // is a new heap `at::Tensor*` whose ownership passes to the returned Tensor.
        let code = unsafe {
            hsat_sync_batch_norm(
                self.0,
                input.as_ptr() as *mut c_void,
                weight.as_ptr() as *mut c_void,
                bias.as_ptr() as *mut c_void,
                running_mean.as_ptr() as *mut c_void,
                running_var.as_ptr() as *mut c_void,
                momentum,
                eps,
                &mut out,
                &mut error,
            )
        };
        check(code, error)?;
        // SAFETY: see above; `out` is non-null after success and owned by nobody else.
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }
}

impl RawBnGroup {
    /// The first collective failure of a backward pass since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<RawError> {
        let mut error = ptr::null_mut();
        // SAFETY: `self.0` is live; `error` is a valid out-pointer.
        let code = unsafe { hsat_bn_group_take_failure(self.0, &mut error) };
        check(code, error).err()
    }
}

impl Drop for RawBnGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from `hsat_bn_group_new` and is freed exactly once.
        unsafe { hsat_bn_group_free(self.0) }
    }
}

fn tensor_ptrs(tensors: &[&Tensor]) -> Vec<*mut c_void> {
    // tch's `C_tensor` is a heap `at::Tensor*`; the shim only reads the handle.
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// `tensor.grad = grad`: tch has no setter for a gradient.
pub(crate) fn set_grad(tensor: &Tensor, grad: &Tensor) -> RawResult<()> {
    let mut error = ptr::null_mut();
    // SAFETY: both are live `at::Tensor*` handles borrowed for the call; the shim
    // assigns a new reference to `grad`'s storage to `tensor`'s grad slot.
    let code = unsafe {
        hsat_tensor_set_grad(
            tensor.as_ptr() as *mut c_void,
            grad.as_ptr() as *mut c_void,
            &mut error,
        )
    };
    check(code, error)
}
