// enqueue of the TensorRT-free plugin core (edgekit_trt_core.h): type conversions, AttentionInt8's on-GPU
// smoothing and quantization (edgekit/kernels/attention.py `quantize`), then the extern "C" launchers of
// edgekit/kernels/cuda/{matmul_lowbit,matmul_sparse24,attention_int8}.cu, all on TensorRT's stream.
//
// Link with those three sources. Each of them defines `edgekit_cuda_error_string`; compile them with
// -Dedgekit_cuda_error_string=edgekit_cuda_error_string_<name> (CMakeLists.txt does) so one library can hold all.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "edgekit_trt_core.h"

extern "C" int edgekit_matmul_lowbit_f32(const float* A, const void* B_packed, const float* scales,
                                         const void* zero_points, float* Y, int M, int N, int K, int bits,
                                         int group_size, void* stream);
extern "C" int edgekit_matmul_sparse24_f16(const void* X, const void* values, const void* indices, void* Y, int M,
                                           int N, int K, void* stream);
extern "C" int edgekit_attention_int8_d64(const void* Q8, const float* q_scale, const void* K8, const float* k_scale,
                                          const float* k_bias, const void* V, void* O, int BH, int S, int Skv,
                                          int q_block, int k_block, float sm_scale, void* stream);

namespace edgekit_trt {
namespace {

using i64 = long long;
constexpr int kD = AttentionInt8Core::kHeadDim;
constexpr int kInvalid = -1;

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, i64 i) { return __half2float(p[i]); }

__global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, i64 n) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n; i += static_cast<i64>(gridDim.x) * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

__global__ void f16_to_f32(const __half* __restrict__ x, float* __restrict__ y, i64 n) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n; i += static_cast<i64>(gridDim.x) * blockDim.x)
    y[i] = __half2float(x[i]);
}

int cast_grid(i64 n) {
  const i64 blocks = (n + 255) / 256;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// mean[bh, d] = mean over the L rows of x[bh, :, d] (one block of 64 threads per (batch, head); fp64 sums).
template <typename T>
__global__ void seq_mean(const T* __restrict__ x, float* __restrict__ mean, int L) {
  const i64 bh = blockIdx.x;
  const int d = threadIdx.x;
  double s = 0.0;
  for (int j = 0; j < L; ++j) s += ld(x, (bh * L + j) * kD + d);
  mean[bh * kD + d] = static_cast<float>(s / L);
}

// k_bias[bh, j] = mean(Q)[bh] . (K[bh, j] - mean(K)[bh]): the exact correction for smoothing Q.
template <typename T>
__global__ void key_bias(const T* __restrict__ k, const float* __restrict__ k_mean, const float* __restrict__ q_mean,
                         float* __restrict__ k_bias, int Skv) {
  const i64 bh = blockIdx.y;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= Skv) return;
  double s = 0.0;
  for (int d = 0; d < kD; ++d)
    s += static_cast<double>(q_mean[bh * kD + d]) * (ld(k, (bh * Skv + j) * kD + d) - k_mean[bh * kD + d]);
  k_bias[bh * Skv + j] = static_cast<float>(s);
}

// Symmetric int8 over blocks of `block` rows of x[bh] (minus `mean[bh]` when given): one thread block per
// (row block, bh). scale = max|x| / 127 (1 for an all-zero block), q = clip(rint(x / scale), -127, 127).
template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, const float* __restrict__ mean, int L, int block,
                              signed char* __restrict__ q, float* __restrict__ scale) {
  __shared__ float red[256];
  const i64 bh = blockIdx.y;
  const int b = blockIdx.x;
  const int nblocks = gridDim.x;
  const int r0 = b * block;
  const int rows = min(L, r0 + block) - r0;
  const i64 base = (bh * L + r0) * kD;
  const int n = rows * kD;
  float m = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = ld(x, base + i) - (mean ? mean[bh * kD + (i % kD)] : 0.f);
    m = fmaxf(m, fabsf(v));
  }
  red[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  float sc = red[0] / 127.f;
  if (!(sc > 0.f)) sc = 1.f;
  if (threadIdx.x == 0) scale[bh * nblocks + b] = sc;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = ld(x, base + i) - (mean ? mean[bh * kD + (i % kD)] : 0.f);
    q[base + i] = static_cast<signed char>(fminf(fmaxf(rintf(v / sc), -127.f), 127.f));
  }
}

template <typename T>
int attention_prepare(const AttentionInt8Core& op, const T* Q, const T* K, int BH, int S, int Skv,
                      const AttentionLayout& L, char* ws, cudaStream_t st) {
  float* q_mean = reinterpret_cast<float*>(ws + L.q_mean);
  float* k_mean = reinterpret_cast<float*>(ws + L.k_mean);
  float* k_bias = reinterpret_cast<float*>(ws + L.k_bias);
  seq_mean<T><<<BH, kD, 0, st>>>(K, k_mean, Skv);
  if (op.smooth_q) {
    seq_mean<T><<<BH, kD, 0, st>>>(Q, q_mean, S);
    key_bias<T><<<dim3((Skv + 127) / 128, BH), 128, 0, st>>>(K, k_mean, q_mean, k_bias, Skv);
  }
  const int nq = (S + op.q_block - 1) / op.q_block, nk = (Skv + op.k_block - 1) / op.k_block;
  quantize_rows<T><<<dim3(nq, BH), 256, 0, st>>>(Q, op.smooth_q ? q_mean : nullptr, S, op.q_block,
                                                 reinterpret_cast<signed char*>(ws + L.q8),
                                                 reinterpret_cast<float*>(ws + L.q_scale));
  quantize_rows<T><<<dim3(nk, BH), 256, 0, st>>>(K, k_mean, Skv, op.k_block,
                                                 reinterpret_cast<signed char*>(ws + L.k8),
                                                 reinterpret_cast<float*>(ws + L.k_scale));
  return static_cast<int>(cudaGetLastError());
}

bool rows_of(const TensorDesc& a, int32_t k, int& m) {
  const int64_t v = volume(a.dims);
  if (v < 0 || k <= 0 || v % k) return false;
  if (v / k > INT_MAX) return false;
  m = static_cast<int>(v / k);
  return true;
}

}  // namespace

int32_t MatMulLowBitCore::enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out,
                                  const void* const* inputs, void* const* outputs, void* workspace,
                                  void* stream) const {
  int M = 0;
  if (!validate().empty() || !check_nb_inputs(nb_inputs).empty() || !rows_of(in[0], K, M)) return kInvalid;
  auto st = static_cast<cudaStream_t>(stream);
  const float* A = static_cast<const float*>(inputs[0]);
  float* Y = static_cast<float*>(outputs[0]);
  const bool half = in[0].type == DType::kHALF;
  if (half) {
    if (workspace == nullptr) return kInvalid;
    auto* a32 = static_cast<float*>(workspace);
    Y = reinterpret_cast<float*>(static_cast<char*>(workspace) + align_up(static_cast<size_t>(M) * K * 4));
    const i64 n = static_cast<i64>(M) * K;
    f16_to_f32<<<cast_grid(n), 256, 0, st>>>(static_cast<const __half*>(inputs[0]), a32, n);
    A = a32;
  }
  const void* zp = nb_inputs == 4 ? inputs[3] : nullptr;
  int rc = edgekit_matmul_lowbit_f32(A, inputs[1], static_cast<const float*>(inputs[2]), zp, Y, M, N, K, bits,
                                     group_size, stream);
  if (rc == 0 && half && out[0].type == DType::kHALF) {
    const i64 n = static_cast<i64>(M) * N;
    f32_to_f16<<<cast_grid(n), 256, 0, st>>>(Y, static_cast<__half*>(outputs[0]), n);
    rc = static_cast<int>(cudaGetLastError());
  }
  return rc;
}

int32_t MatMulSparse24Core::enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out,
                                    const void* const* inputs, void* const* outputs, void* workspace,
                                    void* stream) const {
  int M = 0;
  if (!validate().empty() || !check_nb_inputs(nb_inputs).empty() || !rows_of(in[0], K, M)) return kInvalid;
  auto st = static_cast<cudaStream_t>(stream);
  const void* X = inputs[0];
  void* Y = outputs[0];
  const bool f32 = in[0].type == DType::kFLOAT;
  if (f32) {
    if (workspace == nullptr) return kInvalid;
    auto* x16 = static_cast<__half*>(workspace);
    Y = static_cast<char*>(workspace) + align_up(static_cast<size_t>(M) * K * 2);
    const i64 n = static_cast<i64>(M) * K;
    f32_to_f16<<<cast_grid(n), 256, 0, st>>>(static_cast<const float*>(inputs[0]), x16, n);
    X = x16;
  }
  int rc = edgekit_matmul_sparse24_f16(X, inputs[1], inputs[2], Y, M, N, K, stream);
  if (rc == 0 && f32 && out[0].type == DType::kFLOAT) {
    const i64 n = static_cast<i64>(M) * N;
    f16_to_f32<<<cast_grid(n), 256, 0, st>>>(static_cast<const __half*>(Y), static_cast<float*>(outputs[0]), n);
    rc = static_cast<int>(cudaGetLastError());
  }
  return rc;
}

int32_t AttentionInt8Core::enqueue(const TensorDesc* in, int32_t nb_inputs, const TensorDesc* out,
                                   const void* const* inputs, void* const* outputs, void* workspace,
                                   void* stream) const {
  if (!validate().empty() || !check_nb_inputs(nb_inputs).empty() || workspace == nullptr) return kInvalid;
  Dims o;
  Dims dims[3] = {in[0].dims, in[1].dims, in[2].dims};
  if (!infer_output_shape(dims, 3, o).empty() || volume(o) < 0 || volume(in[1].dims) < 0) return kInvalid;
  const i64 bh64 = in[0].dims.d[0] * in[0].dims.d[1];
  if (bh64 <= 0 || bh64 > 65535 || in[0].dims.d[2] > INT_MAX || in[1].dims.d[2] > INT_MAX) return kInvalid;
  const int BH = static_cast<int>(bh64), S = static_cast<int>(in[0].dims.d[2]), Skv = static_cast<int>(in[1].dims.d[2]);
  const bool f32 = in[0].type == DType::kFLOAT;
  const AttentionLayout L = attention_layout(BH, S, Skv, q_block, k_block, f32, f32);
  char* ws = static_cast<char*>(workspace);
  auto st = static_cast<cudaStream_t>(stream);
  int rc = f32 ? attention_prepare(*this, static_cast<const float*>(inputs[0]), static_cast<const float*>(inputs[1]),
                                   BH, S, Skv, L, ws, st)
               : attention_prepare(*this, static_cast<const __half*>(inputs[0]),
                                   static_cast<const __half*>(inputs[1]), BH, S, Skv, L, ws, st);
  if (rc != 0) return rc;
  const void* V = inputs[2];
  void* O = outputs[0];
  const i64 nv = bh64 * Skv * kD, no = bh64 * S * kD;
  if (f32) {
    f32_to_f16<<<cast_grid(nv), 256, 0, st>>>(static_cast<const float*>(inputs[2]),
                                              reinterpret_cast<__half*>(ws + L.v16), nv);
    V = ws + L.v16;
    O = ws + L.o16;
  }
  rc = edgekit_attention_int8_d64(ws + L.q8, reinterpret_cast<const float*>(ws + L.q_scale), ws + L.k8,
                                  reinterpret_cast<const float*>(ws + L.k_scale),
                                  smooth_q ? reinterpret_cast<const float*>(ws + L.k_bias) : nullptr, V, O, BH, S, Skv,
                                  q_block, k_block, effective_sm_scale(), stream);
  if (rc == 0 && f32 && out[0].type == DType::kFLOAT) {
    f16_to_f32<<<cast_grid(no), 256, 0, st>>>(reinterpret_cast<const __half*>(O), static_cast<float*>(outputs[0]), no);
    rc = static_cast<int>(cudaGetLastError());
  }
  return rc;
}

}  // namespace edgekit_trt
