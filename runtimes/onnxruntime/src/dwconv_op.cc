// ai.edgekit::QLinearDepthwiseConv: the ONNX Runtime custom op around the kernels of dwconv.h.
//
// Inputs (QLinearConv's, in its order; the activations channels-last):
//   0 x        uint8 [N, H, W, C]
//   1 x_scale  float scalar           2 x_zero_point  uint8 scalar
//   3 w        int8 [C, 1, kh, kw]    4 w_scale float [C] or scalar   5 w_zero_point int8 [C] or scalar, all zero
//   6 y_scale  float scalar           7 y_zero_point  uint8 scalar
//   8 B        int32 [C] (optional)
// Attributes: kernel_shape [kh, kw] (required), strides, pads [top, left, bottom, right], dilations (default 1s).
// Output: y uint8 [N, Ho, Wo, C], Ho = (H + top + bottom - dh (kh - 1) - 1) / sh + 1 (likewise Wo).
// Everything but x must be a constant initializer: it is packed once, when the kernel is created.
#include <algorithm>
#include <string>
#include <vector>

#include "dwconv.h"
#include "kernels.h"
#include "op_util.h"

namespace edgekit {
namespace {

// Tasks of one call: about kTasks (output row, channel range) pieces, so 2-8 threads share even the 7x7 layers.
constexpr int64_t kTasks = 16;

std::vector<int64_t> attr_ints(const OrtApi& api, const OrtKernelInfo* info, const char* name,
                               std::vector<int64_t> dflt) {
  size_t n = 0;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  std::vector<int64_t> v(n);
  if (n) {
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &n)) {
      api.ReleaseStatus(st);
      throw Error(std::string("QLinearDepthwiseConv: cannot read attribute '") + name + "'");
    }
  }
  return v;
}

// Constant input i as a tensor (its data, type and shape).
TensorIn constant_tensor(const OrtApi& api, const OrtKernelInfo* info, size_t i, const char* what) {
  int is_const = 0;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) {
    api.ReleaseStatus(st);
    is_const = 0;
  }
  if (!is_const || !v) throw Error(std::string("QLinearDepthwiseConv: ") + what + " must be a constant initializer");
  Ort::ConstValue cv(v);
  auto ti = cv.GetTensorTypeAndShapeInfo();
  TensorIn t;
  t.type = ti.GetElementType();
  t.shape = ti.GetShape();
  t.data = cv.GetTensorRawData();
  return t;
}

template <class T>
T scalar_of(const TensorIn& t, ONNXTensorElementDataType type, const char* what) {
  expect(t.type == type && t.size() == 1, std::string("QLinearDepthwiseConv: ") + what + " must be a scalar of its type");
  return *static_cast<const T*>(t.data);
}

struct DwConvKernel {
  DwConvArgs geom;  // kernel and stride fields (the shapes are filled per call)
  int64_t pad_bottom = 0, pad_right = 0;
  PackedDwConv packed;
  DwConvFn fn;

  DwConvKernel(const OrtApi& api, const OrtKernelInfo* info, Isa isa) {
    const auto ks = attr_ints(api, info, "kernel_shape", {});
    const auto st = attr_ints(api, info, "strides", {1, 1});
    const auto dl = attr_ints(api, info, "dilations", {1, 1});
    const auto pd = attr_ints(api, info, "pads", {0, 0, 0, 0});
    expect(ks.size() == 2 && ks[0] > 0 && ks[1] > 0, "QLinearDepthwiseConv: kernel_shape must be [kh, kw] (2-D only)");
    expect(st.size() == 2 && st[0] > 0 && st[1] > 0, "QLinearDepthwiseConv: strides must be 2 positive ints");
    expect(dl.size() == 2 && dl[0] > 0 && dl[1] > 0, "QLinearDepthwiseConv: dilations must be 2 positive ints");
    expect(pd.size() == 4 && *std::min_element(pd.begin(), pd.end()) >= 0,
           "QLinearDepthwiseConv: pads must be 4 non-negative ints [top, left, bottom, right]");
    geom.kh = ks[0], geom.kw = ks[1], geom.sh = st[0], geom.sw = st[1], geom.dh = dl[0], geom.dw = dl[1];
    geom.pad_top = pd[0], geom.pad_left = pd[1], pad_bottom = pd[2], pad_right = pd[3];

    const TensorIn xs = constant_tensor(api, info, 1, "x_scale"), xz = constant_tensor(api, info, 2, "x_zero_point"),
                   w = constant_tensor(api, info, 3, "w"), ws = constant_tensor(api, info, 4, "w_scale"),
                   wz = constant_tensor(api, info, 5, "w_zero_point"), ys = constant_tensor(api, info, 6, "y_scale"),
                   yz = constant_tensor(api, info, 7, "y_zero_point");
    const float x_scale = scalar_of<float>(xs, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "x_scale");
    const int32_t x_zero = scalar_of<uint8_t>(xz, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "x_zero_point");
    const float y_scale = scalar_of<float>(ys, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "y_scale");
    packed.y_zero = scalar_of<uint8_t>(yz, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "y_zero_point");
    expect(w.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 && w.shape.size() == 4 && w.shape[1] == 1 &&
               w.shape[2] == geom.kh && w.shape[3] == geom.kw && w.shape[0] > 0,
           "QLinearDepthwiseConv: w must be int8 [C, 1, kh, kw] matching kernel_shape, got " + shape_str(w.shape));
    const int64_t C = w.shape[0], taps = geom.kh * geom.kw;
    expect(ws.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && (ws.size() == 1 || ws.size() == C),
           "QLinearDepthwiseConv: w_scale must be float32, a scalar or [C]");
    expect(wz.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 && (wz.size() == 1 || wz.size() == C),
           "QLinearDepthwiseConv: w_zero_point must be int8, a scalar or [C]");
    const auto* wzp = static_cast<const int8_t*>(wz.data);
    expect(std::all_of(wzp, wzp + wz.size(), [](int8_t z) { return z == 0; }),
           "QLinearDepthwiseConv: w_zero_point must be all zero (symmetric weights)");
    const int32_t* bias = nullptr;
    if (!omitted_input(api, info, 8)) {
      const TensorIn b = constant_tensor(api, info, 8, "B");
      expect(b.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 && b.size() == C,
             "QLinearDepthwiseConv: B must be int32 [C], got " + shape_str(b.shape));
      bias = static_cast<const int32_t*>(b.data);
    }
    packed.C = C, packed.Cp = round_up(C, 64), packed.taps = taps, packed.taps_padded = round_up(taps, 4);
    packed.w.assign(static_cast<size_t>(taps * packed.Cp), 0);
    packed.bias.assign(static_cast<size_t>(packed.Cp), 0);
    packed.scale.assign(static_cast<size_t>(packed.Cp), 0.f);
    packed.zero_row.assign(static_cast<size_t>(packed.Cp), static_cast<uint8_t>(x_zero));
    const auto* wq = static_cast<const int8_t*>(w.data);
    const auto* wsc = static_cast<const float*>(ws.data);
    for (int64_t c = 0; c < C; ++c) {
      int32_t sum = 0;
      for (int64_t t = 0; t < taps; ++t) {
        packed.w[t * packed.Cp + c] = wq[c * taps + t];
        sum += wq[c * taps + t];
      }
      packed.bias[c] = (bias ? bias[c] : 0) - x_zero * sum;
      packed.scale[c] = x_scale * wsc[ws.size() == 1 ? 0 : c] / y_scale;  // QLinearConv's order of operations
    }
    fn = dwconv_row_scalar;
    if (isa == Isa::kAvx512 && dwconv_row_avx512()) {
      dwconv_pack_vnni(packed);
      fn = dwconv_row_avx512();
    }
  }

  void Compute(OrtKernelContext* raw) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext ctx(raw);
    const TensorIn X = get_input(ctx, 0);
    expect(X.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && X.shape.size() == 4 && X.shape[3] == packed.C,
           "QLinearDepthwiseConv: x must be uint8 [N, H, W, " + std::to_string(packed.C) + "] (channels last), got " +
               shape_str(X.shape));
    DwConvArgs a = geom;
    a.N = X.shape[0], a.H = X.shape[1], a.W = X.shape[2], a.C = X.shape[3];
    const int64_t eh = a.H + a.pad_top + pad_bottom - a.dh * (a.kh - 1) - 1,
                  ew = a.W + a.pad_left + pad_right - a.dw * (a.kw - 1) - 1;
    expect(eh >= 0 && ew >= 0, "QLinearDepthwiseConv: the kernel is larger than the padded input " +
                                   shape_str(X.shape));
    a.Ho = eh / a.sh + 1, a.Wo = ew / a.sw + 1;
    a.X = static_cast<const uint8_t*>(X.data);
    const std::vector<int64_t> offsets = dwconv_tap_offsets(a, packed);
    a.tap_offsets = offsets.data();
    Ort::UnownedValue Yv = ctx.GetOutput(0, std::vector<int64_t>{a.N, a.Ho, a.Wo, a.C});
    a.Y = Yv.GetTensorMutableData<uint8_t>();
    const int64_t rows = a.N * a.Ho, blocks = packed.Cp / 64;
    if (rows == 0) return;
    const int64_t chunks = std::min(blocks, std::max<int64_t>(1, (kTasks + rows - 1) / rows));
    const int64_t per = (blocks + chunks - 1) / chunks * 64;
    auto body = [&](size_t i) {
      const int64_t r = static_cast<int64_t>(i) / chunks, c0 = (static_cast<int64_t>(i) % chunks) * per;
      if (c0 < a.C) fn(a, packed, r, c0, std::min(a.C, c0 + per));
    };
    parallel_for(api, raw, static_cast<size_t>(rows * chunks), body);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return as_status(Ort::GetApi(), [&] { Compute(ctx); });
  }
};

struct DwConvOp : Ort::CustomOpBase<DwConvOp, DwConvKernel, true> {
  Isa isa;
  explicit DwConvOp(Isa i) : isa(i) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return as_status(api, [&] { *kernel = new DwConvKernel(api, info, isa); });
  }
  const char* GetName() const { return "QLinearDepthwiseConv"; }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0:
      case 2:
      case 7:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 3:
      case 5:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case 8:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 8 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8; }
};

std::vector<std::unique_ptr<DwConvOp>> g_dwconv_ops;  // ops outlive every session (see edgekit_ort.cc)

}  // namespace

// Adds QLinearDepthwiseConv for `isa` to `domain` (called by RegisterCustomOps under its lock).
void add_dwconv_op(Ort::CustomOpDomain& domain, Isa isa) {
  g_dwconv_ops.push_back(std::make_unique<DwConvOp>(isa));
  domain.Add(g_dwconv_ops.back().get());
}

}  // namespace edgekit
