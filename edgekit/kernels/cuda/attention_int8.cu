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
// Two kernels, same inputs and outputs:
//
// attention_int8_d64 (the "old" path, any sm_61+): CUDA cores only (dp4a + fp32 FMAs), so the same code runs on
// sm_72/87 and sm_80+. A block of 128 threads owns 32 queries of one (batch, head): 4 lanes per query, each lane 16
// of the 64 dimensions (partial Q.K dots summed with two shuffles). Keys and values stream through shared memory
// in tiles of 64.
//
// attention_int8_d64_mma (the "mma" path, sm_80+; an empty body below sm_80, never launched there), FlashAttention-2
// style on tensor cores. A block of 4 warps owns 64 queries of one (batch, head), one 16-row slice per warp; K / V
// tiles of 64 keys stream through two shared-memory buffers filled by cp.async (tile i + 1 in flight while tile i
// is computed). Per warp and tile:
//   S = Q.K^T   mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, 8 key blocks x 2 k-steps, exact int32. Q stays in
//               registers for the whole kernel. The 64 dimensions are permuted identically for Q and K (a dot
//               product does not care): lane (g, t) loads the 16 contiguous bytes 16t .. 16t + 15 of its rows, word
//               j of them is k-step j >> 1, fragment column 4t + 16 (j & 1) + {0..3}, so every operand load is one
//               16-byte vector (conflict-free on the unpadded 64-byte K rows).
//   softmax     S dequantized in fp32 exactly as the reference (int32 * q_scale * k_scale + k_bias, with
//               sm_scale * log2(e) folded in), keys past Skv set to -inf; online max / sum per row in fp32
//               registers (each row's 4 lanes combine maxima with two shuffles; sums stay per lane until the end).
//   O += P.V    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: P rounded to fp16 (cvt.rn.f16x2.f32) straight
//               from the S accumulator registers (the m16n8 C layout of key blocks 2kk, 2kk + 1 is the m16n8k16 A
//               layout), V fragments with ldmatrix.x4.trans from V rows padded to 144 bytes (conflict-free).
// Fragment layouts: PTX ISA "Matrix Fragments for mma.m16n8k32" (integer) and "... mma.m16n8k16 with floating point
// type", ldmatrix (.trans); numpy models in edgekit/kernels/cuda/mma_layout.py, and tests/test_attention_mma_layout.py
// runs this kernel's index math through them against attention.reference_quantized.
// Path selection: edgekit_attention_int8_set_path / $EDGEKIT_ATTN_PATH (auto | old | mma); auto and mma take the
// tensor-core kernel wherever it can run (sm_80+ device and an sm_80+ build), edgekit_attention_int8_last_path says
// which ran.
//
// Compile: nvcc -O3 -arch=sm_XX (build.py). -DEDGEKIT_NO_HOST leaves only the kernel (no includes), for NVRTC.

#ifndef EDGEKIT_NO_HOST
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "kernel_path.cuh"
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


// ---------------------------------------------------------------------------------------------------------------
// Tensor-core path (sm_80+). Fragment layouts (g = lane >> 2, t = lane % 4):
//   s8 m16n8k32  A (16 x 32, row): 4 .b32 registers of 4 bytes; register r holds row g + 8 (r & 1), columns
//                4t + 16 (r >> 1) + {0..3} (low byte first). B (32 x 8, col): 2 .b32; register r holds k
//                4t + 16r + {0..3} of column g. C / D: 4 .s32, row g + 8 (i >> 1), column 2t + (i & 1).
//   f16 m16n8k16 A: 4 .f16x2, register r row g + 8 (r & 1), columns 2t + 8 (r >> 1) + {0,1}; B: 2 .f16x2, register
//                r k 2t + 8r + {0,1} of column g; C / D: 4 .f32 as for s8.
//   ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane l gives the address of row l % 8 of matrix l / 8 (16
//                bytes); register i of lane l holds elements (2 (l % 4) + {0,1}, l / 4) (row, column) of matrix i.

namespace mma {

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;      // queries per block
constexpr int kThreads = 32 * kWarps;   // 128
constexpr int kBN = 64;                 // keys per tile
constexpr int kKS = kD;                 // bytes per key row of the int8 K tile (64: 16-byte loads are conflict-free)
constexpr int kVS = kD + 8;             // halves per key row of the fp16 V tile (144 bytes: ldmatrix conflict-free)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ u32 f16x2(float lo, float hi) {
  u32 d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// 16 (or 4) bytes global -> shared, asynchronously; zeros when !valid (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const u32 d = static_cast<u32>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const u32 d = static_cast<u32>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(d[0]), "r"(d[1]), "r"(d[2]), "r"(d[3]));
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3]));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* row) {
  const u32 a = static_cast<u32>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
#endif

}  // namespace mma

__global__ void __launch_bounds__(mma::kThreads)
    attention_int8_d64_mma(const signed char* __restrict__ Q8, const float* __restrict__ q_scale,
                           const signed char* __restrict__ K8, const float* __restrict__ k_scale,
                           const float* __restrict__ k_bias, const unsigned short* __restrict__ V,
                           unsigned short* __restrict__ O, int S, int Skv, int q_block, int k_block, float sm_scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace mma;
  __shared__ __align__(16) signed char k_s[2][kBN * kKS];       // 8 KB
  __shared__ __align__(16) unsigned short v_s[2][kBN * kVS];    // 18 KB
  __shared__ __align__(16) float ks_s[2][kBN];                  // k_scale of each key
  __shared__ __align__(16) float kb_s[2][kBN];                  // k_bias of each key (0 without k_bias)

  const int bh = blockIdx.y;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int q0 = blockIdx.x * kRows + 16 * warp;  // first query row of this warp's slice
  const float c = sm_scale * 1.4426950408889634f;  // sm_scale * log2(e)
  const int nq_blocks = (S + q_block - 1) / q_block;
  const int nk_blocks = (Skv + k_block - 1) / k_block;
  const signed char* kbase = K8 + static_cast<i64>(bh) * Skv * kD;
  const unsigned short* vbase = V + static_cast<i64>(bh) * Skv * kD;
  const float* ksbase = k_scale + static_cast<i64>(bh) * nk_blocks;
  const float* kbbase = k_bias ? k_bias + static_cast<i64>(bh) * Skv : nullptr;

  // cp.async of tile `tile` into buffer `buf`: K rows (4 x 16 bytes), V rows (8 x 16 bytes), one k_scale and one
  // k_bias per key; zero-filled past Skv (V zeros keep the masked keys' 0 * V finite).
  auto issue = [&](int tile, int buf) {
    const int j0 = tile * kBN;
    for (int i = tid; i < kBN * 4; i += mma::kThreads) {
      const int j = i >> 2, part = i & 3;
      const bool ok = j0 + j < Skv;
      cp_async16(&k_s[buf][j * kKS + 16 * part], kbase + static_cast<i64>(ok ? j0 + j : 0) * kD + 16 * part, ok);
    }
    for (int i = tid; i < kBN * 8; i += mma::kThreads) {
      const int j = i >> 3, part = i & 7;
      const bool ok = j0 + j < Skv;
      cp_async16(&v_s[buf][j * kVS + 8 * part], vbase + static_cast<i64>(ok ? j0 + j : 0) * kD + 8 * part, ok);
    }
    if (tid < kBN) {
      const int j = j0 + tid;
      const bool ok = j < Skv;
      cp_async4(&ks_s[buf][tid], ksbase + (ok ? j / k_block : 0), ok);
      cp_async4(&kb_s[buf][tid], kbbase ? kbbase + (ok ? j : 0) : ksbase, ok && kbbase != nullptr);
    }
  };

  const int tiles = (Skv + kBN - 1) / kBN;
  issue(0, 0);
  cp_async_commit();

  // Q fragments (registers for the whole kernel): rows g and g + 8 of the slice, bytes 16t .. 16t + 15 each.
  u32 qa[2][4];
  float qsc[2];  // q_scale * sm_scale * log2(e) of rows g, g + 8 (0 past S)
  {
    uint4 w[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = q0 + g + 8 * h;
      w[h] = make_uint4(0u, 0u, 0u, 0u);
      qsc[h] = 0.f;
      if (row < S) {
        w[h] = __ldg(reinterpret_cast<const uint4*>(Q8 + (static_cast<i64>(bh) * S + row) * kD + 16 * t));
        qsc[h] = __ldg(q_scale + static_cast<i64>(bh) * nq_blocks + row / q_block) * c;
      }
    }
    qa[0][0] = w[0].x; qa[0][1] = w[1].x; qa[0][2] = w[0].y; qa[0][3] = w[1].y;  // k-step 0: words 0, 1
    qa[1][0] = w[0].z; qa[1][1] = w[1].z; qa[1][2] = w[0].w; qa[1][3] = w[1].w;  // k-step 1: words 2, 3
  }

  float o[8][4];  // O accumulators: dims 8 dn + 2t + (i & 1) of rows g + 8 (i >> 1)
#pragma unroll
  for (int dn = 0; dn < 8; ++dn)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[dn][i] = 0.f;
  float m_run[2] = {-1e30f, -1e30f};  // finite, so that the first rescale is exp2(-huge) = 0, never NaN
  float l_run[2] = {0.f, 0.f};        // this lane's part of the row sums

  for (int it = 0; it < tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < tiles) {
      issue(it + 1, buf ^ 1);  // the other buffer was last read in iteration it - 1, before its closing barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q.K^T: key block nb = keys 8 nb .. 8 nb + 7 of the tile; lane reads key 8 nb + g, bytes 16t .. 16t + 15.
    int sacc[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      const uint4 kw = *reinterpret_cast<const uint4*>(&k_s[buf][(8 * nb + g) * kKS + 16 * t]);
#pragma unroll
      for (int i = 0; i < 4; ++i) sacc[nb][i] = 0;
      mma_s8(sacc[nb], qa[0], kw.x, kw.y);
      mma_s8(sacc[nb], qa[1], kw.z, kw.w);
    }

    // Dequantize (log2 domain), mask keys past Skv, online softmax.
    const int j0 = it * kBN;
    float s[8][4];
    float mt[2] = {-1e30f, -1e30f};
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      const int key = 8 * nb + 2 * t;
      const float2 ksc = *reinterpret_cast<const float2*>(&ks_s[buf][key]);
      const float2 kbi = *reinterpret_cast<const float2*>(&kb_s[buf][key]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float kscale = (i & 1) ? ksc.y : ksc.x;
        const float kbias = (i & 1) ? kbi.y : kbi.x;
        float v = static_cast<float>(sacc[nb][i]) * qsc[i >> 1] * kscale + kbias * c;
        if (j0 + key + (i & 1) >= Skv) v = __int_as_float(0xff800000);  // -inf
        s[nb][i] = v;
        mt[i >> 1] = fmaxf(mt[i >> 1], v);
      }
    }
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 1));
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 2));
      const float m_new = fmaxf(m_run[h], mt[h]);
      corr[h] = ex2(m_run[h] - m_new);
      m_run[h] = m_new;
      l_run[h] *= corr[h];
    }
#pragma unroll
    for (int dn = 0; dn < 8; ++dn)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[dn][i] *= corr[i >> 1];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = ex2(s[nb][i] - m_run[i >> 1]);
        l_run[i >> 1] += p;
        s[nb][i] = p;
      }

    // O += P.V: keys 16 kk .. 16 kk + 15 (key blocks 2kk, 2kk + 1 of S), dims 16 dp .. 16 dp + 15 per ldmatrix.x4.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const u32 pa[4] = {f16x2(s[2 * kk][0], s[2 * kk][1]), f16x2(s[2 * kk][2], s[2 * kk][3]),
                         f16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]), f16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const int vrow = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, &v_s[buf][vrow * kVS + 16 * dp + 8 * (lane >> 4)]);
        mma_f16(o[2 * dp], pa, vb[0], vb[1]);
        mma_f16(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's issue
  }

  // Epilogue: the row sums over the 4 lanes of each row, O / l as fp16 pairs.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    const int row = q0 + g + 8 * h;
    if (row < S) {
      const float inv = 1.f / l_run[h];
      u32* dst = reinterpret_cast<u32*>(O + (static_cast<i64>(bh) * S + row) * kD + 2 * t);
#pragma unroll
      for (int dn = 0; dn < 8; ++dn) dst[4 * dn] = f16x2(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
    }
  }
#endif
}

}  // namespace edgekit_attn

#ifndef EDGEKIT_NO_HOST

namespace {

// Path selection (edgekit_attention_int8_set_path; default from $EDGEKIT_ATTN_PATH = auto | old | mma, read at the
// first launch): 0 auto and 2 mma both take the tensor-core kernel wherever it can run (an sm_80+ device and a build
// with its sm_80+ body; a compute_75 PTX build JIT-compiled on a newer GPU has an empty one), 1 the CUDA-core kernel
// always. Values of edgekit_attention_int8_last_path: 1 CUDA-core kernel, 2 tensor-core kernel.
using namespace edgekit_path;
PathSwitch g_switch("EDGEKIT_ATTN_PATH");

// Whether the tensor-core kernel can run on the current device: checked once per device (devices 0..31).
bool mma_usable() {
  static unsigned checked = 0, usable = 0;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 32) {
    cudaGetLastError();
    return false;
  }
  const unsigned bit = 1u << dev;
  if (!(checked & bit)) {
    cudaFuncAttributes attr;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 8 &&
        cudaFuncGetAttributes(&attr, edgekit_attn::attention_int8_d64_mma) == cudaSuccess && attr.ptxVersion >= 80 &&
        attr.binaryVersion >= 80)
      usable |= bit;
    cudaGetLastError();
    checked |= bit;
  }
  return (usable & bit) != 0;
}

}  // namespace

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
  const auto s = static_cast<cudaStream_t>(stream);
  const auto* q8 = static_cast<const signed char*>(Q8);
  const auto* k8 = static_cast<const signed char*>(K8);
  const auto* v16 = static_cast<const unsigned short*>(V);
  auto* o16 = static_cast<unsigned short*>(O);
  if (g_switch.mode() != kPathOld && mma_usable()) {
    const dim3 grid((S + mma::kRows - 1) / mma::kRows, BH);
    attention_int8_d64_mma<<<grid, mma::kThreads, 0, s>>>(q8, q_scale, k8, k_scale, k_bias, v16, o16, S, Skv, q_block,
                                                          k_block, sm_scale);
    const int rc = static_cast<int>(cudaGetLastError());
    if (rc == 0) g_switch.last = kPathMma;
    return rc;
  }
  const dim3 grid((S + kQueries - 1) / kQueries, BH);
  attention_int8_d64<<<grid, kThreads, 0, s>>>(q8, q_scale, k8, k_scale, k_bias, v16, o16, S, Skv, q_block, k_block,
                                               sm_scale);
  const int rc = static_cast<int>(cudaGetLastError());
  if (rc == 0) g_switch.last = kPathOld;
  return rc;
}

// Path selection (g_switch above, kernel_path.cuh): 0 auto, 1 the CUDA-core kernel, 2 the tensor-core kernel wherever it can
// run; -1 re-reads $EDGEKIT_ATTN_PATH. Returns the previous mode, or -1 for an unknown mode (nothing changed). Not
// thread-safe against concurrent launches.
extern "C" int edgekit_attention_int8_set_path(int mode) {
  return g_switch.set(mode);
}

// The path the last successful launch took: 1 CUDA-core kernel, 2 tensor-core kernel (0 before any launch).
extern "C" int edgekit_attention_int8_last_path(void) { return g_switch.last; }

extern "C" const char* edgekit_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

#endif  // EDGEKIT_NO_HOST
