// Declarations of the few gloo types that c10d's ProcessGroupGloo.hpp names.
//
// The PyTorch wheel ships libgloo inside libtorch_cpu but no gloo headers. Every gloo
// object reaches our code behind a pointer, created and used only inside libtorch, so
// these declarations only have to make the header parse: `Context::setTimeout` and the
// four virtual methods of `rendezvous::Store` appear in inline bodies of that header,
// which this shim never calls (the shim never builds a GlooStore nor calls setTimeout).
// They compile to the same mangled names as the real ones. `GLOO_STORE_HAS_STORE_V2` is
// left undefined, so the header skips the newer store methods.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {

class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport

namespace rendezvous {
class Store {
 public:
  virtual ~Store();
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous

} // namespace gloo
