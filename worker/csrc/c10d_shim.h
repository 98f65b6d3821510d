// C ABI over libtorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo/NCCL) for
// hsat-worker's `collective` module (worker/src/collective/ffi.rs mirrors this file).
//
// Conventions:
// - Every fallible function returns an `hsat_c10d_kind` (HSAT_C10D_OK on success) and,
//   on failure, stores a heap copy of the message in `*error` (free it with
//   hsat_c10d_free_error). C++ exceptions never cross this boundary.
// - A tensor is passed as tch's `C_tensor`, which is a heap `at::Tensor*`.
// - Handles are owned by the caller and freed exactly once with their `_free` function.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// What kind of failure: decided from the C++ exception type, refined by the caller.
typedef enum {
  HSAT_C10D_OK = 0,
  HSAT_C10D_STORE = 1,       // c10::DistStoreError: key-value store (rendezvous)
  HSAT_C10D_NETWORK = 2,     // c10::DistNetworkError: connect/send/recv failed
  HSAT_C10D_TIMEOUT = 3,     // c10d::TimeoutError
  HSAT_C10D_OTHER = 4,       // any other c10::Error or std::exception (gloo errors)
} hsat_c10d_kind;

typedef enum { HSAT_C10D_GLOO = 0, HSAT_C10D_NCCL = 1 } hsat_c10d_backend;

typedef struct hsat_store hsat_store;
typedef struct hsat_pg hsat_pg;
typedef struct hsat_work hsat_work;

void hsat_c10d_free_error(char* error);
// 1 when the NCCL backend was compiled in.
int hsat_c10d_has_nccl(void);

// is_server != 0: host the store on bind_host:port (port 0 = any free port).
int hsat_store_new(
    const char* host,
    uint16_t port,
    int is_server,
    size_t world_size,
    int64_t timeout_ms,
    hsat_store** out,
    char** error);
uint16_t hsat_store_port(const hsat_store* store);
void hsat_store_free(hsat_store* store);

int hsat_pg_new(
    const hsat_store* store,
    const char* prefix,
    int rank,
    int world_size,
    int backend,
    int64_t timeout_ms,
    hsat_pg** out,
    char** error);
// Starts one in-place sum all-reduce per tensor; returns a handle to wait on all of them.
int hsat_pg_all_reduce_sum(
    hsat_pg* pg, void* const* tensors, size_t n, hsat_work** out, char** error);
int hsat_pg_broadcast(
    hsat_pg* pg,
    void* const* tensors,
    size_t n,
    int root,
    hsat_work** out,
    char** error);
int hsat_pg_barrier(hsat_pg* pg, char** error);
// abort != 0 after a failure: tear down communicators without waiting for peers.
void hsat_pg_free(hsat_pg* pg, int abort);

// Waits for every collective of the handle; the first failure is returned. The handle
// stays owned by the caller either way.
int hsat_work_wait(hsat_work* work, char** error);
void hsat_work_free(hsat_work* work);

// A second reference to a group's backend for synchronised batch norm: the model keeps
// it while a step runs. Freeing it never shuts the backend down (hsat_pg_free does).
typedef struct hsat_bn_group hsat_bn_group;
int hsat_bn_group_new(const hsat_pg* pg, hsat_bn_group** out, char** error);
void hsat_bn_group_free(hsat_bn_group* group);

// Synchronised batch norm in train mode (see c10d_shim.cpp): `input` [N, C, ...] (N may
// be 0), `weight`/`bias` [C], running statistics [C] updated in place. `*out` is a new
// tch tensor (heap at::Tensor*) owned by the caller, differentiable with respect to
// input, weight and bias; its backward runs one all-reduce on the same group. Every
// rank must call it in the same order (empty ranks too) and run the backward.
int hsat_sync_batch_norm(
    hsat_bn_group* group,
    void* input,
    void* weight,
    void* bias,
    void* running_mean,
    void* running_var,
    double momentum,
    double eps,
    void** out,
    char** error);

// The first collective failure inside a backward pass of hsat_sync_batch_norm since
// the last call (HSAT_C10D_OK when none), with its message in `*error`; clears it.
int hsat_bn_group_take_failure(hsat_bn_group* group, char** error);

// `tensor.grad = grad` (a tch tensor has no setter for its gradient).
int hsat_tensor_set_grad(void* tensor, void* grad, char** error);

#ifdef __cplusplus
} // extern "C"
#endif
