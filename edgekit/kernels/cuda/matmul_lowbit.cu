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
// Compile: nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC (edgekit/kernels/cuda/build.py). With
// -DEDGEKIT_NO_HOST only the kernels remain (no includes), which is what NVRTC / CuPy RawModule compile.

#ifndef EDGEKIT_NO_HOST
#include <cuda_runtime.h>
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

}  // namespace edgekit

#ifndef EDGEKIT_NO_HOST

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
  switch (bits) {
    case 2: return static_cast<int>(launch_bits<2>(A, B, scales, zp, Y, M, N, K, group_size, s));
    case 3: return static_cast<int>(launch_bits<3>(A, B, scales, zp, Y, M, N, K, group_size, s));
    case 4: return static_cast<int>(launch_bits<4>(A, B, scales, zp, Y, M, N, K, group_size, s));
    case 8: return static_cast<int>(launch_bits<8>(A, B, scales, zp, Y, M, N, K, group_size, s));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* edgekit_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

#endif  // EDGEKIT_NO_HOST
