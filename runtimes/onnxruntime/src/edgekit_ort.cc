// ONNX Runtime custom-op library for the ai.edgekit domain: MatMulLowBit, MatMulSparse24 and
// QLinearDepthwiseConv and QLinearConvDirect (qconv_ops.cc) (CPU).
//
// Entry point: RegisterCustomOps(OrtSessionOptions*, const OrtApiBase*), called by
// SessionOptions.register_custom_ops_library(path). The library asks ONNX Runtime for the C API version of the
// headers it was compiled against (ORT_API_VERSION), so it loads in any later ONNX Runtime.
//
// The kernel path (scalar, AVX2, AVX-512 with VNNI) is the best one cpuid reports, or the one named by the
// environment variable EDGEKIT_ORT_ISA=scalar|avx2|avx512 when the library is registered (per session options;
// a path the CPU lacks is refused with an error). Work is split over output rows with ONNX Runtime's intra-op
// thread pool (SessionOptions.intra_op_num_threads).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"
#include "op_util.h"

namespace edgekit {

uint64_t stream_read_avx512(const uint8_t* p, size_t bytes);
void add_qconv_ops(Ort::CustomOpDomain& domain, Isa isa);  // qconv_ops.cc

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  if (avx512 && kernels_avx512()) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      kernels_avx2())
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

namespace {

const KernelTable& table_for(Isa isa) {
  if (isa == Isa::kAvx512 && kernels_avx512()) return *kernels_avx512();
  if (isa == Isa::kAvx2 && kernels_avx2()) return *kernels_avx2();
  return kernels_scalar();
}

Isa g_isa = Isa::kScalar;  // the path of the latest registration (reported by edgekit_ort_isa)
std::mutex g_mu;


// ---------------------------------------------------------------------------------------------------------------
// MatMulLowBit

// accuracy_level 4: rows [m0, m1) of A [M, K] quantized per row, asymmetric: with lo = min(0, min a_row),
// hi = max(0, max a_row), a_scale = (hi - lo) / 255 and the uint8 zero point z = round(-lo * 255 / (hi - lo)), each
// value's level u = clamp(round(a * 255 / (hi - lo)) + z, 0, 255) is stored as q = u - 128 (int8, so the kernels'
// vpdpbusd / vpmaddubsw keep the unsigned codes on the other side) and a ~= (q - a_zero) * a_scale with
// a_zero = z - 128. Rows that are all zero get a_scale 0, q 0, a_zero 0. q [M, lda] (zeros in [K, lda)),
// asum [M, groups] = sums of q per group (k < K). The AVX-512 quantizer (kernels_avx512_packed.cc) gives the same
// bits. Against symmetric int8 (max|a| / 127) the step is at most the same and half of it for one-signed rows
// (GELU and ReLU outputs).
void quantize_rows_scalar(const float* A, int64_t K, int64_t lda, int group, int64_t groups, int64_t m0, int64_t m1,
                          int8_t* q, float* a_scale, int32_t* a_zero, int32_t* asum) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = A + m * K;
    float lo = 0.f, hi = 0.f;
    for (int64_t k = 0; k < K; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
    const float range = hi - lo;
    const float inv = range > 0.f ? 255.f / range : 0.f;
    const int32_t z = range > 0.f ? static_cast<int32_t>(std::min(255.f, std::max(0.f, std::nearbyint(-lo * inv)))) : 128;
    a_scale[m] = range / 255.f;
    a_zero[m] = z - 128;
    int8_t* qr = q + m * lda;
    int32_t* gs = asum + m * groups;
    std::fill(gs, gs + groups, 0);
    for (int64_t k = 0; k < K; ++k) {
      const float r = std::nearbyint(x[k] * inv) + static_cast<float>(z);
      qr[k] = static_cast<int8_t>(static_cast<int32_t>(std::min(255.f, std::max(0.f, r))) - 128);
      gs[k / group] += qr[k];
    }
    std::fill(qr + K, qr + lda, int8_t(0));
  }
}

// The activations' zero-point term of accuracy_level 4: Y[m, n] -= off[m] * colsum[n] for rows [m0, m1), columns
// [n0, n1), where off[m] = a_scale[m] * a_zero[m] and colsum[n] = sum_{k<K} dequant(B)[n, k].
void sub_zero_term(float* __restrict Y, int64_t ldy, const float* __restrict off, const float* __restrict colsum,
                   int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    if (off[m] == 0.f) continue;
    float* __restrict y = Y + m * ldy;
    const float o = off[m];
    for (int64_t n = n0; n < n1; ++n) y[n] -= o * colsum[n];
  }
}

// colsum[n] = sum_{k<K} (q[n, k] - zp[n, g]) * scale[n, g] of a MatMulLowBit weight (float64 sums, rounded once).
std::vector<float> weight_column_sums(const LowBitArgs& a) {
  std::vector<float> out(static_cast<size_t>(a.N));
  const int64_t mask = (1 << a.bits) - 1;
  for (int64_t n = 0; n < a.N; ++n) {
    const uint8_t* row = a.B + n * a.row_bytes;
    double total = 0.0;
    for (int64_t g = 0; g < a.groups; ++g) {
      int64_t qs = 0, cnt = 0;
      for (int64_t k = g * a.group; k < std::min(a.K, (g + 1) * a.group); ++k, ++cnt) {
        const int64_t bit = k * a.bits, byte = bit >> 3;
        unsigned v = row[byte];
        if (byte + 1 < a.row_bytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
        qs += (v >> (bit & 7)) & mask;
      }
      const int64_t zp = a.zero_points ? a.zero_points[n * a.groups + g] : (int64_t(1) << (a.bits - 1));
      total += static_cast<double>(a.scales[n * a.groups + g]) * static_cast<double>(qs - zp * cnt);
    }
    out[static_cast<size_t>(n)] = static_cast<float>(total);
  }
  return out;
}

// The fused bias epilogue of MatMulLowBit: Y[m, n] += bias[n] for rows [m0, m1), columns [n0, n1) of Y [., ldy].
// Run by each parallel task over the outputs it has just written (still in cache), so no separate Add pass; the
// inner loop is a plain contiguous add that the compiler vectorizes.
void add_bias(float* __restrict Y, int64_t ldy, const float* __restrict bias, int64_t m0, int64_t m1, int64_t n0,
              int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* __restrict y = Y + m * ldy;
    for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
  }
}

// A STRING attribute, or dflt when the node has none.
std::string attr_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  std::string v(size, '\0');
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, v.data(), &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  v.resize(size > 0 ? size - 1 : 0);  // the size includes the terminating NUL
  return v;
}

// A FLOAT attribute, or dflt when the node has none.
float attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float dflt) {
  float v = 0.f;
  if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &v)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  return v;
}

// An INTS attribute, or empty when the node has none.
std::vector<int64_t> attr_ints(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api.ReleaseStatus(st);
    return {};
  }
  std::vector<int64_t> v(size);
  if (size == 0) return v;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &size)) {
    api.ReleaseStatus(st);
    return {};
  }
  return v;
}


struct LowBitKernel {
  int64_t K, N, bits, group, accuracy_level;
  bool gelu = false;  // activation="Gelu": the fused epilogue applies the exact GELU after the bias
  // split: Y's columns go to len(split) outputs of these widths (e.g. Q, K and V of one fused projection), copied
  // out by each task's epilogue from a scratch [M, N] while still in cache; empty: one output.
  static constexpr size_t kMaxSplit = 4;
  std::vector<int64_t> split;
  float epsilon = 1e-5f;  // the LayerNorm epilogue's (inputs ln_scale, ln_bias)
  Isa isa;
  // accuracy_level 4 on AVX-512: B, scales and zero points re-packed on the first run (when all are constant
  // initializers) into the tile layout of kernels_avx512_packed.cc, kept for the life of the kernel.
  bool prepack = false;
  PackOnce<PackedLowBit> packed;
  PackOnce<std::vector<float>> colsums;  // weight_column_sums of the constant weights (accuracy_level 4)

  LowBitKernel(const OrtApi& api, const OrtKernelInfo* info, Isa isa_) : isa(isa_) {
    K = attr_int(api, info, "K", true, 0);
    N = attr_int(api, info, "N", true, 0);
    bits = attr_int(api, info, "bits", true, 0);
    group = attr_int(api, info, "group_size", true, 0);
    accuracy_level = attr_int(api, info, "accuracy_level", false, 0);
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8))
      throw Error("MatMulLowBit: bits=" + std::to_string(bits) + " is not supported; use 2, 3, 4 or 8");
    if (!(group == 32 || group == 64 || group == 128))
      throw Error("MatMulLowBit: group_size=" + std::to_string(group) + " is not supported; use 32, 64 or 128");
    if (K < 1 || N < 1) throw Error("MatMulLowBit: K and N must be positive");
    const std::string act = attr_string(api, info, "activation", "");
    if (act != "" && act != "Gelu")
      throw Error("MatMulLowBit: activation='" + act + "' is not supported; use 'Gelu' or leave it out");
    gelu = act == "Gelu";
    split = attr_ints(api, info, "split");
    epsilon = attr_float(api, info, "epsilon", 1e-5f);
    if (!(epsilon >= 0.f)) throw Error("MatMulLowBit: epsilon must be >= 0");
    if (!split.empty()) {
      int64_t total = 0;
      for (int64_t v : split) total += v > 0 ? v : -(int64_t(1) << 40);
      if (split.size() < 2 || split.size() > kMaxSplit || total != N)
        throw Error("MatMulLowBit: split must be 2 to " + std::to_string(kMaxSplit) +
                    " positive sizes that sum to N=" + std::to_string(N));
    }
    if (accuracy_level != 0 && accuracy_level != 4)
      throw Error("MatMulLowBit: accuracy_level=" + std::to_string(accuracy_level) +
                  " is not supported; use 0 (fp32 math) or 4 (int8 activations)");
    prepack = accuracy_level == 4 && isa == Isa::kAvx512 && packed_lowbit_avx512() && !prepack_disabled() &&
              constant_input(api, info, 1) && constant_input(api, info, 2) && constant_input(api, info, 3);
  }

  // The packed weights for these inputs (packed on first use; null when B etc. are not the constant ones).
  const PackedLowBit* get_packed(const LowBitArgs& a) {
    return packed.get({a.B, a.scales, a.zero_points},
                      [&](PackedLowBit& pk) { return packed_lowbit_avx512()->pack(a, pk); });
  }

  void Compute(OrtKernelContext* raw) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext ctx(raw);
    TensorIn A = get_input(ctx, 0), B = get_input(ctx, 1), S = get_input(ctx, 2), Z = get_input(ctx, 3),
             Bias = get_input(ctx, 4), Skip = get_input(ctx, 5), Gamma = get_input(ctx, 6), Beta = get_input(ctx, 7);
    const int64_t Kp = round_up(K, group), groups = Kp / group;
    const int64_t row_bytes = bits == 3 ? 3 * ((Kp + 7) / 8) : (Kp * bits + 7) / 8;
    expect(A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && !A.shape.empty() && A.shape.back() == K,
           "MatMulLowBit: A must be float32 [..., " + std::to_string(K) + "], got " + shape_str(A.shape));
    expect(B.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && B.shape == std::vector<int64_t>{N, row_bytes},
           "MatMulLowBit: B_packed must be uint8 [" + std::to_string(N) + ", " + std::to_string(row_bytes) +
               "], got " + shape_str(B.shape));
    expect(S.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && S.shape == std::vector<int64_t>{N, groups},
           "MatMulLowBit: scales must be float32 [" + std::to_string(N) + ", " + std::to_string(groups) + "], got " +
               shape_str(S.shape));
    if (Z.data)
      expect(Z.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && Z.shape == std::vector<int64_t>{N, groups},
             "MatMulLowBit: zero_points must be uint8 [" + std::to_string(N) + ", " + std::to_string(groups) +
                 "], got " + shape_str(Z.shape));
    if (Bias.data)
      expect(Bias.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && Bias.shape == std::vector<int64_t>{N},
             "MatMulLowBit: bias must be float32 [" + std::to_string(N) + "], got " + shape_str(Bias.shape));
    const float* bias = static_cast<const float*>(Bias.data);
    std::vector<int64_t> yshape = A.shape;
    yshape.back() = N;
    if (Skip.data)
      expect(Skip.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && Skip.shape == yshape,
             "MatMulLowBit: skip must be float32 " + shape_str(yshape) + " (the output's shape), got " +
                 shape_str(Skip.shape));
    for (const TensorIn* t : {&Gamma, &Beta})
      if (t->data)
        expect(t->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && t->shape == std::vector<int64_t>{N},
               std::string("MatMulLowBit: ") + (t == &Gamma ? "ln_scale" : "ln_bias") + " must be float32 [" +
                   std::to_string(N) + "], got " + shape_str(t->shape));
    expect(!Beta.data || Gamma.data, "MatMulLowBit: ln_bias needs ln_scale");
    expect(split.empty() || (!Skip.data && !Gamma.data), "MatMulLowBit: split cannot be combined with skip/ln_scale");
    const int64_t M = A.size() / K;
    float* Y = nullptr;
    std::array<float*, kMaxSplit> outs{};
    if (split.empty()) {
      Y = ctx.GetOutput(0, yshape).GetTensorMutableData<float>();
    } else {
      for (size_t i = 0; i < split.size(); ++i) {
        yshape.back() = split[i];
        outs[i] = ctx.GetOutput(i, yshape).GetTensorMutableData<float>();
      }
      thread_local std::vector<float> ybuf;
      if (ybuf.size() < static_cast<size_t>(M * N)) ybuf.resize(static_cast<size_t>(M * N));
      Y = ybuf.data();
    }
    if (M == 0) return;
    Epilogue ep{bias, nullptr, nullptr, split.empty() ? nullptr : outs.data(), static_cast<const float*>(Skip.data),
                static_cast<const float*>(Gamma.data), static_cast<const float*>(Beta.data)};
    // whole-row epilogues (residual, LayerNorm) run in the tasks of the row-block path, else in a pass over rows
    // after the GEMM (the others' tasks own column slices)
    bool rows_pending = ep.skip || ep.gamma;
    auto finish_rows = [&] {
      if (!rows_pending) return;
      auto rbody = [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * 16;
        residual_layernorm_rows(isa, Y, N, ep.skip, ep.gamma, ep.beta, epsilon, m0, std::min(M, m0 + 16));
      };
      parallel_for(api, raw, static_cast<size_t>((M + 15) / 16), rbody);
    };

    LowBitArgs a;
    a.M = M, a.K = K, a.N = N, a.bits = static_cast<int>(bits), a.group = static_cast<int>(group);
    a.Kp = Kp, a.groups = groups, a.row_bytes = row_bytes;
    a.B = static_cast<const uint8_t*>(B.data);
    a.scales = static_cast<const float*>(S.data);
    a.zero_points = static_cast<const uint8_t*>(Z.data);
    a.Y = Y;
    const int64_t lda = round_up(Kp, 256);
    std::vector<float> abuf;
    std::vector<int8_t> qperm;
    std::vector<float> fperm;
    const float* Af = static_cast<const float*>(A.data);
    std::vector<float> own_colsum;
    if (accuracy_level == 4) {
      // Dynamic asymmetric per-row 8-bit quantization of A (quantize_rows_scalar); rows in parallel (vectorized on
      // AVX-512), into per-thread scratch reused across calls. off[m] = a_scale[m] * a_zero[m] for the epilogue.
      thread_local std::vector<int8_t> qs;
      thread_local std::vector<float> ss, os;
      thread_local std::vector<int32_t> gs, zs;
      if (qs.size() < static_cast<size_t>(M * lda)) qs.resize(static_cast<size_t>(M * lda));
      if (ss.size() < static_cast<size_t>(M)) ss.resize(static_cast<size_t>(M)), os.resize(static_cast<size_t>(M)),
          zs.resize(static_cast<size_t>(M));
      if (gs.size() < static_cast<size_t>(M * groups)) gs.resize(static_cast<size_t>(M * groups));
      QuantizeRowsFn qf0 = quantize_rows_scalar;
      if (isa == Isa::kAvx512 && packed_lowbit_avx512()) qf0 = packed_lowbit_avx512()->quantize;
      const int64_t rows_per = std::max<int64_t>(1, (M + 7) / 8);
      const size_t qtasks = static_cast<size_t>((M + rows_per - 1) / rows_per);
      int8_t* qd = qs.data();
      float* sd = ss.data();
      float* od = os.data();
      int32_t* gd = gs.data();
      int32_t* zd = zs.data();
      auto qf = [&](int64_t m0, int64_t m1) {
        qf0(Af, K, lda, static_cast<int>(group), groups, m0, m1, qd, sd, zd, gd);
        for (int64_t m = m0; m < m1; ++m) od[m] = sd[m] * static_cast<float>(zd[m]);
      };
      a.aq = qd, a.lda_q = lda, a.a_scale = sd, a.asum = gd;
      const std::vector<float>* cs = colsums.get({a.B, a.scales, a.zero_points}, [&](std::vector<float>& v) {
        v = weight_column_sums(a);
        return true;
      });
      if (!cs) own_colsum = weight_column_sums(a), cs = &own_colsum;
      ep.off = od, ep.colsum = cs->data();
      const PackedLowBit* pk = prepack ? get_packed(a) : nullptr;
      if (pk && M >= 32 && pk->w.size() <= (8u << 20)) {
        // GEMM (pre-packed) with cache-resident weights: one parallel pass over blocks of 16 rows, each quantizing
        // its own rows and then running every tile for them (no second thread-pool dispatch; the block's
        // activations stay in L1). Larger weights are streamed once per call instead (tiles in parallel, below).
        const PackedLowBitKernels& pkk = *packed_lowbit_avx512();
        constexpr int64_t kRows = 16;
        auto body = [&](size_t t) {
          const int64_t m0 = static_cast<int64_t>(t) * kRows, m1 = std::min(M, m0 + kRows);
          qf(m0, m1);
          LowBitArgs b = a;
          b.M = m1 - m0, b.aq = qd + m0 * lda, b.a_scale = sd + m0, b.asum = gd + m0 * groups, b.Y = Y + m0 * N;
          pkk.run(b, *pk, 0, pk->tiles);
          epilogue(Y, ep, m0, m1, 0, N);
          if (rows_pending) residual_layernorm_rows(isa, Y, N, ep.skip, ep.gamma, ep.beta, epsilon, m0, m1);
        };
        parallel_for(api, raw, static_cast<size_t>((M + kRows - 1) / kRows), body);
        return;
      }
      auto qbody = [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * rows_per;
        qf(m0, std::min(M, m0 + rows_per));
      };
      if (M * K >= 16384)
        parallel_for(api, raw, qtasks, qbody);
      else
        for (size_t t = 0; t < qtasks; ++t) qbody(t);
      if (pk) {
        const PackedLowBitKernels& pkk = *packed_lowbit_avx512();
        const int64_t per = M <= 4 ? 4 : 2;  // tiles per task (pairs: the batched kernel takes 2 tiles per pass)
        const size_t tasks = static_cast<size_t>((pk->tiles + per - 1) / per);
        auto body = [&](size_t t) {
          const int64_t t0 = static_cast<int64_t>(t) * per;
          const int64_t t1 = std::min(pk->tiles, t0 + per);
          pkk.run(a, *pk, t0, t1);
          epilogue(Y, ep, 0, M, t0 * pkk.tile_rows, std::min(N, t1 * pkk.tile_rows));
        };
        parallel_for(api, raw, tasks, body);
        finish_rows();
        return;
      }
      if (table_for(isa).lowbit_i8_prepare) table_for(isa).lowbit_i8_prepare(a, qperm);
    } else {
      a.A = padded_rows(Af, M, K, lda, abuf), a.lda = lda;
      if (table_for(isa).lowbit_f32_prepare) table_for(isa).lowbit_f32_prepare(a, fperm);
    }
    const KernelTable& kt = table_for(isa);
    auto fn_ptr = accuracy_level == 4 ? kt.lowbit_i8 : kt.lowbit_f32;
    const int64_t block = M <= 4 ? 32 : 16;
    const size_t tasks = static_cast<size_t>((N + block - 1) / block);
    auto body = [&](size_t t) {
      const int64_t n0 = static_cast<int64_t>(t) * block;
      const int64_t n1 = std::min(N, n0 + block);
      fn_ptr(a, n0, n1);
      epilogue(Y, ep, 0, M, n0, n1);
    };
    parallel_for(api, raw, tasks, body);
    finish_rows();
  }

  // The activations' zero-point term (accuracy_level 4: off, colsum; else null), the bias, then the activation,
  // over rows [m0, m1) and columns [n0, n1) of Y [M, N] that a task has just written.
  struct Epilogue {
    const float* bias;
    const float* off;     // accuracy_level 4: a_scale * a_zero per row (else null) ...
    const float* colsum;  // ... and the weight's column sums
    float* const* outs;   // split: the outputs (else null: Y is the output)
    const float* skip;    // whole-row epilogue, after the activation: + skip [M, N], then LayerNorm with
    const float* gamma;   // ln_scale [N] (null: none) ...
    const float* beta;    // ... and ln_bias [N] (null: 0)
  };
  void epilogue(float* Y, const Epilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) const {
    if (e.off) sub_zero_term(Y, N, e.off, e.colsum, m0, m1, n0, n1);
    if (e.bias) add_bias(Y, N, e.bias, m0, m1, n0, n1);
    if (gelu) gelu_rows(isa, Y, N, m0, m1, n0, n1);
    if (e.outs) {  // columns [n0, n1) to the outputs they belong to
      int64_t c0 = 0;
      for (size_t i = 0; i < split.size(); c0 += split[i], ++i) {
        const int64_t lo = std::max(n0, c0), hi = std::min(n1, c0 + split[i]);
        if (lo >= hi) continue;
        for (int64_t m = m0; m < m1; ++m)
          std::memcpy(e.outs[i] + m * split[i] + (lo - c0), Y + m * N + lo, static_cast<size_t>(hi - lo) * 4);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return as_status(Ort::GetApi(), [&] { Compute(ctx); });
  }
};

struct LowBitOp : Ort::CustomOpBase<LowBitOp, LowBitKernel, true> {
  Isa isa;
  explicit LowBitOp(Isa i) : isa(i) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return as_status(api, [&] { *kernel = new LowBitKernel(api, info, isa); });
  }
  const char* GetName() const { return "MatMulLowBit"; }
  // A, B_packed, scales, zero_points (optional), bias, skip, ln_scale, ln_bias (optional)
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 1 || i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // Y, or with the split attribute one output per part (the optional ones after the first)
  size_t GetOutputTypeCount() const { return LowBitKernel::kMaxSplit; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i >= 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// MatMulSparse24

// Batches of at least this many rows with uint8 activations take the pre-packed GEMM path on AVX-512
// (kernels_avx512_sparse.cc: 8 activation rows per register block; smaller batches, weight-bandwidth bound, keep
// the unpacked kernel); kSparseTasks: about as many tasks of that path per call (whole register blocks of weight
// rows each; enough that 2-8 threads get even shares of a layer as small as MiniLM's N = 384).
constexpr int64_t kSparsePackedMinRows = 8;
constexpr int64_t kSparseTasks = 16;

struct Sparse24Kernel {
  int64_t K, N;
  Isa isa;
  bool prepack = false;  // values and indices are constant initializers, AVX-512 (see kSparsePackedMinRows)
  PackOnce<PackedSparse24> packed;

  Sparse24Kernel(const OrtApi& api, const OrtKernelInfo* info, Isa isa_) : isa(isa_) {
    K = attr_int(api, info, "K", true, 0);
    N = attr_int(api, info, "N", true, 0);
    if (K < 4 || N < 1 || K % 4)
      throw Error("MatMulSparse24: K must be a positive multiple of 4 and N positive, got K=" + std::to_string(K) +
                  ", N=" + std::to_string(N));
    prepack = isa == Isa::kAvx512 && packed_sparse24_avx512() && !prepack_disabled() && constant_input(api, info, 1) &&
              constant_input(api, info, 2);
  }

  void Compute(OrtKernelContext* raw) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext ctx(raw);
    TensorIn A = get_input(ctx, 0), V = get_input(ctx, 1), I = get_input(ctx, 2), WS = get_input(ctx, 3),
             AS = get_input(ctx, 4), AZ = get_input(ctx, 5);
    const int64_t irb = (K + 7) / 8;
    expect(!A.shape.empty() && A.shape.back() == K,
           "MatMulSparse24: A must be [..., " + std::to_string(K) + "], got " + shape_str(A.shape));
    expect(V.shape == std::vector<int64_t>{N, K / 2}, "MatMulSparse24: values must be [" + std::to_string(N) + ", " +
                                                          std::to_string(K / 2) + "], got " + shape_str(V.shape));
    expect(I.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && I.shape == std::vector<int64_t>{N, irb},
           "MatMulSparse24: indices must be uint8 [" + std::to_string(N) + ", " + std::to_string(irb) + "], got " +
               shape_str(I.shape));
    Sparse24Args a;
    a.K = K, a.N = N, a.indices = static_cast<const uint8_t*>(I.data), a.index_row_bytes = irb;
    a.values = V.data;
    if (V.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
      a.int8_values = true;
      expect(WS.data && WS.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && WS.size() == N,
             "MatMulSparse24: int8 values need w_scale float32 [" + std::to_string(N) + "]");
      a.w_scale = static_cast<const float*>(WS.data);
    } else {
      expect(V.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "MatMulSparse24: values must be float32 or int8");
      expect(!WS.data, "MatMulSparse24: w_scale is only an input of the int8 variant");
    }
    const bool u8 = A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (u8) {
      expect(a.int8_values, "MatMulSparse24: uint8 activations need int8 values");
      expect(AS.data && AS.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && AS.size() == 1,
             "MatMulSparse24: uint8 activations need a_scale (float32 scalar)");
      a.a_scale = *static_cast<const float*>(AS.data);
      if (AZ.data) {
        expect(AZ.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && AZ.size() == 1,
               "MatMulSparse24: a_zero_point must be a uint8 scalar");
        a.a_zero_point = *static_cast<const uint8_t*>(AZ.data);
      }
    } else {
      expect(A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "MatMulSparse24: A must be float32 or uint8");
      expect(!AS.data && !AZ.data, "MatMulSparse24: a_scale / a_zero_point apply to uint8 activations only");
    }
    std::vector<int64_t> yshape = A.shape;
    yshape.back() = N;
    const int64_t M = A.size() / K;
    a.M = M;
    Ort::UnownedValue Yv = ctx.GetOutput(0, yshape);
    a.Y = Yv.GetTensorMutableData<float>();
    if (M == 0) return;
    const PackedSparse24* pk = nullptr;
    if (u8 && prepack && M >= kSparsePackedMinRows)
      pk = packed.get({a.values, a.indices, nullptr},
                      [&](PackedSparse24& p) { return packed_sparse24_avx512()->pack(a, p); });
    // the unpacked kernels read rows padded to 128 values; the pre-packed GEMM reads K rounded up to 16 bytes
    const int64_t lda = pk && K % 16 == 0 ? K : round_up(K, 128);
    a.lda = lda;
    std::vector<float> fbuf;
    std::vector<uint8_t> ubuf;
    if (u8)
      a.A_u8 = lda == K ? static_cast<const uint8_t*>(A.data)
                        : padded_rows(static_cast<const uint8_t*>(A.data), M, K, lda, ubuf);
    else
      a.A = padded_rows(static_cast<const float*>(A.data), M, K, lda, fbuf);
    if (pk) {
      const PackedSparse24Kernels& pkk = *packed_sparse24_avx512();
      const int64_t per = round_up((N + kSparseTasks - 1) / kSparseTasks, pkk.row_block);
      auto body = [&](size_t t) {
        const int64_t n0 = static_cast<int64_t>(t) * per;
        pkk.run(a, *pk, n0, std::min(N, n0 + per));
      };
      parallel_for(api, raw, static_cast<size_t>((N + per - 1) / per), body);
      return;
    }
    const KernelTable& kt = table_for(isa);
    auto fn_ptr = u8 ? kt.sparse24_u8 : kt.sparse24_f32;
    const int64_t block = 16;
    const size_t tasks = static_cast<size_t>((N + block - 1) / block);
    auto body = [&](size_t t) {
      const int64_t n0 = static_cast<int64_t>(t) * block;
      fn_ptr(a, n0, std::min(N, n0 + block));
    };
    parallel_for(api, raw, tasks, body);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return as_status(Ort::GetApi(), [&] { Compute(ctx); });
  }
};

struct Sparse24Op : Ort::CustomOpBase<Sparse24Op, Sparse24Kernel, true> {
  Isa isa;
  explicit Sparse24Op(Isa i) : isa(i) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return as_status(api, [&] { *kernel = new Sparse24Kernel(api, info, isa); });
  }
  const char* GetName() const { return "MatMulSparse24"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 2:
      case 5:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 3:
      case 4:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default:  // A: float32 or uint8; values: float32 or int8
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Op objects must outlive every session that uses them: keep them for the life of the process.
std::vector<std::unique_ptr<Ort::CustomOpDomain>> g_domains;
std::vector<std::unique_ptr<LowBitOp>> g_lowbit_ops;
std::vector<std::unique_ptr<Sparse24Op>> g_sparse_ops;

}  // namespace
}  // namespace edgekit

extern "C" {

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  using namespace edgekit;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {  // this ONNX Runtime predates the headers: report it through the version-1 API
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "libedgekit_ort needs ONNX Runtime >= the version of its headers (ORT_API_VERSION)")
              : nullptr;
  }
  Ort::InitApi(api);
  try {
    Isa isa = detect_isa();
    if (const char* want = std::getenv("EDGEKIT_ORT_ISA"); want && *want) {
      const std::string w(want);
      Isa forced;
      if (w == "scalar")
        forced = Isa::kScalar;
      else if (w == "avx2")
        forced = Isa::kAvx2;
      else if (w == "avx512")
        forced = Isa::kAvx512;
      else
        throw Error("EDGEKIT_ORT_ISA=" + w + " is not one of scalar, avx2, avx512");
      if (static_cast<int>(forced) > static_cast<int>(isa))
        throw Error("EDGEKIT_ORT_ISA=" + w + " but this CPU (or build) supports at most " + isa_name(isa));
      isa = forced;
    }
    std::lock_guard<std::mutex> lock(g_mu);
    g_isa = isa;
    g_lowbit_ops.push_back(std::make_unique<LowBitOp>(isa));
    g_sparse_ops.push_back(std::make_unique<Sparse24Op>(isa));
    auto domain = std::make_unique<Ort::CustomOpDomain>("ai.edgekit");
    domain->Add(g_lowbit_ops.back().get());
    domain->Add(g_sparse_ops.back().get());
    add_qconv_ops(*domain, isa);
    Ort::UnownedSessionOptions(options).Add(*domain);
    g_domains.push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// The kernel path of the latest registration ("scalar", "avx2", "avx512"), for diagnostics and tests.
__attribute__((visibility("default"))) const char* edgekit_ort_isa(void) { return edgekit::isa_name(edgekit::g_isa); }

// The best path this CPU and build support, whatever EDGEKIT_ORT_ISA says.
__attribute__((visibility("default"))) const char* edgekit_ort_best_isa(void) {
  return edgekit::isa_name(edgekit::detect_isa());
}

// Benchmark helper (benchmarks/kernels.py measures memory read bandwidth with it): read [p, p + bytes) once
// on `threads` threads (each a contiguous slice) with the widest loads available; returns a checksum.
__attribute__((visibility("default"))) uint64_t edgekit_stream_read(const uint8_t* p, size_t bytes, int threads) {
  using namespace edgekit;
  const bool wide = detect_isa() == Isa::kAvx512;
  threads = std::max(1, threads);
  const size_t slice = bytes / threads / 256 * 256;
  std::vector<uint64_t> sums(threads, 0);
  auto work = [&](int t) {
    const uint8_t* q = p + t * slice;
    if (wide) {
      sums[t] = stream_read_avx512(q, slice);
    } else {
      uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (size_t i = 0; i + 32 <= slice; i += 32) {
        uint64_t v[4];
        std::memcpy(v, q + i, 32);
        a0 |= v[0], a1 |= v[1], a2 |= v[2], a3 |= v[3];
      }
      sums[t] = a0 | a1 | a2 | a3;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  uint64_t r = 0;
  for (uint64_t s : sums) r |= s;
  return r;
}

}  // extern "C"
