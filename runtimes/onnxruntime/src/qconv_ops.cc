// ai.edgekit::QLinearDepthwiseConv and ai.edgekit::QLinearConvDirect: the ONNX Runtime custom ops around the
// kernels of dwconv.h and conv_direct.h (specification and numpy reference: edgekit/kernels/dwconv.py).
//
// Inputs of both (QLinearConv's, in its order; the activations channels-last):
//   0 x        uint8 [N, H, W, Cin]
//   1 x_scale  float scalar           2 x_zero_point  uint8 scalar
//   3 w        int8 [Cout, Cin / group, kh, kw]: QLinearDepthwiseConv [C, 1, kh, kw] (group = C implied),
//              QLinearConvDirect [Cout, Cin, kh, kw] (group 1) with kh kw Cin <= kDirectMaxK
//   4 w_scale  float [Cout] or scalar 5 w_zero_point int8 [Cout] or scalar, all zero
//   6 y_scale  float scalar           7 y_zero_point  uint8 scalar
//   8 B        int32 [Cout] (optional)
// Attributes: kernel_shape [kh, kw] (required), strides, pads [top, left, bottom, right], dilations (default 1s).
// Output: y uint8 [N, Ho, Wo, Cout], Ho = (H + top + bottom - dh (kh - 1) - 1) / sh + 1 (likewise Wo).
// Everything but x must be a constant initializer: it is packed once, when the kernel is created.
#include <algorithm>
#include <string>
#include <vector>

#include "conv_direct.h"
#include "dwconv.h"
#include "kernels.h"
#include "op_util.h"

namespace edgekit {
namespace {

// Tasks of one call: about kTasks (output row, channel range) pieces, so 2-8 threads share even the 7x7 layers.
constexpr int64_t kTasks = 16;

std::vector<int64_t> attr_ints(const OrtApi& api, const OrtKernelInfo* info, const char* op, const char* name,
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
      throw Error(std::string(op) + ": cannot read attribute '" + name + "'");
    }
  }
  return v;
}

// Constant input i as a tensor (its data, type and shape).
TensorIn constant_tensor(const OrtApi& api, const OrtKernelInfo* info, size_t i, const std::string& what) {
  int is_const = 0;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) {
    api.ReleaseStatus(st);
    is_const = 0;
  }
  if (!is_const || !v) throw Error(what + " must be a constant initializer");
  Ort::ConstValue cv(v);
  auto ti = cv.GetTensorTypeAndShapeInfo();
  TensorIn t;
  t.type = ti.GetElementType();
  t.shape = ti.GetShape();
  t.data = cv.GetTensorRawData();
  return t;
}

template <class T>
T scalar_of(const TensorIn& t, ONNXTensorElementDataType type, const std::string& what) {
  expect(t.type == type && t.size() == 1, what + " must be a scalar of its type");
  return *static_cast<const T*>(t.data);
}

// The attributes and constant inputs both ops share, checked.
struct QConvParams {
  DwConvArgs geom;  // kernel, stride, dilation and top/left padding (shapes are filled per call)
  int64_t pad_bottom = 0, pad_right = 0;
  float x_scale = 1.f, y_scale = 1.f;
  int32_t x_zero = 0, y_zero = 0;
  TensorIn w;
  std::vector<float> w_scale;   // [Cout]
  const int32_t* bias = nullptr;  // [Cout] or null

  QConvParams(const OrtApi& api, const OrtKernelInfo* info, const std::string& op) {
    const char* o = op.c_str();
    const auto ks = attr_ints(api, info, o, "kernel_shape", {});
    const auto st = attr_ints(api, info, o, "strides", {1, 1});
    const auto dl = attr_ints(api, info, o, "dilations", {1, 1});
    const auto pd = attr_ints(api, info, o, "pads", {0, 0, 0, 0});
    expect(ks.size() == 2 && ks[0] > 0 && ks[1] > 0, op + ": kernel_shape must be [kh, kw] (2-D only)");
    expect(st.size() == 2 && st[0] > 0 && st[1] > 0, op + ": strides must be 2 positive ints");
    expect(dl.size() == 2 && dl[0] > 0 && dl[1] > 0, op + ": dilations must be 2 positive ints");
    expect(pd.size() == 4 && *std::min_element(pd.begin(), pd.end()) >= 0,
           op + ": pads must be 4 non-negative ints [top, left, bottom, right]");
    geom.kh = ks[0], geom.kw = ks[1], geom.sh = st[0], geom.sw = st[1], geom.dh = dl[0], geom.dw = dl[1];
    geom.pad_top = pd[0], geom.pad_left = pd[1], pad_bottom = pd[2], pad_right = pd[3];

    const std::string p = op + ": ";
    const TensorIn xs = constant_tensor(api, info, 1, p + "x_scale"),
                   xz = constant_tensor(api, info, 2, p + "x_zero_point"), ws = constant_tensor(api, info, 4, p + "w_scale"),
                   wz = constant_tensor(api, info, 5, p + "w_zero_point"), ys = constant_tensor(api, info, 6, p + "y_scale"),
                   yz = constant_tensor(api, info, 7, p + "y_zero_point");
    w = constant_tensor(api, info, 3, p + "w");
    x_scale = scalar_of<float>(xs, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, p + "x_scale");
    x_zero = scalar_of<uint8_t>(xz, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, p + "x_zero_point");
    y_scale = scalar_of<float>(ys, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, p + "y_scale");
    y_zero = scalar_of<uint8_t>(yz, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, p + "y_zero_point");
    expect(w.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 && w.shape.size() == 4 && w.shape[2] == geom.kh &&
               w.shape[3] == geom.kw && w.shape[0] > 0 && w.shape[1] > 0,
           p + "w must be int8 [Cout, Cin, kh, kw] matching kernel_shape, got " + shape_str(w.shape));
    const int64_t cout = w.shape[0];
    expect(ws.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && (ws.size() == 1 || ws.size() == cout),
           p + "w_scale must be float32, a scalar or [Cout]");
    const auto* wsd = static_cast<const float*>(ws.data);
    w_scale.assign(static_cast<size_t>(cout), wsd[0]);
    if (ws.size() == cout) w_scale.assign(wsd, wsd + cout);
    expect(wz.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 && (wz.size() == 1 || wz.size() == cout),
           p + "w_zero_point must be int8, a scalar or [Cout]");
    const auto* wzp = static_cast<const int8_t*>(wz.data);
    expect(std::all_of(wzp, wzp + wz.size(), [](int8_t z) { return z == 0; }),
           p + "w_zero_point must be all zero (symmetric weights)");
    if (!omitted_input(api, info, 8)) {
      const TensorIn b = constant_tensor(api, info, 8, p + "B");
      expect(b.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 && b.size() == cout,
             p + "B must be int32 [Cout], got " + shape_str(b.shape));
      bias = static_cast<const int32_t*>(b.data);
    }
  }

  float out_scale(int64_t co) const { return x_scale * w_scale[co] / y_scale; }  // QLinearConv's order

  // The geometry of a call on x [N, H, W, cin]; the output shape is [N, Ho, Wo, cout].
  DwConvArgs call(const TensorIn& X, int64_t cin, const std::string& op) const {
    expect(X.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && X.shape.size() == 4 && X.shape[3] == cin,
           op + ": x must be uint8 [N, H, W, " + std::to_string(cin) + "] (channels last), got " + shape_str(X.shape));
    DwConvArgs a = geom;
    a.N = X.shape[0], a.H = X.shape[1], a.W = X.shape[2], a.C = cin;
    const int64_t eh = a.H + a.pad_top + pad_bottom - a.dh * (a.kh - 1) - 1,
                  ew = a.W + a.pad_left + pad_right - a.dw * (a.kw - 1) - 1;
    expect(eh >= 0 && ew >= 0, op + ": the kernel is larger than the padded input " + shape_str(X.shape));
    a.Ho = eh / a.sh + 1, a.Wo = ew / a.sw + 1;
    a.X = static_cast<const uint8_t*>(X.data);
    return a;
  }
};

struct DwConvKernel {
  QConvParams q;
  PackedDwConv packed;
  DwConvFn fn;

  DwConvKernel(const OrtApi& api, const OrtKernelInfo* info, Isa isa) : q(api, info, "QLinearDepthwiseConv") {
    expect(q.w.shape[1] == 1, "QLinearDepthwiseConv: w must be [C, 1, kh, kw], got " + shape_str(q.w.shape));
    const int64_t C = q.w.shape[0], taps = q.geom.kh * q.geom.kw;
    packed.C = C, packed.Cp = round_up(C, 64), packed.taps = taps, packed.taps_padded = round_up(taps, 4);
    packed.y_zero = q.y_zero;
    packed.w.assign(static_cast<size_t>(taps * packed.Cp), 0);
    packed.bias.assign(static_cast<size_t>(packed.Cp), 0);
    packed.scale.assign(static_cast<size_t>(packed.Cp), 0.f);
    packed.zero_row.assign(static_cast<size_t>(packed.Cp), static_cast<uint8_t>(q.x_zero));
    const auto* wq = static_cast<const int8_t*>(q.w.data);
    for (int64_t c = 0; c < C; ++c) {
      int32_t sum = 0;
      for (int64_t t = 0; t < taps; ++t) {
        packed.w[t * packed.Cp + c] = wq[c * taps + t];
        sum += wq[c * taps + t];
      }
      packed.bias[c] = (q.bias ? q.bias[c] : 0) - q.x_zero * sum;
      packed.scale[c] = q.out_scale(c);
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
    DwConvArgs a = q.call(get_input(ctx, 0), packed.C, "QLinearDepthwiseConv");
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

struct ConvDirectKernel {
  QConvParams q;
  PackedConvDirect packed;
  ConvDirectFn fn;

  ConvDirectKernel(const OrtApi& api, const OrtKernelInfo* info, Isa isa) : q(api, info, "QLinearConvDirect") {
    const int64_t cout = q.w.shape[0], cin = q.w.shape[1], kh = q.geom.kh, kw = q.geom.kw;
    packed.Cin = cin, packed.Cout = cout, packed.Coutp = round_up(cout, 16), packed.K = kh * kw * cin;
    expect(packed.K <= kDirectMaxK, "QLinearConvDirect: kh * kw * Cin must be at most " +
                                        std::to_string(kDirectMaxK) + ", got " + std::to_string(packed.K));
    packed.K4 = (packed.K + 3) / 4, packed.y_zero = q.y_zero, packed.x_zero = static_cast<uint8_t>(q.x_zero);
    packed.w.assign(static_cast<size_t>(cout * packed.K), 0);
    packed.bias.assign(static_cast<size_t>(packed.Coutp), 0);
    packed.scale.assign(static_cast<size_t>(packed.Coutp), 0.f);
    const auto* wq = static_cast<const int8_t*>(q.w.data);
    for (int64_t co = 0; co < cout; ++co) {
      int32_t sum = 0;
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t ky = 0; ky < kh; ++ky)
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int8_t v = wq[((co * cin + ci) * kh + ky) * kw + kx];
            packed.w[co * packed.K + (ky * kw + kx) * cin + ci] = v;
            sum += v;
          }
      packed.bias[co] = (q.bias ? q.bias[co] : 0) - q.x_zero * sum;
      packed.scale[co] = q.out_scale(co);
    }
    fn = conv_direct_row_scalar;
    if (isa == Isa::kAvx512 && conv_direct_row_avx512()) {
      conv_direct_pack_vnni(packed);
      fn = conv_direct_row_avx512();
    }
  }

  void Compute(OrtKernelContext* raw) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext ctx(raw);
    DwConvArgs a = q.call(get_input(ctx, 0), packed.Cin, "QLinearConvDirect");
    Ort::UnownedValue Yv = ctx.GetOutput(0, std::vector<int64_t>{a.N, a.Ho, a.Wo, packed.Cout});
    a.Y = Yv.GetTensorMutableData<uint8_t>();
    auto body = [&](size_t r) { fn(a, packed, static_cast<int64_t>(r)); };
    parallel_for(api, raw, static_cast<size_t>(a.N * a.Ho), body);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return as_status(Ort::GetApi(), [&] { Compute(ctx); });
  }
};

// The ORT op definition of both (same inputs and output).
template <class Kernel>
struct QConvOp : Ort::CustomOpBase<QConvOp<Kernel>, Kernel, true> {
  Isa isa;
  const char* name;
  QConvOp(Isa i, const char* n) : isa(i), name(n) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return as_status(api, [&] { *kernel = new Kernel(api, info, isa); });
  }
  const char* GetName() const { return name; }
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

// ops outlive every session (see edgekit_ort.cc)
std::vector<std::unique_ptr<QConvOp<DwConvKernel>>> g_dwconv_ops;
std::vector<std::unique_ptr<QConvOp<ConvDirectKernel>>> g_direct_ops;

}  // namespace

// Adds QLinearDepthwiseConv and QLinearConvDirect for `isa` to `domain` (called by RegisterCustomOps under its lock).
void add_qconv_ops(Ort::CustomOpDomain& domain, Isa isa) {
  g_dwconv_ops.push_back(std::make_unique<QConvOp<DwConvKernel>>(isa, "QLinearDepthwiseConv"));
  domain.Add(g_dwconv_ops.back().get());
  g_direct_ops.push_back(std::make_unique<QConvOp<ConvDirectKernel>>(isa, "QLinearConvDirect"));
  domain.Add(g_direct_ops.back().get());
}

}  // namespace edgekit
