// ai.edgekit::MatMulLowBit on CUDA: Y[M, N] = A[M, K] @ dequant(B)[N, K]^T, fp32 activations and accumulation.
//
// Weight format (see edgekit/kernels/lowbit.py, the specification and numpy reference):
//   B_packed  uint8 [N, Kp * BITS / 8], Kp = K rounded up to group_size; each row a little-endian bitstream,
//             value k at bit offset k * BITS.
//   scales    float [N, Kp / group_size]
//   zp        uint8 [N, Kp / group_size], or nullptr for the symmetric default 2^(BITS-1).
// Kp is a multiple of 32, so a row is a sequence of "units": 32 values in BITS 32-bit words (4 * BITS bytes),
// all in one group. Units are 8-byte (2-bit), 16-byte (4-bit) or 32-byte (8-bit) aligned and loaded as vectors;
// 3-bit units (12 bytes) are loaded as three 32-bit words.
//
// Work split: a block of kWarps warps covers kWarps * kRowsPerWarp output columns n and MT rows of A. Along K
// the block walks chunks of kChunk = 1024 values: lane l of every warp owns unit l of the chunk for each of its
// rows, so a warp's weight loads are contiguous (coalesced) and each weight byte is read once per M-tile. The
// A chunk is staged in shared memory with 4 floats of padding per unit, which makes the lanes' float4 reads
// bank-conflict free. Codes become floats with the 2^23 trick (exact, no int->float conversion), the dot product
// of 8 codes with A runs in fp32 and is scaled once per 8 values; a warp shuffle reduction finishes each output.
// Weights are prefetched one chunk ahead into registers, so their loads overlap the math of the current chunk.
// For M = 1 the kernel is weight-bandwidth bound; for large M it is an fp32 CUDA-core kernel (no tensor cores).
//
// Tensor-core path (matmul_lowbit_mma, sm_80+; the launcher takes it for M >= kMmaMinM = 8): the same buffers,
// Y = A @ dequant(B)^T with mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32. The weights are the mma's A operand
// (16 output columns n per fragment), the activations its B operand (8 tokens m per fragment), so M = 8 fills an
// instruction. Per block: BN = 32 * WN weight rows x BM = 8 * MT * WM tokens; warps WN x WM x WK, each warp 32 rows
// (two m16 fragments) x 8 * MT tokens, the WK warps of one (wn, wm) splitting every stage's 4 units between them
// (summed through shared memory at the end). Configs: BN = 128 always (so activations are re-read by N / 128 blocks
// only), BM = 16 / 32 / 64 for M <= 16 / <= 32 / larger. Stages of kBK = 128 K values flow through a ring of S (3-4)
// dynamic-shared-memory slots filled by cp.async (S - 1 stages in flight): the fp32 activations as 16-byte copies
// (4-byte ones when K % 4 != 0 or A is unaligned), the packed weight rows as 16-byte (4, 8 bits), 8-byte (2 bits) or
// 4-byte (3 bits) copies, the scales as 4-byte copies, all zero-filled past M, K, N and Kp; the zero points (bytes)
// go through registers one stage ahead. The activations stay fp32 in shared memory and become f16x2 when a warp
// builds its B fragments (cvt.rn.f16x2.f32). Within a 32-value unit lane (g, t) = (lane / 4, lane % 4)
// owns the 8 consecutive K values 8t .. 8t + 7 of its weight rows g, g + 8 (BITS contiguous bytes of the packed
// row) and of its token g (32 contiguous bytes of the fp32 A tile): the two k16 steps of the unit take physical K
// 8t + 4s + {0,1} as the fragment's logical k 2t + {0,1} and 8t + 4s + {2,3} as 2t + 8 + {0,1} (s = 0, 1), a
// permutation of K applied to both operands, so the products are unchanged. Codes become fp16 (q - zp) exactly
// (0x6400 | q is 1024 + q in fp16, minus 1024 + zp with one sub.f16x2): integers up to 255, exact in fp16. Each
// unit's two mma start from zero and the unit's fp32 partial sums are scaled in fp32 (acc += scale * d), so the
// only rounding beyond fp32 is the activations' fp16 rounding (and |A| must stay below 65504). When twice the blocks
// still fit in one wave of resident blocks (small M), the launcher splits K over blockIdx.z (up to kMaxSplit parts
// of >= 4 stages), zeroes Y with cudaMemsetAsync and the parts atomicAdd their sums (fp32; the order of the adds
// varies). A config whose shared memory the device cannot grant (e.g. 99 KB on sm_86/89) falls back to a smaller
// config, then to the CUDA-core kernel; B must be 16-byte aligned for this path.
// edgekit_matmul_lowbit_set_path / $EDGEKIT_LOWBIT_PATH (auto | old | mma) force either path, and
// edgekit_matmul_lowbit_last_path says which ran. tests/test_mma_layout_dense.py runs this kernel's index math
// (shared-memory offsets, per-lane loads, fragment registers, epilogue) through a numpy model of the instruction.
//
// Compile: nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC (edgekit/kernels/cuda/build.py). With
// -DEDGEKIT_NO_HOST only the kernels remain (no includes), which is what NVRTC / CuPy RawModule compile.

#ifndef EDGEKIT_NO_HOST
#include <cuda_runtime.h>

#include "kernel_path.cuh"
#endif

namespace edgekit {

using u64 = unsigned long long;
constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 1024;     // K values per shared-memory stage: 32 units of 32 values
constexpr int kUnitStride = 36;  // floats per unit in shared memory: 32 values + 4 of padding

template <int BITS>
__device__ __forceinline__ void load_unit(const unsigned char* p, unsigned int (&w)[BITS]) {
  if constexpr (BITS == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (BITS == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 v0 = __ldg(reinterpret_cast<const uint4*>(p));
    const uint4 v1 = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = v0.x;
    w[1] = v0.y;
    w[2] = v0.z;
    w[3] = v0.w;
    w[4] = v1.x;
    w[5] = v1.y;
    w[6] = v1.z;
    w[7] = v1.w;
  } else {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(q + i);
  }
}

// Code j (0..31) of a unit; j is a compile-time constant after unrolling, so this folds to a shift and a mask
// (a funnel shift for the two 3-bit codes that straddle words).
template <int BITS>
__device__ __forceinline__ unsigned int unit_code(const unsigned int (&w)[BITS], int j) {
  const unsigned int mask = (1u << BITS) - 1u;
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  if (sh + BITS > 32) return __funnelshift_r(w[wi], w[wi + 1], sh) & mask;
  return (w[wi] >> sh) & mask;
}

// Unit u of rows n_base .. n_base + kRowsPerWarp - 1 (codes, scale, 2^23 + zero point); zeros past the row or N.
template <int BITS>
__device__ __forceinline__ void load_chunk(const unsigned char* __restrict__ B, const float* __restrict__ scales,
                                           const unsigned char* __restrict__ zp, int u, int n_base, int N, int units,
                                           int units_per_group, int groups, u64 row_bytes,
                                           unsigned int (&w)[kRowsPerWarp][BITS], float (&s)[kRowsPerWarp],
                                           float (&zf)[kRowsPerWarp]) {
  const float magic = 8388608.0f;  // 2^23: float bits 0x4B000000 | c  ==  2^23 + c for c < 2^23
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int n = n_base + r;
    if (u < units && n < N) {
      load_unit<BITS>(B + static_cast<u64>(n) * row_bytes + static_cast<u64>(u) * (4 * BITS), w[r]);
      const int g = n * groups + u / units_per_group;
      s[r] = __ldg(scales + g);
      zf[r] = magic + static_cast<float>(zp ? __ldg(zp + g) : (1u << (BITS - 1)));
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[r][i] = 0u;
      s[r] = 0.0f;
      zf[r] = magic;
    }
  }
}

template <int BITS, int MT>
__global__ void __launch_bounds__(kThreads)
    matmul_lowbit_f32(const float* __restrict__ A, const unsigned char* __restrict__ B,
                      const float* __restrict__ scales, const unsigned char* __restrict__ zp, float* __restrict__ Y,
                      int M, int N, int K, int group_size) {
  __shared__ float4 a_tile4[MT * 32 * kUnitStride / 4];
  float* a_tile = reinterpret_cast<float*>(a_tile4);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int m0 = blockIdx.y * MT;
  const int n_base = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  const int groups = (K + group_size - 1) / group_size;
  const int Kp = groups * group_size;
  const int units = Kp >> 5;
  const int units_per_group = group_size >> 5;
  const u64 row_bytes = static_cast<u64>(Kp) * BITS / 8;

  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  // Weights of the current chunk (w, s, zf) and, loaded before the current chunk's math, of the next one.
  unsigned int w[kRowsPerWarp][BITS], w_next[kRowsPerWarp][BITS];
  float s[kRowsPerWarp], zf[kRowsPerWarp], s_next[kRowsPerWarp], zf_next[kRowsPerWarp];
  load_chunk<BITS>(B, scales, zp, lane, n_base, N, units, units_per_group, groups, row_bytes, w, s, zf);

  for (int k0 = 0; k0 < Kp; k0 += kChunk) {
    const bool active = (k0 >> 5) + lane < units;
    __syncthreads();  // every warp is done reading the previous chunk
    for (int i = threadIdx.x; i < MT * kChunk; i += kThreads) {
      const int m = i / kChunk;
      const int kk = i % kChunk;
      const int k = k0 + kk;
      float v = 0.0f;
      if (m0 + m < M && k < K) v = A[static_cast<u64>(m0 + m) * K + k];
      a_tile[m * 32 * kUnitStride + (kk >> 5) * kUnitStride + (kk & 31)] = v;
    }
    __syncthreads();

    // Issue the next chunk's weight loads now so that their latency overlaps this chunk's math.
    load_chunk<BITS>(B, scales, zp, ((k0 + kChunk) >> 5) + lane, n_base, N, units, units_per_group, groups,
                     row_bytes, w_next, s_next, zf_next);

    if (active) {
      const float* a_unit = a_tile + lane * kUnitStride;
#pragma unroll
      for (int sub = 0; sub < 4; ++sub) {
        float wv[kRowsPerWarp][8];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            wv[r][j] = __uint_as_float(0x4B000000u | unit_code<BITS>(w[r], sub * 8 + j)) - zf[r];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float4 a0 = *reinterpret_cast<const float4*>(a_unit + m * 32 * kUnitStride + sub * 8);
          const float4 a1 = *reinterpret_cast<const float4*>(a_unit + m * 32 * kUnitStride + sub * 8 + 4);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            float d = wv[r][0] * a0.x;
            d = fmaf(wv[r][1], a0.y, d);
            d = fmaf(wv[r][2], a0.z, d);
            d = fmaf(wv[r][3], a0.w, d);
            d = fmaf(wv[r][4], a1.x, d);
            d = fmaf(wv[r][5], a1.y, d);
            d = fmaf(wv[r][6], a1.z, d);
            d = fmaf(wv[r][7], a1.w, d);
            acc[r][m] = fmaf(s[r], d, acc[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[r][i] = w_next[r][i];
      s[r] = s_next[r];
      zf[r] = zf_next[r];
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      const int n = n_base + r;
      if (lane == 0 && n < N && m0 + m < M) Y[static_cast<u64>(m0 + m) * N + n] = v;
    }
  }
}

// The explicit instantiations CuPy/NVRTC looks up by name, e.g. "edgekit::matmul_lowbit_f32<4, 8>".
#define EDGEKIT_INSTANTIATE(BITS)                                                                            \
  template __global__ void matmul_lowbit_f32<BITS, 1>(const float*, const unsigned char*, const float*,     \
                                                      const unsigned char*, float*, int, int, int, int);    \
  template __global__ void matmul_lowbit_f32<BITS, 2>(const float*, const unsigned char*, const float*,     \
                                                      const unsigned char*, float*, int, int, int, int);    \
  template __global__ void matmul_lowbit_f32<BITS, 4>(const float*, const unsigned char*, const float*,     \
                                                      const unsigned char*, float*, int, int, int, int);    \
  template __global__ void matmul_lowbit_f32<BITS, 8>(const float*, const unsigned char*, const float*,     \
                                                      const unsigned char*, float*, int, int, int, int);
EDGEKIT_INSTANTIATE(2)
EDGEKIT_INSTANTIATE(3)
EDGEKIT_INSTANTIATE(4)
EDGEKIT_INSTANTIATE(8)
#undef EDGEKIT_INSTANTIATE

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core path: mma.sync m16n8k16, fp16 x fp16 -> fp32 (sm_80+; an empty body below sm_80, never launched).
//
// Fragment layouts, PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"
// (docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float), with
// groupID g = lane >> 2 and threadID_in_group t = lane % 4:
//   A (16 x 16, row): 4 .f16x2 registers {a0,a1} {a2,a3} {a4,a5} {a6,a7}; row g for a0, a1, a4, a5, g + 8 for
//                     a2, a3, a6, a7; col 2t + (i & 1) for i < 4, 2t + (i & 1) + 8 for i >= 4.
//   B (16 x 8, col):  2 .f16x2 registers {b0,b1} {b2,b3}; row (k) 2t + (i & 1) for i < 2, + 8 for i >= 2; col g.
//   C / D (16 x 8):   4 .f32 registers c0..c3; row g for i < 2, g + 8 for i >= 2; col 2t + (i & 1).
// (edgekit/kernels/cuda/mma_layout.py: dense_a_coords, dense_b_coords, d_coords, emulate_dense.)

namespace mma {

constexpr int kBK = 128;          // K values per stage: 4 units of 32
constexpr int kUnits = kBK / 32;  // units per stage
constexpr int kAS = kBK + 4;      // floats per token row of the fp32 A tile: 528 bytes (16 mod 128), so that the
                                  // 16-byte B-fragment loads of tokens g and g + 1 (one phase of 8 lanes) hit
                                  // opposite bank halves

template <int BITS>
struct WT {
  static constexpr int kRowBytes = kBK * BITS / 8;  // packed bytes of a weight row per stage: 32 / 48 / 64 / 128
  // cp.async bytes per copy: the alignment a packed row guarantees (a unit is 4 * BITS bytes at a multiple of it).
  static constexpr int kCp = (BITS == 4 || BITS == 8) ? 16 : (BITS == 2 ? 8 : 4);
  // Padded shared-memory row stride (bytes): an odd multiple of 16 (2, 3, 4 bits) or of 32 (8 bits), so that the
  // 8 rows g = 0..7 of a fragment load land in distinct banks.
  static constexpr int kWS = kRowBytes + ((BITS == 3 || BITS == 8) ? 32 : 16);
};

template <int BITS, int WN, int WM, int WK, int MT, int S>
struct Cfg {
  static constexpr int kThreads = 32 * WN * WM * WK;
  static constexpr int BN = 32 * WN;      // weight rows (outputs n) per block
  static constexpr int BM = 8 * MT * WM;  // tokens (rows m of A) per block
  static constexpr int kATile = BM * kAS * 4;
  static constexpr int kWTile = BN * WT<BITS>::kWS;
  static constexpr int kMTile = BN * kUnits * 8;  // {scale bits, (1024 + zp) as f16x2} per row and unit
  static constexpr int kStage = kATile + kWTile + kMTile;
  static constexpr int kRed = (WK - 1) * WN * WM * 8 * MT * 32 * 4;  // the in-block K split's sums, after the loop
  static constexpr int kSmem = S * kStage > kRed ? S * kStage : kRed;  // dynamic shared memory: S stages
  static constexpr int kACp = BM * kBK / 4 / kThreads;                     // 16-byte A copies per thread per stage
  static constexpr int kWCp = BN * WT<BITS>::kRowBytes / WT<BITS>::kCp / kThreads;  // weight copies per thread
  static constexpr int kMPT = (BN * kUnits + kThreads - 1) / kThreads;  // {scale, zp} entries per thread
  static_assert(kACp * kThreads * 4 == BM * kBK, "whole 16-byte A copies per thread");
  static_assert(kWCp * kThreads * WT<BITS>::kCp == BN * WT<BITS>::kRowBytes, "whole weight copies per thread");
  static_assert(kUnits % WK == 0, "the K split divides the units of a stage");
  static_assert(S >= 3, "the zero points are stored one stage ahead of their slot's use");
  static_assert(kATile % 16 == 0 && kWTile % 16 == 0 && kStage % 16 == 0, "aligned sub-tiles");
};

// (c, WN, WM, WK, MT, S) per config; the launcher picks by M (M <= 16: 0, M <= 32: 1, else 2) and falls back to a
// lower config when the device cannot give a block that much shared memory.
#define EDGEKIT_LOWBIT_MMA_CONFIGS(X) X(0, 4, 1, 2, 2, 4) X(1, 4, 1, 2, 4, 3) X(2, 4, 2, 1, 4, 3)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// {lo, hi} as an f16x2 register (low half first), round to nearest even.
__device__ __forceinline__ unsigned int f16x2(float lo, float hi) {
  unsigned int d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ unsigned int sub_f16x2(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// BYTES (4, 8, 16) from global src to shared dst, asynchronously; zeros instead when !valid (src is not read).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  const int n = valid ? BYTES : 0;
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// D = A * B + C for one m16n8k16 fragment set (layouts above).
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3]));
}

// The 8 codes 8t .. 8t + 7 of the 32-value unit at `unit` (shared memory): code j in bits j * BITS.
template <int BITS>
__device__ __forceinline__ u64 lane_codes(const unsigned char* unit, int t) {
  if constexpr (BITS == 2) {
    return *reinterpret_cast<const unsigned short*>(unit + 2 * t);
  } else if constexpr (BITS == 4) {
    return *reinterpret_cast<const unsigned int*>(unit + 4 * t);
  } else if constexpr (BITS == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(unit + 8 * t);
    return static_cast<u64>(v.x) | (static_cast<u64>(v.y) << 32);
  } else {  // 3 bits: 24 bits from bit 24t of the unit's 3 words; word wi + 1 only when they straddle (t = 1, 2)
    const unsigned int* w = reinterpret_cast<const unsigned int*>(unit);
    const int bit = 24 * t;
    const int wi = bit >> 5;
    const int sh = bit & 31;
    const unsigned int hi = sh > 8 ? w[wi + 1] : 0u;
    return __funnelshift_r(w[wi], hi, sh);
  }
}

// The f16x2 register {q_j - zp, q_{j+1} - zp} (low half first), exact: 0x6400 | q is 1024 + q in fp16, and
// zp2 holds 1024 + zp in both halves.
template <int BITS>
__device__ __forceinline__ unsigned int code_pair(u64 codes, int j, unsigned int zp2) {
  const unsigned int mask = (1u << BITS) - 1u;
  const unsigned int lo = static_cast<unsigned int>(codes >> (j * BITS)) & mask;
  const unsigned int hi = static_cast<unsigned int>(codes >> ((j + 1) * BITS)) & mask;
  return sub_f16x2(0x64006400u | lo | (hi << 16), zp2);
}
#endif

template <int BITS, int WN, int WM, int WK, int MT, int S>
// Two blocks per SM for the M <= 16 config at 2 and 4 bits (<= 128 registers without spills; 3 and 8 bits and the
// larger tiles would spill there).
__global__ void __launch_bounds__(32 * WN * WM * WK, (MT * WM == 2 && (BITS == 2 || BITS == 4)) ? 2 : 1)
    matmul_lowbit_mma(const float* __restrict__ A, const unsigned char* __restrict__ B,
                      const float* __restrict__ scales, const unsigned char* __restrict__ zp, float* __restrict__ Y,
                      int M, int N, int K, int group_size, int a_vec4, int split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = Cfg<BITS, WN, WM, WK, MT, S>;
  using W = WT<BITS>;
  extern __shared__ __align__(16) unsigned char smem[];  // S slots of {A tile, weight tile, {scale, zp2} tile}

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wn = warp % WN;
  const int wm = (warp / WN) % WM;
  const int wk = warp / (WN * WM);
  const int n0 = blockIdx.x * C::BN;
  const int m0 = blockIdx.y * C::BM;
  const int groups = (K + group_size - 1) / group_size;
  const int Kp = groups * group_size;
  const int units = Kp >> 5;
  const int units_per_group = group_size >> 5;
  const u64 row_bytes = static_cast<u64>(Kp) * BITS / 8;
  const int stages = (Kp + kBK - 1) / kBK;
  // Split-K over blockIdx.z (split > 1: Y was zeroed by the launcher and the blocks add their partial sums).
  const int per_split = (stages + split - 1) / split;
  const int kt_begin = blockIdx.z * per_split;
  const int kt_end = min(stages, kt_begin + per_split);
  if (kt_begin >= kt_end) return;  // the whole block: nothing to add

  float acc[2][MT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // Stage kt lives in slot kt % S: [BM][kAS] fp32 activations, [BN][kWS] packed codes, [BN][kUnits] {scale, zp2}.
  auto a_slot = [&](int kt) { return reinterpret_cast<float*>(smem + (kt % S) * C::kStage); };
  auto w_slot = [&](int kt) { return smem + (kt % S) * C::kStage + C::kATile; };
  auto m_slot = [&](int kt) { return reinterpret_cast<uint2*>(smem + (kt % S) * C::kStage + C::kATile + C::kWTile); };

  // cp.async of stage kt's activations, packed codes and scales (zero-filled past M, K, N and Kp: a zero scale
  // makes rows past N and units past Kp add nothing).
  auto issue = [&](int kt) {
    const int k0 = kt * kBK;
    float* a_s = a_slot(kt);
    unsigned char* w_s = w_slot(kt);
    uint2* m_s = m_slot(kt);
#pragma unroll
    for (int j = 0; j < C::kACp; ++j) {
      const int idx = tid + j * C::kThreads;  // 16-byte copy index in the [BM][kBK / 4] tile
      const int m = idx / (kBK / 4);
      const int k = k0 + 4 * (idx % (kBK / 4));
      const float* p = A + static_cast<u64>(m0 + m) * K + k;
      float* d = a_s + m * kAS + (k - k0);
      if (a_vec4) {  // K % 4 == 0 and A 16-byte aligned: the 4 values are all in or all out of [0, K)
        const bool ok = m0 + m < M && k < K;
        cp_async<16>(d, ok ? p : A, ok);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = m0 + m < M && k + e < K;
          cp_async<4>(d + e, ok ? p + e : A, ok);
        }
      }
    }
#pragma unroll 2  // (fully unrolled, the 3-bit M > 32 config spills on sm_80: its 6 copies' addresses stay live)
    for (int j = 0; j < C::kWCp; ++j) {
      const int idx = tid + j * C::kThreads;  // copy index in the [BN][kRowBytes / kCp] tile
      const int r = idx / (W::kRowBytes / W::kCp);
      const int c = idx % (W::kRowBytes / W::kCp);
      const int n = n0 + r;
      const int unit = (k0 >> 5) + c * W::kCp / (4 * BITS);  // a unit is 4 * BITS bytes
      const bool ok = n < N && unit < units;
      const unsigned char* src = B + static_cast<u64>(n) * row_bytes + static_cast<u64>(k0) * BITS / 8 + c * W::kCp;
      cp_async<W::kCp>(w_s + r * W::kWS + c * W::kCp, ok ? src : B, ok);
    }
#pragma unroll
    for (int j = 0; j < C::kMPT; ++j) {
      const int idx = tid + j * C::kThreads;  // entry index in the [BN][kUnits] tile
      const int n = n0 + idx / kUnits;
      const int unit = (k0 >> 5) + idx % kUnits;
      const bool ok = n < N && unit < units;
      const u64 gi = ok ? static_cast<u64>(n) * groups + unit / units_per_group : 0;
      if (idx < C::BN * kUnits) cp_async<4>(&m_s[idx].x, scales + gi, ok);
    }
  };

  // Zero points go through registers (bytes, no cp.async): loaded one stage ahead of their store, which is one
  // stage ahead of their use. zp2 = 1024 + zp in both f16 halves; the symmetric default without loads.
  unsigned int z_r[C::kMPT];
  auto load_zp = [&](int kt) {
#pragma unroll
    for (int j = 0; j < C::kMPT; ++j) {
      const int idx = tid + j * C::kThreads;
      const int n = n0 + idx / kUnits;
      const int unit = kt * kUnits + idx % kUnits;
      unsigned int z = 1u << (BITS - 1);
      if (zp && idx < C::BN * kUnits && n < N && unit < units)
        z = __ldg(zp + static_cast<u64>(n) * groups + unit / units_per_group);
      z_r[j] = 0x64006400u | z | (z << 16);
    }
  };
  auto store_zp = [&](int kt) {
    uint2* m_s = m_slot(kt);
#pragma unroll
    for (int j = 0; j < C::kMPT; ++j) {
      const int idx = tid + j * C::kThreads;
      if (idx < C::BN * kUnits) m_s[idx].y = z_r[j];
    }
  };

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {  // prologue: stages kt_begin .. kt_begin + S - 2 in flight
    if (kt_begin + s < kt_end) issue(kt_begin + s);
    cp_async_commit();
  }
  load_zp(kt_begin);
  store_zp(kt_begin);
  load_zp(kt_begin + 1);

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies of stage kt have landed
    __syncthreads();         // everyone's; and every warp is done with stage kt - 1 (whose slot is refilled next)
    if (kt + S - 1 < kt_end) issue(kt + S - 1);
    cp_async_commit();
    if (kt + 1 < kt_end) {
      store_zp(kt + 1);  // slot of stage kt + 1 - S, done (S >= 3); visible after the next barrier
      load_zp(kt + 2);
    }

    const float* a_s = a_slot(kt);
    const unsigned char* w_s = w_slot(kt);
    const uint2* m_s = m_slot(kt);
#pragma unroll
    for (int uu = 0; uu < kUnits / WK; ++uu) {
      const int u = uu * WK + wk;  // this warp's unit of the stage
      // B fragments: token row wm * 8 * MT + 8 * j + g, values 8t .. 8t + 7 of unit u as f16; .x .y for k-step 0,
      // .z .w for k-step 1.
      uint4 b[MT];
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const float* ap = a_s + (wm * 8 * MT + 8 * j + g) * kAS + u * 32 + 8 * t;
        const float4 lo = *reinterpret_cast<const float4*>(ap);
        const float4 hi = *reinterpret_cast<const float4*>(ap + 4);
        b[j] = make_uint4(f16x2(lo.x, lo.y), f16x2(lo.z, lo.w), f16x2(hi.x, hi.y), f16x2(hi.z, hi.w));
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r0 = wn * 32 + 16 * i + g;  // weight rows r0 (c0, c1) and r0 + 8 (c2, c3) of the block
        const u64 q0 = lane_codes<BITS>(w_s + r0 * W::kWS + u * 4 * BITS, t);
        const u64 q1 = lane_codes<BITS>(w_s + (r0 + 8) * W::kWS + u * 4 * BITS, t);
        const uint2 e0 = m_s[r0 * kUnits + u];
        const uint2 e1 = m_s[(r0 + 8) * kUnits + u];
        unsigned int a[2][4];
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          a[s][0] = code_pair<BITS>(q0, 4 * s, e0.y);      // row g,     logical k 2t + {0,1}
          a[s][1] = code_pair<BITS>(q1, 4 * s, e1.y);      // row g + 8, logical k 2t + {0,1}
          a[s][2] = code_pair<BITS>(q0, 4 * s + 2, e0.y);  // row g,     logical k 2t + 8 + {0,1}
          a[s][3] = code_pair<BITS>(q1, 4 * s + 2, e1.y);  // row g + 8, logical k 2t + 8 + {0,1}
        }
        const float s0 = __uint_as_float(e0.x);
        const float s1 = __uint_as_float(e1.x);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma16816(d, a[0], b[j].x, b[j].y);
          mma16816(d, a[1], b[j].z, b[j].w);
          acc[i][j][0] = fmaf(s0, d[0], acc[i][j][0]);
          acc[i][j][1] = fmaf(s0, d[1], acc[i][j][1]);
          acc[i][j][2] = fmaf(s1, d[2], acc[i][j][2]);
          acc[i][j][3] = fmaf(s1, d[3], acc[i][j][3]);
        }
      }
    }
  }

  if constexpr (WK > 1) {  // warps wk > 0 hand their partial sums to warp wk = 0 of the same (wn, wm)
    cp_async_wait<0>();    // (only empty groups remain) before the ring becomes the reduction buffer
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);
    const int wnm = warp % (WN * WM);
    if (wk > 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            red[(((wk - 1) * WN * WM + wnm) * 8 * MT + (i * MT + j) * 4 + e) * 32 + lane] = acc[i][j][e];
    }
    __syncthreads();
    if (wk > 0) return;
    for (int w = 1; w < WK; ++w)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[i][j][e] += red[(((w - 1) * WN * WM + wnm) * 8 * MT + (i * MT + j) * 4 + e) * 32 + lane];
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = n0 + wn * 32 + 16 * i + g + 8 * (e >> 1);
        const int m = m0 + wm * 8 * MT + 8 * j + 2 * t + (e & 1);
        if (n < N && m < M) {
          if (split > 1)
            atomicAdd(Y + static_cast<u64>(m) * N + n, acc[i][j][e]);
          else
            Y[static_cast<u64>(m) * N + n] = acc[i][j][e];
        }
      }
#endif
}

// Explicit instantiations (so that the kernels-only build, as CI and NVRTC compile it, contains them), e.g.
// "edgekit::mma::matmul_lowbit_mma<4, 4, 1, 2, 2, 4>".
#define EDGEKIT_MMA_INSTANTIATE_ONE(BITS, C, WN, WM, WK, MT, S)                                                \
  template __global__ void matmul_lowbit_mma<BITS, WN, WM, WK, MT, S>(                                         \
      const float*, const unsigned char*, const float*, const unsigned char*, float*, int, int, int, int, int, int);
#define EDGEKIT_MMA_INSTANTIATE_2(C, WN, WM, WK, MT, S) EDGEKIT_MMA_INSTANTIATE_ONE(2, C, WN, WM, WK, MT, S)
#define EDGEKIT_MMA_INSTANTIATE_3(C, WN, WM, WK, MT, S) EDGEKIT_MMA_INSTANTIATE_ONE(3, C, WN, WM, WK, MT, S)
#define EDGEKIT_MMA_INSTANTIATE_4(C, WN, WM, WK, MT, S) EDGEKIT_MMA_INSTANTIATE_ONE(4, C, WN, WM, WK, MT, S)
#define EDGEKIT_MMA_INSTANTIATE_8(C, WN, WM, WK, MT, S) EDGEKIT_MMA_INSTANTIATE_ONE(8, C, WN, WM, WK, MT, S)
EDGEKIT_LOWBIT_MMA_CONFIGS(EDGEKIT_MMA_INSTANTIATE_2)
EDGEKIT_LOWBIT_MMA_CONFIGS(EDGEKIT_MMA_INSTANTIATE_3)
EDGEKIT_LOWBIT_MMA_CONFIGS(EDGEKIT_MMA_INSTANTIATE_4)
EDGEKIT_LOWBIT_MMA_CONFIGS(EDGEKIT_MMA_INSTANTIATE_8)
#undef EDGEKIT_MMA_INSTANTIATE_2
#undef EDGEKIT_MMA_INSTANTIATE_3
#undef EDGEKIT_MMA_INSTANTIATE_4
#undef EDGEKIT_MMA_INSTANTIATE_8
#undef EDGEKIT_MMA_INSTANTIATE_ONE

}  // namespace mma

}  // namespace edgekit

#ifndef EDGEKIT_NO_HOST

#include <cstdlib>
#include <cstring>

namespace {

// Rows of A per block: the smallest power of two >= M, at most 8 (build.py's tile_m mirrors this).
int tile_m(int M) {
  if (M <= 1) return 1;
  if (M <= 2) return 2;
  if (M <= 4) return 4;
  return 8;
}

template <int BITS>
cudaError_t launch_bits(const float* A, const unsigned char* B, const float* scales, const unsigned char* zp, float* Y,
                        int M, int N, int K, int group_size, cudaStream_t stream) {
  using namespace edgekit;
  const int mt = tile_m(M);
  const dim3 block(kThreads);
  const dim3 grid((N + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp), (M + mt - 1) / mt);
  switch (mt) {
    case 1: matmul_lowbit_f32<BITS, 1><<<grid, block, 0, stream>>>(A, B, scales, zp, Y, M, N, K, group_size); break;
    case 2: matmul_lowbit_f32<BITS, 2><<<grid, block, 0, stream>>>(A, B, scales, zp, Y, M, N, K, group_size); break;
    case 4: matmul_lowbit_f32<BITS, 4><<<grid, block, 0, stream>>>(A, B, scales, zp, Y, M, N, K, group_size); break;
    default: matmul_lowbit_f32<BITS, 8><<<grid, block, 0, stream>>>(A, B, scales, zp, Y, M, N, K, group_size);
  }
  return cudaGetLastError();
}

// Path selection (edgekit_matmul_lowbit_set_path; default from $EDGEKIT_LOWBIT_PATH = auto | old | mma, read at the
// first launch): 0 auto (the tensor-core kernel for M >= kMmaMinM on sm_80+ builds and devices, else the CUDA-core
// kernel), 1 the CUDA-core kernel always, 2 the tensor-core kernel for every M where it can run. Values of
// edgekit_matmul_lowbit_last_path: 1 CUDA-core kernel, 2 tensor-core kernel.
using namespace edgekit_path;
constexpr int kMmaMinM = 8;  // auto: smaller M stay on the CUDA-core kernel (weight-bandwidth bound there)
constexpr int kMaxSplit = 8;  // most K parts of the tensor-core kernel's grid split (atomicAdd into a zeroed Y)
PathSwitch g_switch("EDGEKIT_LOWBIT_PATH");

bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

// One tensor-core config: check once per device that this build has its sm_80+ body (a compute_75 PTX build
// JIT-compiled on a newer GPU does not) and that the device grants its dynamic shared memory; launch. Returns -1
// when not usable (the caller then tries a smaller config, then the CUDA-core kernel).
template <int BITS, int WN, int WM, int WK, int MT, int S>
int launch_mma(const float* A, const unsigned char* B, const float* scales, const unsigned char* zp, float* Y, int M,
               int N, int K, int group_size, cudaStream_t stream, int dev, int sms) {
  using namespace edgekit::mma;
  using C = Cfg<BITS, WN, WM, WK, MT, S>;
  static unsigned ready = 0, unusable = 0;  // per device bit (devices 0..31)
  static int resident[32];                  // blocks per SM, per device
  const unsigned bit = dev < 32 ? 1u << dev : 0u;
  auto* kern = matmul_lowbit_mma<BITS, WN, WM, WK, MT, S>;
  if (bit == 0 || (unusable & bit)) return -1;
  if (!(ready & bit)) {
    cudaFuncAttributes attr;
    int per_sm = 0;
    if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess || attr.ptxVersion < 80 || attr.binaryVersion < 80 ||
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, C::kThreads, C::kSmem) != cudaSuccess ||
        per_sm < 1) {
      cudaGetLastError();
      unusable |= bit;
      return -1;
    }
    resident[dev] = per_sm;
    ready |= bit;
  }
  const dim3 grid((N + C::BN - 1) / C::BN, (M + C::BM - 1) / C::BM);
  if (grid.y > 65535) return -1;
  // cp.async of 16 / 8 / 4-byte pieces of the packed rows: B must be 16-byte aligned (any cudaMalloc pointer is).
  if (!aligned16(B)) return -1;
  const int a_vec4 = (K % 4 == 0) && aligned16(A);
  // Split K over the grid while twice the blocks still fit in one wave of resident blocks and each part keeps
  // >= 4 stages.
  const long long blocks = static_cast<long long>(grid.x) * grid.y;
  const long long wave = static_cast<long long>(resident[dev]) * sms;
  const int groups = (K + group_size - 1) / group_size;
  const int stages = (groups * group_size + kBK - 1) / kBK;
  int split = 1;
  while (split < kMaxSplit && blocks * split * 2 <= wave && stages >= 8 * split) split *= 2;
  if (split > 1) {
    const cudaError_t e = cudaMemsetAsync(Y, 0, static_cast<size_t>(M) * N * sizeof(float), stream);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const dim3 grid3(grid.x, grid.y, split);
  kern<<<grid3, C::kThreads, C::kSmem, stream>>>(A, B, scales, zp, Y, M, N, K, group_size, a_vec4, split);
  return static_cast<int>(cudaGetLastError());
}

// The tensor-core path when the mode, the device and the build allow it: its cudaError_t, or -1 for "use the
// CUDA-core kernel".
template <int BITS>
int try_mma(const float* A, const unsigned char* B, const float* scales, const unsigned char* zp, float* Y, int M,
            int N, int K, int group_size, cudaStream_t stream) {
  const int mode = g_switch.mode();
  if (mode == kPathOld || (mode == kPathAuto && M < kMmaMinM)) return -1;
  int dev = 0, major = 0, sms = 1;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) {
    cudaGetLastError();
    return -1;
  }
  if (major < 8) return -1;
  const int cfg = M <= 16 ? 0 : (M <= 32 ? 1 : 2);
  int rc = -1;
  for (int c = cfg; c >= 0 && rc == -1; --c) {  // a lower config where the device lacks the shared memory
    switch (c) {
#define EDGEKIT_MMA_CASE(CI, WN, WM, WK, MT, S)                                                              \
  case CI:                                                                                                  \
    rc = launch_mma<BITS, WN, WM, WK, MT, S>(A, B, scales, zp, Y, M, N, K, group_size, stream, dev, sms);   \
    break;
      EDGEKIT_LOWBIT_MMA_CONFIGS(EDGEKIT_MMA_CASE)
#undef EDGEKIT_MMA_CASE
      default:
        break;
    }
  }
  if (rc == 0) g_switch.last = kPathMma;
  return rc;
}

}  // namespace

// Y[M, N] = A[M, K] @ dequant(B)^T on `stream` (a cudaStream_t, 0 for the default stream). Device pointers;
// zero_points may be null (symmetric). Returns a cudaError_t value: 0 on success, cudaErrorInvalidValue for
// bits / group_size / shapes outside the specification. Asynchronous, like any kernel launch.
extern "C" int edgekit_matmul_lowbit_f32(const float* A, const void* B_packed, const float* scales,
                                         const void* zero_points, float* Y, int M, int N, int K, int bits,
                                         int group_size, void* stream) {
  if (M < 0 || N <= 0 || K <= 0 || !(group_size == 32 || group_size == 64 || group_size == 128))
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return 0;
  if (M > 65535 * 8) return static_cast<int>(cudaErrorInvalidValue);  // grid.y limit
  const auto* B = static_cast<const unsigned char*>(B_packed);
  const auto* zp = static_cast<const unsigned char*>(zero_points);
  auto s = static_cast<cudaStream_t>(stream);
  int rc = -1;
  switch (bits) {
    case 2: rc = try_mma<2>(A, B, scales, zp, Y, M, N, K, group_size, s); break;
    case 3: rc = try_mma<3>(A, B, scales, zp, Y, M, N, K, group_size, s); break;
    case 4: rc = try_mma<4>(A, B, scales, zp, Y, M, N, K, group_size, s); break;
    case 8: rc = try_mma<8>(A, B, scales, zp, Y, M, N, K, group_size, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rc >= 0) return rc;
  switch (bits) {
    case 2: rc = static_cast<int>(launch_bits<2>(A, B, scales, zp, Y, M, N, K, group_size, s)); break;
    case 3: rc = static_cast<int>(launch_bits<3>(A, B, scales, zp, Y, M, N, K, group_size, s)); break;
    case 4: rc = static_cast<int>(launch_bits<4>(A, B, scales, zp, Y, M, N, K, group_size, s)); break;
    default: rc = static_cast<int>(launch_bits<8>(A, B, scales, zp, Y, M, N, K, group_size, s));
  }
  if (rc == 0) g_switch.last = kPathOld;
  return rc;
}

// Path selection (g_switch above, kernel_path.cuh): 0 auto, 1 the CUDA-core kernel, 2 the tensor-core kernel whenever it can
// run (any M); -1 re-reads $EDGEKIT_LOWBIT_PATH. Returns the previous mode, or -1 for an unknown mode (nothing
// changed). Not thread-safe against concurrent launches.
extern "C" int edgekit_matmul_lowbit_set_path(int mode) {
  return g_switch.set(mode);
}

// The path the last successful launch took: 1 CUDA-core kernel, 2 tensor-core kernel (0 before any launch).
extern "C" int edgekit_matmul_lowbit_last_path(void) { return g_switch.last; }

extern "C" const char* edgekit_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

#endif  // EDGEKIT_NO_HOST
