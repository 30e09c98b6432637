// ai.edgekit::MatMulSparse24 on CUDA: Y[M, N] = X[M, K] @ W[N, K]^T with W 2:4-sparse along K.
//
// Formats (edgekit/kernels/sparse24.py is the specification and numpy reference):
//   values   [N, K/2]        fp16 (edgekit_matmul_sparse24_f16) or int8 (edgekit_matmul_sparse24_s8): the 2 kept
//                            weights of every group of 4 along K, in position order.
//   indices  uint8 [N, ceil(K/8)]: per group the nibble i0 | i1 << 2 (i0 < i1), two groups per byte, low nibble
//                            first. Little-endian 32-bit word w of a row = groups 8w..8w+7 = the row's mma.sp
//                            metadata for K 32w..32w+31.
//   X        fp16 [M, K] (f16 variant) or uint8 [M, K] with a zero point (s8 variant).
//   Y        fp16 [M, N] (f16: fp32 accumulation, rounded once) or fp32 [M, N] (s8:
//            a_scale * w_scale[n] * (sum_k X*q - a_zp * rowsum[n]), int32 accumulation).
//
// sm_80 and newer: sparse tensor cores, mma.sp::ordered_metadata m16n8k32 (f16 x f16 -> f32) or m16n8k64
// (s8 weights x u8 activations -> s32), the weights as the sparse operand A (16 output rows per instruction) and
// the activations as B (8 tokens). Register layouts: edgekit/kernels/cuda/mma_layout.py (numpy model, tested).
// Older GPUs (sm_72 Xavier, sm_75): the same tiles, then plain CUDA-core FMAs decoding the indices (#if below).
//
// Work split: a block of 8 warps owns 32 output rows (kWarpsN = 2 warps of 16 rows) and BM = 8 * MT tokens; the
// 4 warps along K (kWarpsK) each take one instruction's K slice of every 128 (f16) / 256 (s8) K stage, and their
// partial sums are added through shared memory at the end. With 2-byte f16 and 1-byte int8, a stage is the same
// byte geometry for both variants: 256 bytes of each X row, 128 bytes of each values row, 16 (f16) or 32 (s8)
// bytes of each indices row; the fragment byte offsets coincide too, so one kernel template serves both.
// The next stage's global loads are issued into registers before the current stage's math (one smem buffer).
// K, N, M need not be multiples of the tiles: values, indices and X past the edges read as zero (indices as the
// valid nibble 0x4), outputs past the edges are not written. 16-byte loads are used when rows are 16-byte aligned
// (f16: K % 16 == 0; s8: K % 32 == 0; and the pointers), byte loads otherwise.
//
// Tiled path (sm_80+, matmul_sparse24_tiled.cuh, namespace edgekit_sp24::tiled): block tiles of 128/64 weight rows
// x 128/64/32 tokens, 32 x 8*MT warp tiles (2*MT mma.sp per k-step), a 3-stage cp.async ring, ldmatrix fragments.
// It takes K % 64 == 0 (f16) / K % 128 == 0 (s8) with 16-byte aligned X, values and indices, on a build whose tiled
// kernel has sm_80+ code (not the compute_75 fallback build). The launchers choose it for M >= kTiledMinM (the
// reference kernel below, matmul_sparse24<INT8, MT>, stays for everything else and as the reference);
// edgekit_matmul_sparse24_set_path / $EDGEKIT_SP24_PATH (auto | old | tiled | tiled0..tiled3) force either, and
// edgekit_matmul_sparse24_last_path says which ran.
//
// Compile: nvcc -O3 -arch=sm_XX (build.py: compile_shared / compile_object / compile_device). -DEDGEKIT_NO_HOST
// leaves only the kernels (no includes), for NVRTC.

#ifndef EDGEKIT_NO_HOST
#include <cuda_runtime.h>
#endif

namespace edgekit_sp24 {

using u8 = unsigned char;
using u32 = unsigned int;
using i64 = long long;

constexpr int kWarpsN = 2;
constexpr int kWarpsK = 4;
constexpr int kThreads = 32 * kWarpsN * kWarpsK;  // 256
constexpr int kBN = 16 * kWarpsN;                 // 32 output rows per block
constexpr int kXBytes = 256;                      // bytes of an X row per stage
constexpr int kVBytes = 128;                      // bytes of a values row per stage
constexpr int kXStride = kXBytes + 16;            // padded smem rows: conflict-free fragment reads
constexpr int kVStride = kVBytes + 16;

#include "fp16.cuh"

// 16 bytes of a row at byte offset `off`, bytes at or past `limit` read as `fill`.
__device__ __forceinline__ uint4 load16(const u8* __restrict__ row, i64 off, i64 limit, bool aligned, u32 fill) {
  if (aligned && off + 16 <= limit) return __ldg(reinterpret_cast<const uint4*>(row + off));
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    u32 v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const i64 o = off + 4 * i + b;
      const u32 byte = o < limit ? static_cast<u32>(__ldg(row + o)) : (fill & 0xFFu);
      v |= byte << (8 * b);
    }
    w[i] = v;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One metadata byte (two groups) of a row, padding groups replaced by the valid nibble 0x4 = (i0 0, i1 1).
__device__ __forceinline__ u8 load_meta_byte(const u8* __restrict__ row, i64 byte, i64 groups) {
  if (2 * byte + 1 < groups) return __ldg(row + byte);
  if (2 * byte < groups) return static_cast<u8>((__ldg(row + byte) & 0x0F) | 0x40);
  return 0x44;
}

template <bool INT8>
struct Traits {
  static constexpr int kMmaK = INT8 ? 64 : 32;          // dense K per instruction
  static constexpr int kStageK = kMmaK * kWarpsK;        // dense K per stage: 128 / 256
  static constexpr int kMBytes = kStageK / 8;            // metadata bytes of a row per stage: 16 / 32
  static constexpr int kElem = INT8 ? 1 : 2;             // bytes per X / values element
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_sp(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

__device__ __forceinline__ void mma_sp(int (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.u8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
#endif

// Accumulator type: fp32 for f16, int32 for int8.
template <bool INT8>
struct Acc;
template <>
struct Acc<false> {
  using T = float;
};
template <>
struct Acc<true> {
  using T = int;
};

template <bool INT8, int MT>
__global__ void __launch_bounds__(kThreads)
    matmul_sparse24(const u8* __restrict__ X, const u8* __restrict__ V, const u8* __restrict__ I,
                    const float* __restrict__ w_scale, const int* __restrict__ w_rowsum, float a_scale, int a_zp,
                    void* __restrict__ Y, int M, int N, int K, int x_aligned, int v_aligned) {
  using T = Traits<INT8>;
  using AccT = typename Acc<INT8>::T;
  constexpr int BM = 8 * MT;
  constexpr int kTileBytes = BM * kXStride + kBN * kVStride + kBN * T::kMBytes;
  constexpr int kRedBytes = kWarpsK * kBN * (BM + 1) * 4;
  constexpr int kSmem = kTileBytes > kRedBytes ? kTileBytes : kRedBytes;
  __shared__ __align__(16) u8 smem[kSmem];
  u8* xs = smem;
  u8* vs = smem + BM * kXStride;
  u8* ms = vs + kBN * kVStride;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n0 = blockIdx.x * kBN;
  const int m0 = blockIdx.y * BM;
  const i64 x_row = static_cast<i64>(K) * T::kElem;        // bytes per X row
  const i64 v_row = static_cast<i64>(K / 2) * T::kElem;    // bytes per values row
  const i64 i_row = (K + 7) / 8;                           // bytes per indices row
  const i64 groups = K / 4;
  const int stages = (K + T::kStageK - 1) / T::kStageK;

  // Per-thread share of a stage's loads.
  constexpr int kXChunks = BM * (kXBytes / 16);  // 16-byte chunks of the X tile
  constexpr int kXPer = (kXChunks + kThreads - 1) / kThreads;
  constexpr int kMPer = kBN * T::kMBytes / kThreads;  // 2 (f16) or 4 (s8) metadata bytes
  uint4 xr[kXPer];
  uint4 vr;
  u8 mr[kMPer];

  auto load_stage = [&](int s) {
    const i64 kb = static_cast<i64>(s) * T::kStageK;  // dense K of the stage
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      const int c = tid + i * kThreads;
      const int m = c / (kXBytes / 16);
      const int part = c % (kXBytes / 16);
      if (c < kXChunks && m0 + m < M) {
        xr[i] = load16(X + static_cast<i64>(m0 + m) * x_row, kb * T::kElem + 16 * part, x_row, x_aligned, 0u);
      } else {
        xr[i] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    {
      const int r = tid / (kVBytes / 16);
      const int part = tid % (kVBytes / 16);
      if (n0 + r < N) {
        vr = load16(V + static_cast<i64>(n0 + r) * v_row, kb / 2 * T::kElem + 16 * part, v_row, v_aligned, 0u);
      } else {
        vr = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int i = 0; i < kMPer; ++i) {
      const int c = tid * kMPer + i;
      const int r = c / T::kMBytes;
      const int b = c % T::kMBytes;
      mr[i] = n0 + r < N ? load_meta_byte(I + static_cast<i64>(n0 + r) * i_row, kb / 8 + b, groups) : u8(0x44);
    }
  };

  auto store_stage = [&]() {
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      const int c = tid + i * kThreads;
      if (c < kXChunks) {
        *reinterpret_cast<uint4*>(xs + (c / (kXBytes / 16)) * kXStride + 16 * (c % (kXBytes / 16))) = xr[i];
      }
    }
    *reinterpret_cast<uint4*>(vs + (tid / (kVBytes / 16)) * kVStride + 16 * (tid % (kVBytes / 16))) = vr;
#pragma unroll
    for (int i = 0; i < kMPer; ++i) ms[tid * kMPer + i] = mr[i];
  };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // ---------------- sparse tensor cores ----------------
  const int wn = warp % kWarpsN;  // 16-row slice of the block's rows
  const int wk = warp / kWarpsN;  // instruction slice of each stage
  const int g = lane >> 2;
  const int t = lane & 3;
  AccT acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = AccT(0);

  load_stage(0);
  store_stage();
  __syncthreads();
  for (int s = 0; s < stages; ++s) {
    if (s + 1 < stages) load_stage(s + 1);
    // A: weights rows wn*16 + g (+8), compressed bytes 32*wk + 4t + 16*(r >> 1).
    u32 a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = wn * 16 + g + 8 * (r & 1);
      a[r] = *reinterpret_cast<const u32*>(vs + row * kVStride + 32 * wk + 4 * t + 16 * (r >> 1));
    }
    // E (mma_layout.kernel_metadata mirrors this). f16: 16-bit halves of rows g and g + 8's metadata word wk
    // (lanes t = 0, 1; selector 0). s8 (measured on sm_90): lane 4g + t holds one whole word, groups
    // 8 (t >> 1) .. + 7 of the instruction's 16, of row g + 8 (t & 1).
    u32 e;
    if constexpr (INT8) {
      e = *reinterpret_cast<const u32*>(ms + (wn * 16 + g + 8 * (t & 1)) * T::kMBytes + 4 * (2 * wk + (t >> 1)));
    } else {
      const u32 lo = *reinterpret_cast<const u32*>(ms + (wn * 16 + g) * T::kMBytes + 4 * wk);
      const u32 hi = *reinterpret_cast<const u32*>(ms + (wn * 16 + g + 8) * T::kMBytes + 4 * wk);
      e = __byte_perm(lo, hi, (t & 1) ? 0x7632 : 0x5410);
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      // B: token 8j + g, X bytes 64*wk + 16r + 4t.
      u32 b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) b[r] = *reinterpret_cast<const u32*>(xs + (8 * j + g) * kXStride + 64 * wk + 16 * r + 4 * t);
      mma_sp(acc[j], a, b, e);
    }
    __syncthreads();
    if (s + 1 < stages) {
      store_stage();
      __syncthreads();
    }
  }

  // Sum the kWarpsK partial tiles: red[wk][row][token].
  AccT* red = reinterpret_cast<AccT*>(smem);
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = wn * 16 + g + 8 * (i >> 1);
      const int tok = 8 * j + 2 * t + (i & 1);
      red[(wk * kBN + row) * (BM + 1) + tok] = acc[j][i];
    }
  __syncthreads();
  for (int idx = tid; idx < kBN * BM; idx += kThreads) {
    const int row = idx % kBN;
    const int tok = idx / kBN;
    const int n = n0 + row;
    const int m = m0 + tok;
    if (n >= N || m >= M) continue;
    AccT sum = AccT(0);
#pragma unroll
    for (int k = 0; k < kWarpsK; ++k) sum += red[(k * kBN + row) * (BM + 1) + tok];
    if constexpr (INT8) {
      const int corr = a_zp != 0 ? a_zp * __ldg(w_rowsum + n) : 0;
      static_cast<float*>(Y)[static_cast<i64>(m) * N + n] =
          a_scale * __ldg(w_scale + n) * static_cast<float>(sum - corr);
    } else {
      static_cast<unsigned short*>(Y)[static_cast<i64>(m) * N + n] = f2h(sum);
    }
  }
#else
  // ---------------- CUDA cores (no mma.sp before sm_80) ----------------
  (void)warp;
  (void)lane;
  AccT acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = AccT(0);
  load_stage(0);
  store_stage();
  __syncthreads();
  for (int s = 0; s < stages; ++s) {
    if (s + 1 < stages) load_stage(s + 1);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int idx = tid + i * kThreads;  // kBN * BM = 256 * MT outputs per block
      const int row = idx % kBN;
      const int tok = idx / kBN;
      const u8* vrow = vs + row * kVStride;
      const u8* mrow = ms + row * T::kMBytes;
      const u8* xrow = xs + tok * kXStride;
      AccT sum = AccT(0);
      for (int q = 0; q < T::kStageK / 4; ++q) {
        const int nib = (mrow[q >> 1] >> (4 * (q & 1))) & 0xF;
        const int i0 = 4 * q + (nib & 3);
        const int i1 = 4 * q + (nib >> 2);
        if constexpr (INT8) {
          sum += static_cast<int>(reinterpret_cast<const signed char*>(vrow)[2 * q]) * static_cast<int>(xrow[i0]) +
                 static_cast<int>(reinterpret_cast<const signed char*>(vrow)[2 * q + 1]) * static_cast<int>(xrow[i1]);
        } else {
          const unsigned short* vh = reinterpret_cast<const unsigned short*>(vrow);
          const unsigned short* xh = reinterpret_cast<const unsigned short*>(xrow);
          sum = fmaf(h2f(vh[2 * q]), h2f(xh[i0]), sum);
          sum = fmaf(h2f(vh[2 * q + 1]), h2f(xh[i1]), sum);
        }
      }
      acc[i] += sum;
    }
    __syncthreads();
    if (s + 1 < stages) {
      store_stage();
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int idx = tid + i * kThreads;
    const int n = n0 + idx % kBN;
    const int m = m0 + idx / kBN;
    if (n >= N || m >= M) continue;
    if constexpr (INT8) {
      const int corr = a_zp != 0 ? a_zp * __ldg(w_rowsum + n) : 0;
      static_cast<float*>(Y)[static_cast<i64>(m) * N + n] =
          a_scale * __ldg(w_scale + n) * static_cast<float>(acc[i] - corr);
    } else {
      static_cast<unsigned short*>(Y)[static_cast<i64>(m) * N + n] = f2h(acc[i]);
    }
  }
#endif
}

// Raw mma.sp on per-lane registers, one independent instruction per block (A, B: [count][32][4] u32, E:
// [count][32] u32 -> D: [count][32][4] f32 or s32), to measure the register layouts of mma_layout.py on a device.
// kind 0: f16 m16n8k32, 1: s8 x u8 m16n8k64. Before sm_80 D is all ones (0xFFFFFFFF).
__global__ void mma_sp_probe(int kind, const u32* __restrict__ A, const u32* __restrict__ B,
                             const u32* __restrict__ E, u32* __restrict__ D) {
  const i64 base = static_cast<i64>(blockIdx.x) * 32;
  A += base * 4;
  B += base * 4;
  E += base;
  D += base * 4;
  const int lane = threadIdx.x & 31;
  u32 a[4], b[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    a[r] = A[lane * 4 + r];
    b[r] = B[lane * 4 + r];
  }
  const u32 e = E[lane];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (kind == 0) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    mma_sp(c, a, b, e);
#pragma unroll
    for (int i = 0; i < 4; ++i) D[lane * 4 + i] = __float_as_uint(c[i]);
  } else {
    int c[4] = {0, 0, 0, 0};
    mma_sp(c, a, b, e);
#pragma unroll
    for (int i = 0; i < 4; ++i) D[lane * 4 + i] = static_cast<u32>(c[i]);
  }
#else
  (void)kind;
  (void)e;
  (void)a;
  (void)b;
#pragma unroll
  for (int i = 0; i < 4; ++i) D[lane * 4 + i] = 0xFFFFFFFFu;
#endif
}

#define EDGEKIT_SP24_INSTANTIATE(INT8, MT)                                                                   \
  template __global__ void matmul_sparse24<INT8, MT>(const u8*, const u8*, const u8*, const float*,         \
                                                     const int*, float, int, void*, int, int, int, int, int);
EDGEKIT_SP24_INSTANTIATE(false, 1)
EDGEKIT_SP24_INSTANTIATE(false, 2)
EDGEKIT_SP24_INSTANTIATE(false, 4)
EDGEKIT_SP24_INSTANTIATE(false, 8)
EDGEKIT_SP24_INSTANTIATE(true, 1)
EDGEKIT_SP24_INSTANTIATE(true, 2)
EDGEKIT_SP24_INSTANTIATE(true, 4)
EDGEKIT_SP24_INSTANTIATE(true, 8)
#undef EDGEKIT_SP24_INSTANTIATE

// The faster sm_80+ tiling (block tiles up to 128 x 128, cp.async ring, ldmatrix): namespace edgekit_sp24::tiled.
#include "matmul_sparse24_tiled.cuh"

}  // namespace edgekit_sp24

#ifndef EDGEKIT_NO_HOST

#include <cstdlib>
#include <cstring>

namespace {

// Path selection (edgekit_matmul_sparse24_set_path; default from $EDGEKIT_SP24_PATH, read at the first launch):
// 0 auto (tiled on sm_80+ builds when the shape qualifies and M >= kTiledMinM, else the reference kernel),
// 1 the reference kernel always, 2 tiled whenever the shape qualifies (automatic config), 10 + c tiled config c
// whenever the shape qualifies. Values of edgekit_matmul_sparse24_last_path: 1 reference, 10 + c tiled config c.
constexpr int kPathAuto = 0, kPathReference = 1, kPathTiled = 2, kPathTiledConfig0 = 10;
constexpr int kDefaultPath = kPathAuto;  // without $EDGEKIT_SP24_PATH: kPathReference would disable the tiled path
constexpr int kTiledMinM = 48;            // auto: smaller M stay on the reference kernel (split-K tiles there)
int g_path = -1;
int g_last_path = 0;

int parse_path(const char* s) {
  if (s == nullptr || *s == 0) return kDefaultPath;
  if (std::strcmp(s, "auto") == 0) return kPathAuto;
  if (std::strcmp(s, "old") == 0 || std::strcmp(s, "reference") == 0) return kPathReference;
  if (std::strcmp(s, "tiled") == 0) return kPathTiled;
  if (std::strncmp(s, "tiled", 5) == 0 && s[5] >= '0' && s[5] < '0' + edgekit_sp24::tiled::kConfigs && s[6] == 0)
    return kPathTiledConfig0 + (s[5] - '0');
  return kDefaultPath;
}

int path_mode() {
  if (g_path < 0) g_path = parse_path(std::getenv("EDGEKIT_SP24_PATH"));
  return g_path;
}

// n8 token tiles per block (build.py's sparse24_tile_m mirrors this).
int tile_mt(int M) {
  if (M <= 8) return 1;
  if (M <= 16) return 2;
  if (M <= 32) return 4;
  return 8;
}

bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

// One tiled configuration: set its dynamic shared memory once per device, check that this build has the sm_80+
// body (a compute_75 PTX build JIT-compiled on a newer GPU does not), launch. Returns -1 when not usable.
template <bool INT8, int WN, int WM, int MT>
int launch_tiled(const void* X, const void* values, const void* indices, const float* w_scale, const int* w_rowsum,
                 float a_scale, int a_zp, void* Y, int M, int N, int K, cudaStream_t s, int dev) {
  using namespace edgekit_sp24;
  using C = tiled::Cfg<INT8, WN, WM, MT>;
  static unsigned ready = 0, unusable = 0;  // per device bit (devices 0..31)
  const unsigned bit = dev < 32 ? 1u << dev : 0u;
  auto* kern = tiled::matmul_sparse24_tiled<INT8, WN, WM, MT>;
  if (bit == 0 || (unusable & bit)) return -1;
  if (!(ready & bit)) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess || attr.ptxVersion < 80 || attr.binaryVersion < 80) {
      cudaGetLastError();
      unusable |= bit;
      return -1;
    }
    const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
    if (e != cudaSuccess) return static_cast<int>(e);
    ready |= bit;
  }
  const dim3 grid((M + C::BM - 1) / C::BM, (N + C::BN - 1) / C::BN);
  if (grid.y > 65535) return -1;
  kern<<<grid, C::kThreads, C::kSmem, s>>>(static_cast<const u8*>(X), static_cast<const u8*>(values),
                                            static_cast<const u8*>(indices), w_scale, w_rowsum, a_scale, a_zp, Y, M,
                                            N, K);
  return static_cast<int>(cudaGetLastError());
}

constexpr int kTiledBN[] = {128, 128, 64, 64};  // per config (matmul_sparse24_tiled.cuh)
constexpr int kTiledBM[] = {128, 64, 64, 32};

// The tiled path when the mode and the shape allow it: returns its cudaError_t, or -1 for "use the reference".
template <bool INT8>
int try_tiled(const void* X, const void* values, const void* indices, const float* w_scale, const int* w_rowsum,
              float a_scale, int a_zp, void* Y, int M, int N, int K, void* stream) {
  using namespace edgekit_sp24;
  const int mode = path_mode();
  if (mode == kPathReference) return -1;
  if (mode == kPathAuto && M < kTiledMinM) return -1;
  if (K % tiled::KT<INT8>::kStageK != 0 || !aligned16(X) || !aligned16(values) || !aligned16(indices)) return -1;
  int dev = 0, major = 0, sms = 1;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) {
    cudaGetLastError();
    return -1;
  }
  if (major < 8) return -1;
  int cfg = tiled::kConfigs - 1;
  if (mode >= kPathTiledConfig0 && mode < kPathTiledConfig0 + tiled::kConfigs) {
    cfg = mode - kPathTiledConfig0;
  } else {  // the biggest tile that still gives every SM a block
    for (int c = 0; c < tiled::kConfigs; ++c) {
      const long long blocks = static_cast<long long>((M + kTiledBM[c] - 1) / kTiledBM[c]) * ((N + kTiledBN[c] - 1) / kTiledBN[c]);
      if (blocks >= sms) {
        cfg = c;
        break;
      }
    }
  }
  auto s = static_cast<cudaStream_t>(stream);
  int rc = -1;
  switch (cfg) {
#define EDGEKIT_SP24_TILED_CASE(C, WN, WM, MT)                                                                   \
  case C:                                                                                                        \
    rc = launch_tiled<INT8, WN, WM, MT>(X, values, indices, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K, s, dev); \
    break;
    EDGEKIT_SP24_TILED_CONFIGS(EDGEKIT_SP24_TILED_CASE)
#undef EDGEKIT_SP24_TILED_CASE
    default:
      break;
  }
  if (rc == 0) g_last_path = kPathTiledConfig0 + cfg;
  return rc;
}

template <bool INT8>
int launch(const void* X, const void* values, const void* indices, const float* w_scale, const int* w_rowsum,
           float a_scale, int a_zp, void* Y, int M, int N, int K, void* stream) {
  using namespace edgekit_sp24;
  if (M < 0 || N <= 0 || K <= 0 || K % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return 0;
  const int elem = INT8 ? 1 : 2;
  const int x_aligned = aligned16(X) && (static_cast<long long>(K) * elem) % 16 == 0;
  const int v_aligned = aligned16(values) && (static_cast<long long>(K / 2) * elem) % 16 == 0;
  const int tiled_rc = try_tiled<INT8>(X, values, indices, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K, stream);
  if (tiled_rc >= 0) return tiled_rc;
  g_last_path = kPathReference;
  const int mt = tile_mt(M);
  const dim3 grid((N + kBN - 1) / kBN, (M + 8 * mt - 1) / (8 * mt));
  if (grid.y > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const auto* x = static_cast<const u8*>(X);
  const auto* v = static_cast<const u8*>(values);
  const auto* ix = static_cast<const u8*>(indices);
  auto s = static_cast<cudaStream_t>(stream);
  switch (mt) {
    case 1:
      matmul_sparse24<INT8, 1><<<grid, kThreads, 0, s>>>(x, v, ix, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K,
                                                         x_aligned, v_aligned);
      break;
    case 2:
      matmul_sparse24<INT8, 2><<<grid, kThreads, 0, s>>>(x, v, ix, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K,
                                                         x_aligned, v_aligned);
      break;
    case 4:
      matmul_sparse24<INT8, 4><<<grid, kThreads, 0, s>>>(x, v, ix, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K,
                                                         x_aligned, v_aligned);
      break;
    default:
      matmul_sparse24<INT8, 8><<<grid, kThreads, 0, s>>>(x, v, ix, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K,
                                                         x_aligned, v_aligned);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Y (fp16 [M, N]) = X (fp16 [M, K]) @ W^T, W given as fp16 values [N, K/2] + indices [N, ceil(K/8)]. Device
// pointers, `stream` a cudaStream_t (null: default stream). Returns a cudaError_t value (0 on success). Async.
extern "C" int edgekit_matmul_sparse24_f16(const void* X, const void* values, const void* indices, void* Y, int M,
                                           int N, int K, void* stream) {
  return launch<false>(X, values, indices, nullptr, nullptr, 0.f, 0, Y, M, N, K, stream);
}

// Y (fp32 [M, N]) = a_scale * w_scale[n] * ((X_u8 - a_zp) @ q^T), q int8 values [N, K/2] + indices; w_rowsum
// (int32 [N], sparse24.row_sums) may be null when a_zp == 0.
extern "C" int edgekit_matmul_sparse24_s8(const void* X, const void* values, const void* indices,
                                          const float* w_scale, const int* w_rowsum, float a_scale, int a_zp,
                                          float* Y, int M, int N, int K, void* stream) {
  if (a_zp < 0 || a_zp > 255 || (a_zp != 0 && w_rowsum == nullptr) || w_scale == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  return launch<true>(X, values, indices, w_scale, w_rowsum, a_scale, a_zp, Y, M, N, K, stream);
}

// Path selection for both launchers (see path_mode above): 0 auto, 1 reference kernel, 2 tiled when the shape
// qualifies, 10 + c tiled config c (0..3) when it qualifies; -1 re-reads $EDGEKIT_SP24_PATH. Returns the previous
// mode, or -1 for an unknown mode (nothing changed). Not thread-safe against concurrent launches.
extern "C" int edgekit_matmul_sparse24_set_path(int mode) {
  const bool ok = mode == -1 || mode == kPathAuto || mode == kPathReference || mode == kPathTiled ||
                  (mode >= kPathTiledConfig0 && mode < kPathTiledConfig0 + edgekit_sp24::tiled::kConfigs);
  if (!ok) return -1;
  const int prev = path_mode();
  g_path = mode;
  return prev;
}

// The path the last successful launch took: 1 reference kernel, 10 + c tiled config c (0 before any launch).
extern "C" int edgekit_matmul_sparse24_last_path(void) { return g_last_path; }

// `count` independent instructions (mma_layout's probes batch hundreds per launch).
extern "C" int edgekit_mma_sp_probe(int kind, const void* A, const void* B, const void* E, void* D, int count,
                                    void* stream) {
  if ((kind != 0 && kind != 1) || count <= 0 || count > 65535) return static_cast<int>(cudaErrorInvalidValue);
  edgekit_sp24::mma_sp_probe<<<count, 32, 0, static_cast<cudaStream_t>(stream)>>>(
      kind, static_cast<const unsigned*>(A), static_cast<const unsigned*>(B), static_cast<const unsigned*>(E),
      static_cast<unsigned*>(D));
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* edgekit_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

#endif  // EDGEKIT_NO_HOST
