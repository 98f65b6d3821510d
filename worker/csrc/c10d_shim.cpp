// C ABI over libtorch's c10d: the engine PyTorch DDP uses, reached from Rust without
// Python. See c10d_shim.h for the conventions; worker/src/collective/ffi.rs is the
// Rust side. Every entry point catches every exception: none may unwind into Rust.

#include "c10d_shim.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>
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

// What synchronised batch norm needs from a group, shared by the Rust handle and every
// autograd node still holding a forward's context: the backend, and the first failure
// of a collective run inside a backward pass (the autograd engine rethrows it as a
// plain c10::Error, losing its kind; Rust reads it back here).
struct BnGroupState : torch::CustomClassHolder {
  explicit BnGroupState(c10::intrusive_ptr<c10d::Backend> b) : backend(std::move(b)) {}
  c10::intrusive_ptr<c10d::Backend> backend;
  std::mutex mutex;
  int failure_kind = HSAT_C10D_OK;
  std::string failure;
};

struct hsat_bn_group {
  c10::intrusive_ptr<BnGroupState> state;
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

// Synchronised batch norm (PyTorch's SyncBatchNorm, torch/nn/modules/_functions.py,
// computed with plain ATen ops so that it runs on CPU/Gloo as on CUDA/NCCL; PyTorch's
// own batch_norm_stats & co. are CUDA-only).
//
// Forward: every rank all-gathers (count, mean, M2) of its shard per channel (M2: sum of
// squared deviations from the shard's mean) and merges them with Chan's formula, in
// rank order, so every rank gets bitwise the same global mean and variance; a rank with
// an empty shard sends count 0, which drops out of the merge. Backward: one all-reduce
// of (sum dy, sum dy * (x - mean)) gives the global terms of the input gradient; the
// weight and bias gradients stay local (the gradient sync sums them).
class SyncBatchNormFunction
    : public torch::autograd::Function<SyncBatchNormFunction> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& input_,
      const at::Tensor& weight,
      const at::Tensor& bias,
      at::Tensor running_mean,
      at::Tensor running_var,
      double momentum,
      double eps,
      c10::intrusive_ptr<BnGroupState> state) {
    const auto& backend = state->backend;
    TORCH_CHECK(input_.dim() >= 2, "sync batch norm: input must be [N, C, ...], got ", input_.sizes());
    at::Tensor input = input_.contiguous();
    const int64_t channels = input.size(1);
    std::vector<int64_t> reduce_dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) {
      reduce_dims.push_back(d);
    }
    const int64_t count = channels > 0 ? input.numel() / channels : 0;
    auto opts = input.options();
    // [count, mean(C), M2(C)] of this shard.
    at::Tensor local = at::zeros({1 + 2 * channels}, opts);
    if (count > 0) {
      at::Tensor mean = input.mean(reduce_dims);
      at::Tensor centred = input - view_channels(mean, input.dim());
      at::Tensor m2 = (centred * centred).sum(reduce_dims);
      local.narrow(0, 0, 1).fill_(static_cast<double>(count));
      local.narrow(0, 1, channels).copy_(mean);
      local.narrow(0, 1 + channels, channels).copy_(m2);
    }
    const int world = backend->getSize();
    std::vector<at::Tensor> gathered;
    gathered.reserve(world);
    for (int r = 0; r < world; ++r) {
      gathered.push_back(at::empty_like(local));
    }
    {
      std::vector<std::vector<at::Tensor>> outputs{gathered};
      std::vector<at::Tensor> inputs{local};
      backend->allgather(outputs, inputs)->wait();
      gathered = outputs[0];
    }
    // Chan et al.'s pairwise merge, in rank order (the same on every rank). The
    // counts come to the host once (one device sync per layer on CUDA).
    at::Tensor counts = at::stack(gathered).select(1, 0).to(at::kCPU, at::kDouble).contiguous();
    const double* count_of = counts.data_ptr<double>();
    at::Tensor mean = at::zeros({channels}, opts);
    at::Tensor m2 = at::zeros({channels}, opts);
    double total = 0.0;
    for (int r = 0; r < world; ++r) {
      const double n_r = count_of[r];
      if (n_r <= 0.0) {
        continue;
      }
      at::Tensor mean_r = gathered[r].narrow(0, 1, channels);
      at::Tensor m2_r = gathered[r].narrow(0, 1 + channels, channels);
      const double merged = total + n_r;
      at::Tensor delta = mean_r - mean;
      mean = mean + delta * (n_r / merged);
      m2 = m2 + m2_r + delta * delta * (total * n_r / merged);
      total = merged;
    }
    TORCH_CHECK(
        total > 1.0,
        "sync batch norm: expected more than 1 value per channel over all ranks, got ",
        total);
    at::Tensor var = m2 / total;
    at::Tensor invstd = (var + eps).rsqrt();
    if (running_mean.defined() && running_var.defined()) {
      // PyTorch's update: the unbiased variance of the whole batch.
      running_mean.mul_(1.0 - momentum).add_(mean, momentum);
      running_var.mul_(1.0 - momentum).add_(m2 / (total - 1.0), momentum);
    }
    ctx->save_for_backward({input, weight, mean, invstd});
    ctx->saved_data["count"] = total;
    ctx->saved_data["group"] = c10::IValue::make_capsule(state);
    if (count == 0) {
      return at::empty_like(input);
    }
    const int64_t dim = input.dim();
    at::Tensor scale = invstd * weight;
    return (input - view_channels(mean, dim)) * view_channels(scale, dim) +
        view_channels(bias, dim);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    at::Tensor input = saved[0];
    at::Tensor weight = saved[1];
    at::Tensor mean = saved[2];
    at::Tensor invstd = saved[3];
    const double total = ctx->saved_data["count"].toDouble();
    auto state = c10::static_intrusive_pointer_cast<BnGroupState>(
        ctx->saved_data["group"].toCapsule());
    const int64_t channels = input.size(1);
    const int64_t dim = input.dim();
    std::vector<int64_t> reduce_dims{0};
    for (int64_t d = 2; d < dim; ++d) {
      reduce_dims.push_back(d);
    }
    at::Tensor grad_out = grad_outputs[0];
    at::Tensor sums = at::zeros({2 * channels}, input.options());
    at::Tensor centred;
    const bool empty = input.numel() == 0 || !grad_out.defined();
    if (!empty) {
      grad_out = grad_out.contiguous();
      centred = input - view_channels(mean, dim);
      sums.narrow(0, 0, channels).copy_(grad_out.sum(reduce_dims));
      sums.narrow(0, channels, channels).copy_((grad_out * centred).sum(reduce_dims));
    }
    at::Tensor local_sums = sums.clone();
    // Every rank joins, empty or not: the peers wait for this all-reduce.
    {
      std::vector<at::Tensor> one{sums};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      char* message = nullptr;
      int kind = guarded(&message, [&] { state->backend->allreduce(one, opts)->wait(); });
      if (kind != HSAT_C10D_OK) {
        std::string text = message != nullptr ? message : "unknown error";
        std::free(message);
        {
          std::lock_guard<std::mutex> lock(state->mutex);
          if (state->failure_kind == HSAT_C10D_OK) {
            state->failure_kind = kind;
            state->failure = text;
          }
        }
        TORCH_CHECK(false, "sync batch norm backward: all_reduce failed: ", text);
      }
    }
    at::Tensor grad_bias = local_sums.narrow(0, 0, channels).clone();
    at::Tensor grad_weight = local_sums.narrow(0, channels, channels) * invstd;
    at::Tensor grad_input;
    if (empty) {
      grad_input = at::zeros_like(input);
    } else {
      at::Tensor mean_dy = sums.narrow(0, 0, channels) / total;
      at::Tensor mean_dy_xmu = sums.narrow(0, channels, channels) / total;
      grad_input = (grad_out - view_channels(mean_dy, dim) -
                    centred * view_channels(invstd * invstd * mean_dy_xmu, dim)) *
          view_channels(invstd * weight, dim);
    }
    return {
        grad_input,
        grad_weight,
        grad_bias,
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor()};
  }

 private:
  // [C] -> [1, C, 1, ...] to broadcast over an input of `dim` dimensions.
  static at::Tensor view_channels(const at::Tensor& t, int64_t dim) {
    std::vector<int64_t> shape(dim, 1);
    shape[1] = t.size(0);
    return t.view(shape);
  }
};

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

int hsat_bn_group_new(const hsat_pg* pg, hsat_bn_group** out, char** error) {
  return guarded(error, [&] {
    TORCH_CHECK(pg != nullptr, "null process group");
    *out = new hsat_bn_group{c10::make_intrusive<BnGroupState>(pg->backend)};
  });
}

void hsat_bn_group_free(hsat_bn_group* group) {
  try {
    delete group;
  } catch (...) {
  }
}

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
    char** error) {
  return guarded(error, [&] {
    TORCH_CHECK(
        group != nullptr && input != nullptr && weight != nullptr && bias != nullptr &&
            running_mean != nullptr && running_var != nullptr,
        "null pointer passed to hsat_sync_batch_norm");
    auto result = SyncBatchNormFunction::apply(
        *static_cast<const at::Tensor*>(input),
        *static_cast<const at::Tensor*>(weight),
        *static_cast<const at::Tensor*>(bias),
        *static_cast<const at::Tensor*>(running_mean),
        *static_cast<const at::Tensor*>(running_var),
        momentum,
        eps,
        group->state);
    *out = new at::Tensor(std::move(result));
  });
}

int hsat_bn_group_take_failure(hsat_bn_group* group, char** error) {
  std::lock_guard<std::mutex> lock(group->state->mutex);
  int kind = group->state->failure_kind;
  if (kind != HSAT_C10D_OK) {
    fail(error, kind, group->state->failure);
    group->state->failure_kind = HSAT_C10D_OK;
    group->state->failure.clear();
  }
  return kind;
}

int hsat_tensor_set_grad(void* tensor, void* grad, char** error) {
  return guarded(error, [&] {
    TORCH_CHECK(tensor != nullptr && grad != nullptr, "null tensor pointer");
    static_cast<at::Tensor*>(tensor)->mutable_grad() =
        *static_cast<const at::Tensor*>(grad);
  });
}

} // extern "C"
