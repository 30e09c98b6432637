// edgekit ONNX Runtime custom ops: helpers shared by the op implementations (edgekit_ort.cc, dwconv_op.cc):
// errors that become ORT statuses, attributes, inputs, the intra-op thread pool, weights packed once.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgekit {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline int64_t attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, bool required, int64_t dflt) {
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api.ReleaseStatus(st);
    if (required) throw Error(std::string("missing INT attribute '") + name + "'");
    return dflt;
  }
  return v;
}

// Run fn(i) for i in [0, tasks) on ONNX Runtime's intra-op thread pool.
template <typename F>
inline void parallel_for(const OrtApi& api, OrtKernelContext* ctx, size_t tasks, F& fn) {
  if (tasks <= 1) {
    for (size_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  auto tramp = [](void* p, size_t i) { (*static_cast<F*>(p))(i); };
  OrtStatus* st = api.KernelContext_ParallelFor(ctx, tramp, tasks, 0, &fn);
  if (st) {  // no thread pool available: run inline
    api.ReleaseStatus(st);
    for (size_t i = 0; i < tasks; ++i) fn(i);
  }
}

struct TensorIn {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t size() const {
    int64_t s = 1;
    for (int64_t d : shape) s *= d;
    return s;
  }
};

// Input i, or an empty TensorIn when the node omits it.
inline TensorIn get_input(Ort::KernelContext& ctx, size_t i) {
  TensorIn t;
  if (i >= ctx.GetInputCount()) return t;
  Ort::ConstValue v = ctx.GetInput(i);
  if (!static_cast<const OrtValue*>(v)) return t;
  auto info = v.GetTensorTypeAndShapeInfo();
  t.type = info.GetElementType();
  t.shape = info.GetShape();
  t.data = v.GetTensorRawData();
  return t;
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) throw Error(what);
}

// Rows of activations [M, K] -> [M, lda] with zero padding.
template <typename T>
const T* padded_rows(const T* src, int64_t M, int64_t K, int64_t lda, std::vector<T>& buf) {
  buf.assign(static_cast<size_t>(M * lda), T(0));
  for (int64_t m = 0; m < M; ++m) std::memcpy(buf.data() + m * lda, src + m * K, sizeof(T) * K);
  return buf.data();
}

// True when the node omits optional input i (fewer inputs, or an empty name: zero_points "" before a bias).
inline bool omitted_input(const OrtApi& api, const OrtKernelInfo* info, size_t i) {
  size_t count = 0;
  if (OrtStatus* st = api.KernelInfo_GetInputCount(info, &count)) {
    api.ReleaseStatus(st);
    return false;
  }
  if (i >= count) return true;
  size_t len = 0;
  if (OrtStatus* st = api.KernelInfo_GetInputName(info, i, nullptr, &len)) {
    api.ReleaseStatus(st);
    return false;
  }
  return len <= 1;  // the size includes the terminating NUL
}

// True when input i of the node is a constant initializer (its data cannot change between runs).
inline bool constant_input(const OrtApi& api, const OrtKernelInfo* info, size_t i) {
  if (omitted_input(api, info, i)) return true;  // omitted optional input
  int is_const = 0;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) {
    api.ReleaseStatus(st);
    return false;
  }
  return is_const != 0;
}

// Runs f; an exception becomes an ORT_INVALID_ARGUMENT status with its message (custom ops must not throw into ORT).
template <class F>
OrtStatusPtr as_status(const OrtApi& api, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

// EDGEKIT_ORT_NO_PREPACK=1 (set, not "0"): every kernel runs on its inputs as given (the tests compare both paths).
inline bool prepack_disabled() {
  const char* v = std::getenv("EDGEKIT_ORT_NO_PREPACK");
  return v && *v && std::string(v) != "0";
}

// Weights re-packed once per kernel instance, on first use, keyed by the input pointers they were packed from:
// get(key, pack) returns the packed form, packing it with pack(P&) -> bool the first time; null when pack fails or
// when the inputs are not the ones packed (not expected for constant initializers: the caller runs unpacked).
template <class P>
class PackOnce {
 public:
  template <class F>
  const P* get(std::array<const void*, 3> key, F&& pack) {
    std::lock_guard<std::mutex> lock(mu_);
    if (packed_) return key == from_ ? packed_.get() : nullptr;
    auto pk = std::make_unique<P>();
    if (!pack(*pk)) return nullptr;
    from_ = key;
    packed_ = std::move(pk);
    return packed_.get();
  }

 private:
  std::mutex mu_;
  std::unique_ptr<P> packed_;
  std::array<const void*, 3> from_{};
};

}  // namespace edgekit
