// C ABI over libtorch's c10d: the engine PyTorch DDP uses, reached from Rust without
// Python. See c10d_shim.h for the conventions; worker/src/collective/ffi.rs is the
// Rust side. Every entry point catches every exception: none may unwind into Rust.

#include "c10d_shim.h"

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/exception.h>

#ifdef HSAT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

struct hsat_store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct hsat_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

struct hsat_work {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
};

namespace {

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

int fail(char** error, int kind, const std::string& message) {
  if (error != nullptr) {
    *error = copy_message(message);
  }
  return kind;
}

// Runs `body`, turning any exception into a kind and a message without backtrace.
template <typename F>
int guarded(char** error, F&& body) {
  try {
    body();
    return HSAT_C10D_OK;
  } catch (const c10d::TimeoutError& e) {
    return fail(error, HSAT_C10D_TIMEOUT, e.what_without_backtrace());
  } catch (const c10::DistStoreError& e) {
    return fail(error, HSAT_C10D_STORE, e.what_without_backtrace());
  } catch (const c10::DistNetworkError& e) {
    return fail(error, HSAT_C10D_NETWORK, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    return fail(error, HSAT_C10D_OTHER, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(error, HSAT_C10D_OTHER, e.what());
  } catch (...) {
    return fail(error, HSAT_C10D_OTHER, "unknown C++ exception in c10d");
  }
}

std::vector<at::Tensor> tensors_of(void* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i] != nullptr, "tensor ", i, " is a null pointer");
    // Shallow copy: shares storage, so in-place collectives reach the caller's tensor.
    out.push_back(*static_cast<const at::Tensor*>(tensors[i]));
  }
  return out;
}

// Gloo devices the way torch.distributed makes them: one per interface named in
// GLOO_SOCKET_IFNAME (comma separated), else the default device (this host's name,
// falling back to loopback).
c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> gloo_options(
    std::chrono::milliseconds timeout) {
  const char* ifnames = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifnames == nullptr || *ifnames == '\0') {
    return c10d::ProcessGroupGloo::Options::create_default(timeout);
  }
  auto options = c10::make_intrusive<c10d::ProcessGroupGloo::Options>(timeout);
  std::stringstream names(ifnames);
  std::string name;
  while (std::getline(names, name, ',')) {
    if (!name.empty()) {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
  }
  TORCH_CHECK(
      !options->devices.empty(),
      "GLOO_SOCKET_IFNAME='",
      ifnames,
      "' names no interface");
  return options;
}

} // namespace

extern "C" {

void hsat_c10d_free_error(char* error) {
  std::free(error);
}

int hsat_c10d_has_nccl(void) {
#ifdef HSAT_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

int hsat_store_new(
    const char* host,
    uint16_t port,
    int is_server,
    size_t world_size,
    int64_t timeout_ms,
    hsat_store** out,
    char** error) {
  return guarded(error, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = world_size;
    // Rank 0 returns at once: with port 0 the others learn the port only afterwards.
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new hsat_store{std::move(store)};
  });
}

uint16_t hsat_store_port(const hsat_store* store) {
  return store->store->getPort();
}

void hsat_store_free(hsat_store* store) {
  try {
    delete store;
  } catch (...) {
  }
}

int hsat_pg_new(
    const hsat_store* store,
    const char* prefix,
    int rank,
    int world_size,
    int backend,
    int64_t timeout_ms,
    hsat_pg** out,
    char** error) {
  return guarded(error, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> prefixed =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == HSAT_C10D_GLOO) {
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
          prefixed, rank, world_size, gloo_options(timeout));
    } else if (backend == HSAT_C10D_NCCL) {
#ifdef HSAT_WITH_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          prefixed, rank, world_size, options);
#else
      TORCH_CHECK(false, "the nccl backend is not compiled in: rebuild hsat-worker with --features nccl");
#endif
    } else {
      TORCH_CHECK(false, "unknown backend code ", backend);
    }
    *out = new hsat_pg{std::move(pg)};
  });
}

int hsat_pg_all_reduce_sum(
    hsat_pg* pg, void* const* tensors, size_t n, hsat_work** out, char** error) {
  return guarded(error, [&] {
    auto work = std::make_unique<hsat_work>();
    for (auto& tensor : tensors_of(tensors, n)) {
      // Gloo's multi-tensor form means "one tensor per device": one call per tensor.
      std::vector<at::Tensor> one{tensor};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      work->works.push_back(pg->backend->allreduce(one, opts));
    }
    *out = work.release();
  });
}

int hsat_pg_broadcast(
    hsat_pg* pg,
    void* const* tensors,
    size_t n,
    int root,
    hsat_work** out,
    char** error) {
  return guarded(error, [&] {
    auto work = std::make_unique<hsat_work>();
    for (auto& tensor : tensors_of(tensors, n)) {
      std::vector<at::Tensor> one{tensor};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.rootTensor = 0;
      work->works.push_back(pg->backend->broadcast(one, opts));
    }
    *out = work.release();
  });
}

int hsat_pg_barrier(hsat_pg* pg, char** error) {
  return guarded(error, [&] { pg->backend->barrier()->wait(); });
}

void hsat_pg_free(hsat_pg* pg, int abort) {
  try {
    if (abort != 0) {
      pg->backend->abort();
    } else {
      pg->backend->shutdown();
    }
  } catch (...) {
  }
  try {
    delete pg;
  } catch (...) {
  }
}

int hsat_work_wait(hsat_work* work, char** error) {
  return guarded(error, [&] {
    // Stop at the first failure: the remaining collectives hold their own tensor
    // references and finish (or fail) on the backend's threads.
    for (auto& w : work->works) {
      w->wait();
    }
    work->works.clear();
  });
}

void hsat_work_free(hsat_work* work) {
  try {
    delete work;
  } catch (...) {
  }
}

int hsat_tensor_set_grad(void* tensor, void* grad, char** error) {
  return guarded(error, [&] {
    TORCH_CHECK(tensor != nullptr && grad != nullptr, "null tensor pointer");
    static_cast<at::Tensor*>(tensor)->mutable_grad() =
        *static_cast<const at::Tensor*>(grad);
  });
}

} // extern "C"
