// ai.edgekit::AttentionInt8 on CUDA (head dim 64): O = softmax(sm_scale * S) @ V with INT8 Q.K^T.
//
// Inputs (edgekit/kernels/attention.py is the specification and numpy reference; its `quantize` prepares them):
//   Q8      int8  [BH, S, 64]    smoothed (Q minus its mean over the sequence) and quantized, symmetric
//   q_scale fp32  [BH, ceil(S / q_block)]    one scale per block of q_block queries (q_block = 1: per token)
//   K8      int8  [BH, Skv, 64]  smoothed (K minus its mean over the sequence) and quantized
//   k_scale fp32  [BH, ceil(Skv / k_block)]
//   k_bias  fp32  [BH, Skv] or null: mean(Q) . K_smoothed[j], the exact correction for smoothing Q
//   V       fp16  [BH, Skv, 64]
//   O       fp16  [BH, S, 64]
// S_ij = dot(Q8_i, K8_j) (exact int32, dp4a) * q_scale * k_scale + k_bias_j; softmax over j in fp32 (online,
// base-2 with sm_scale * log2(e) folded in); P rounded to fp16, P @ V accumulated in fp32, divided by the fp32 row
// sum at the end.
//
// CUDA cores only (dp4a exists from sm_61), so the same code runs on sm_72/87 and sm_80+; correctness first, no
// tensor cores. A block of 128 threads owns 32 queries of one (batch, head): 4 lanes per query, each lane 16 of
// the 64 dimensions (partial Q.K dots summed with two shuffles). Keys and values stream through shared memory in
// tiles of 64.
//
// Compile: nvcc -O3 -arch=sm_XX (build.py). -DEDGEKIT_NO_HOST leaves only the kernel (no includes), for NVRTC.

#ifndef EDGEKIT_NO_HOST
#include <cuda_runtime.h>
#endif

namespace edgekit_attn {

using u32 = unsigned int;
using i64 = long long;

constexpr int kD = 64;
constexpr int kQueries = 32;           // queries per block
constexpr int kThreads = 4 * kQueries;  // 128
constexpr int kTile = 64;              // keys per shared-memory tile

__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#include "fp16.cuh"

__global__ void __launch_bounds__(kThreads)
    attention_int8_d64(const signed char* __restrict__ Q8, const float* __restrict__ q_scale,
                       const signed char* __restrict__ K8, const float* __restrict__ k_scale,
                       const float* __restrict__ k_bias, const unsigned short* __restrict__ V,
                       unsigned short* __restrict__ O, int S, int Skv, int q_block, int k_block, float sm_scale) {
  __shared__ __align__(16) u32 k_tile[kTile][kD / 4];            // 4 KB: int8 keys, 4 per word
  __shared__ __align__(16) unsigned short v_tile[kTile][kD];     // 8 KB
  __shared__ float kmul[kTile];                                   // k_scale * sm_scale * log2(e) per key
  __shared__ float kadd[kTile];                                   // k_bias * sm_scale * log2(e), -inf past Skv

  const int bh = blockIdx.y;
  const int tid = threadIdx.x;
  const int sub = tid & 3;         // which 16 dimensions
  const int qi = blockIdx.x * kQueries + (tid >> 2);
  const bool valid = qi < S;
  const float log2e = 1.4426950408889634f;
  const int nq_blocks = (S + q_block - 1) / q_block;
  const int nk_blocks = (Skv + k_block - 1) / k_block;

  u32 q[4] = {0u, 0u, 0u, 0u};
  float qs = 0.f;
  if (valid) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(Q8 + (static_cast<i64>(bh) * S + qi) * kD + 16 * sub));
    q[0] = v.x;
    q[1] = v.y;
    q[2] = v.z;
    q[3] = v.w;
    qs = __ldg(q_scale + static_cast<i64>(bh) * nq_blocks + qi / q_block);
  }

  float acc[16];
#pragma unroll
  for (int d = 0; d < 16; ++d) acc[d] = 0.f;
  float m_run = -1e30f;  // running max (finite, so that the first rescale is exp2(-huge) = 0, never NaN)
  float l_run = 0.f;

  const signed char* kbase = K8 + static_cast<i64>(bh) * Skv * kD;
  const unsigned short* vbase = V + static_cast<i64>(bh) * Skv * kD;
  for (int j0 = 0; j0 < Skv; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    for (int c = tid; c < kTile * kD / 16; c += kThreads) {  // K: 256 chunks of 16 bytes
      const int j = c / (kD / 16);
      const int part = c % (kD / 16);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (j0 + j < Skv) v = __ldg(reinterpret_cast<const uint4*>(kbase + static_cast<i64>(j0 + j) * kD + 16 * part));
      reinterpret_cast<uint4*>(&k_tile[j][0])[part] = v;
    }
    for (int c = tid; c < kTile * kD / 8; c += kThreads) {  // V: 512 chunks of 8 halves
      const int j = c / (kD / 8);
      const int part = c % (kD / 8);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (j0 + j < Skv) v = __ldg(reinterpret_cast<const uint4*>(vbase + static_cast<i64>(j0 + j) * kD + 8 * part));
      reinterpret_cast<uint4*>(&v_tile[j][0])[part] = v;
    }
    if (tid < kTile) {
      const int j = j0 + tid;
      if (j < Skv) {
        kmul[tid] = __ldg(k_scale + static_cast<i64>(bh) * nk_blocks + j / k_block) * sm_scale * log2e;
        kadd[tid] = k_bias ? __ldg(k_bias + static_cast<i64>(bh) * Skv + j) * sm_scale * log2e : 0.f;
      } else {
        kmul[tid] = 0.f;
        kadd[tid] = __int_as_float(0xff800000);  // -inf
      }
    }
    __syncthreads();

    float s[kTile];
    float m_tile = -1e30f;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const uint4 kw = *reinterpret_cast<const uint4*>(&k_tile[j][4 * sub]);
      int d = dp4a(q[0], kw.x, 0);
      d = dp4a(q[1], kw.y, d);
      d = dp4a(q[2], kw.z, d);
      d = dp4a(q[3], kw.w, d);
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      s[j] = static_cast<float>(d) * qs * kmul[j] + kadd[j];  // log2 domain
      m_tile = fmaxf(m_tile, s[j]);
    }
    const float m_new = fmaxf(m_run, m_tile);
    const float corr = ex2(m_run - m_new);
    l_run *= corr;
#pragma unroll
    for (int d = 0; d < 16; ++d) acc[d] *= corr;
    m_run = m_new;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float p = ex2(s[j] - m_new);
      l_run += p;
      const float ph = h2f(f2h(p));  // P in fp16, as the tensor-core P.V of the specification
      const uint4 v0 = *reinterpret_cast<const uint4*>(&v_tile[j][16 * sub]);
      const uint4 v1 = *reinterpret_cast<const uint4*>(&v_tile[j][16 * sub + 8]);
      const u32 w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[2 * i] = fmaf(ph, h2f(static_cast<unsigned short>(w[i] & 0xFFFFu)), acc[2 * i]);
        acc[2 * i + 1] = fmaf(ph, h2f(static_cast<unsigned short>(w[i] >> 16)), acc[2 * i + 1]);
      }
    }
  }

  if (valid) {
    const float inv = 1.f / l_run;
    u32 out[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      out[i] = static_cast<u32>(f2h(acc[2 * i] * inv)) | (static_cast<u32>(f2h(acc[2 * i + 1] * inv)) << 16);
    uint4* dst = reinterpret_cast<uint4*>(O + (static_cast<i64>(bh) * S + qi) * kD + 16 * sub);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

}  // namespace edgekit_attn

#ifndef EDGEKIT_NO_HOST

// O = AttentionInt8(Q8, K8, V) for BH = batch * heads independent (batch, head) pairs, head dim 64. Device
// pointers (16-byte aligned), `stream` a cudaStream_t or null. k_bias may be null. Returns a cudaError_t value.
extern "C" int edgekit_attention_int8_d64(const void* Q8, const float* q_scale, const void* K8, const float* k_scale,
                                          const float* k_bias, const void* V, void* O, int BH, int S, int Skv,
                                          int q_block, int k_block, float sm_scale, void* stream) {
  using namespace edgekit_attn;
  if (BH <= 0 || S <= 0 || Skv <= 0 || q_block <= 0 || k_block <= 0 || BH > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  for (const void* p : {Q8, K8, V, static_cast<const void*>(O)})
    if (reinterpret_cast<unsigned long long>(p) & 15ull) return static_cast<int>(cudaErrorMisalignedAddress);
  const dim3 grid((S + kQueries - 1) / kQueries, BH);
  attention_int8_d64<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const signed char*>(Q8), q_scale, static_cast<const signed char*>(K8), k_scale, k_bias,
      static_cast<const unsigned short*>(V), static_cast<unsigned short*>(O), S, Skv, q_block, k_block, sm_scale);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* edgekit_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

#endif  // EDGEKIT_NO_HOST
