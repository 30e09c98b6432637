// Tiled sm_80+ path of ai.edgekit::MatMulSparse24 (included by matmul_sparse24.cu inside namespace edgekit_sp24,
// after Acc, u8/u32/i64 and mma_sp). Same formats and results as matmul_sparse24<INT8, MT>; faster tiling:
//
// - block tile BN weight rows x BM tokens, WN x WM warps, each warp 32 rows (two m16 A fragments) x 8*MT tokens
//   (MT n8 B fragments): 2*MT mma.sp per k-step, every A fragment reused MT times, every B fragment twice;
// - a kStages-deep cp.async ring (global -> shared) of stages of kStageK dense K: 128 bytes of each X row, 64 bytes
//   of each values row, 8 (f16) / 16 (s8) bytes of each indices row; one __syncthreads per stage, 2 k-steps each;
// - smem rows padded (X 144 bytes, values 80 bytes) so the 8 row addresses of each ldmatrix phase hit 8 distinct
//   16-byte bank groups; A and B fragments both come from ldmatrix.x4 (the fragments are byte-addressed the same
//   for f16 and s8, so one template serves both, as in the reference kernel);
// - metadata registers built exactly as mma_layout.kernel_metadata (measured on an H100): f16 one __byte_perm of
//   the index words of rows g and g + 8; s8 one whole word of row g + 8 (t & 1).
// tests/test_kernels_cuda.py feeds the byte offsets below (load_stage, the ldmatrix lane addresses, the metadata
// offsets, the epilogue) through the numpy register model; keep the two in sync.
//
// Shapes: any M, N (rows past the edges are loaded clamped to the last row, their outputs not written); K a
// multiple of kStageK (64 f16, 128 s8) and 16-byte aligned X, values and indices: the launcher checks
// (tiled_supported) and uses the reference kernel otherwise.

namespace tiled {

constexpr int kStages = 3;
constexpr int kXBytes = 128;         // bytes of an X row per stage
constexpr int kVBytes = 64;          // bytes of a values row per stage
constexpr int kXS = kXBytes + 16;    // padded smem row strides (conflict-free ldmatrix)
constexpr int kVS = kVBytes + 16;

template <bool INT8>
struct KT {
  static constexpr int kStageK = INT8 ? 128 : 64;  // dense K per stage = 2 instructions
  static constexpr int kMB = kStageK / 8;          // metadata bytes of a row per stage: 8 / 16
};

template <bool INT8, int WN, int WM, int MT>
struct Cfg {
  static constexpr int kThreads = 32 * WN * WM;
  static constexpr int BN = 32 * WN;
  static constexpr int BM = 8 * MT * WM;
  static constexpr int kMB = KT<INT8>::kMB;
  static constexpr int kXTile = BM * kXS;
  static constexpr int kVTile = BN * kVS;
  static constexpr int kMTile = BN * kMB;
  static constexpr int kStageBytes = kXTile + kVTile + kMTile;
  static constexpr int kSmem = kStages * kStageBytes;
  static_assert(kStageBytes % 16 == 0, "16-byte aligned stages");
  static_assert(BN <= kThreads, "one metadata copy per row and thread");
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async8(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Lane l supplies the address of row l % 8 of matrix l / 8; register i of lane l = bytes 4 (l % 4) .. + 3 of row
// l / 4 of matrix i (mma_layout.ldmatrix_x4).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
#endif

template <bool INT8, int WN, int WM, int MT>
__global__ void __launch_bounds__(32 * WN * WM)
    matmul_sparse24_tiled(const u8* __restrict__ X, const u8* __restrict__ V, const u8* __restrict__ I,
                          const float* __restrict__ w_scale, const int* __restrict__ w_rowsum, float a_scale,
                          int a_zp, void* __restrict__ Y, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = Cfg<INT8, WN, WM, MT>;
  using AccT = typename Acc<INT8>::T;
  constexpr int kMB = C::kMB;
  constexpr int kElem = INT8 ? 1 : 2;
  extern __shared__ __align__(16) u8 tsm[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wn = warp % WN;  // 32-row slice of the block's weight rows
  const int wm = warp / WN;  // 8*MT-token slice of the block's tokens
  const int g = lane >> 2;
  const int t = lane & 3;
  const int m0 = blockIdx.x * C::BM;  // token tiles vary fastest: blocks sharing weights run together
  const int n0 = blockIdx.y * C::BN;
  const i64 x_row = static_cast<i64>(K) * kElem;
  const i64 v_row = static_cast<i64>(K / 2) * kElem;
  const i64 i_row = K / 8;
  const int ktiles = K / KT<INT8>::kStageK;
  const u32 sbase = smem_u32(tsm);

  // Stage kt into ring slot `slot`: X rows [kXS], then values rows [kVS], then metadata rows [kMB].
  auto load_stage = [&](int kt, int slot) {
    const u32 st = sbase + slot * C::kStageBytes;
#pragma unroll
    for (int c = tid; c < C::BM * (kXBytes / 16); c += C::kThreads) {
      const int r = c / (kXBytes / 16);
      const int part = c % (kXBytes / 16);
      const i64 m = min(m0 + r, M - 1);
      cp_async16(st + r * kXS + 16 * part, X + m * x_row + static_cast<i64>(kt) * kXBytes + 16 * part);
    }
#pragma unroll
    for (int c = tid; c < C::BN * (kVBytes / 16); c += C::kThreads) {
      const int r = c / (kVBytes / 16);
      const int part = c % (kVBytes / 16);
      const i64 n = min(n0 + r, N - 1);
      cp_async16(st + C::kXTile + r * kVS + 16 * part, V + n * v_row + static_cast<i64>(kt) * kVBytes + 16 * part);
    }
    if (tid < C::BN) {
      const i64 n = min(n0 + tid, N - 1);
      const u8* src = I + n * i_row + static_cast<i64>(kt) * kMB;
      const u32 dst = st + C::kXTile + C::kVTile + tid * kMB;
      if constexpr (INT8) {
        cp_async16(dst, src);
      } else {
        cp_async8(dst, src);
      }
    }
  };

  AccT acc[2][MT][4];
#pragma unroll
  for (int af = 0; af < 2; ++af)
#pragma unroll
    for (int nf = 0; nf < MT; ++nf)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[af][nf][i] = AccT(0);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; slot (kt - 1) % kStages is free
    {
      const int nk = kt + kStages - 1;
      if (nk < ktiles) load_stage(nk, nk % kStages);
      cp_async_commit();
    }
    const int slot = kt % kStages;
    const u32 xs = sbase + slot * C::kStageBytes;
    const u32 vs = xs + C::kXTile;
    const u8* ms = tsm + slot * C::kStageBytes + C::kXTile + C::kVTile;
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // the stage's two instructions along K
      u32 a[2][4];
      u32 e[2];
#pragma unroll
      for (int af = 0; af < 2; ++af) {
        // A: rows wn*32 + 16af + (lane & 15), compressed bytes 32j + 16 (lane >> 4) -> mma_layout.a_coords.
        ldmatrix_x4(a[af], vs + (wn * 32 + 16 * af + (lane & 15)) * kVS + 32 * j + 16 * (lane >> 4));
        const int row = wn * 32 + 16 * af;
        if constexpr (INT8) {
          e[af] = *reinterpret_cast<const u32*>(ms + (row + g + 8 * (t & 1)) * kMB + 4 * (2 * j + (t >> 1)));
        } else {
          const u32 lo = *reinterpret_cast<const u32*>(ms + (row + g) * kMB + 4 * j);
          const u32 hi = *reinterpret_cast<const u32*>(ms + (row + g + 8) * kMB + 4 * j);
          e[af] = __byte_perm(lo, hi, (t & 1) ? 0x7632 : 0x5410);
        }
      }
#pragma unroll
      for (int nf = 0; nf < MT; ++nf) {
        // B: tokens wm*8MT + 8nf + (lane & 7), X bytes 64j + 16 (lane >> 3) -> mma_layout.b_coords.
        u32 b[4];
        ldmatrix_x4(b, xs + (wm * 8 * MT + 8 * nf + (lane & 7)) * kXS + 64 * j + 16 * (lane >> 3));
#pragma unroll
        for (int af = 0; af < 2; ++af) mma_sp(acc[af][nf], a[af], b, e[af]);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: D[i] = row g + 8 (i >> 1), token 2t + (i & 1) of each fragment (mma_layout.d_coords).
#pragma unroll
  for (int af = 0; af < 2; ++af) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + wn * 32 + 16 * af + g + 8 * h;
      if (n >= N) continue;
      float scale = 0.f;
      int corr = 0;
      if constexpr (INT8) {
        scale = a_scale * __ldg(w_scale + n);
        corr = a_zp != 0 ? a_zp * __ldg(w_rowsum + n) : 0;
      }
#pragma unroll
      for (int nf = 0; nf < MT; ++nf) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int m = m0 + wm * 8 * MT + 8 * nf + 2 * t + q;
          if (m >= M) continue;
          const AccT v = acc[af][nf][2 * h + q];
          if constexpr (INT8) {
            static_cast<float*>(Y)[static_cast<i64>(m) * N + n] = scale * static_cast<float>(v - corr);
          } else {
            static_cast<unsigned short*>(Y)[static_cast<i64>(m) * N + n] = f2h(v);
          }
        }
      }
    }
  }
#else
  (void)X, (void)V, (void)I, (void)w_scale, (void)w_rowsum, (void)a_scale, (void)a_zp, (void)Y;
  (void)M, (void)N, (void)K;
#endif
}

// Configurations (index = the launcher's tiled config number, build.SPARSE24_TILED_CONFIGS mirrors it):
// 0: 128 x 128 (4 x 2 warps, MT 8), 1: 128 x 64 (4 x 2, MT 4), 2: 64 x 64 (2 x 2, MT 4), 3: 64 x 32 (2 x 2, MT 2).
#define EDGEKIT_SP24_TILED_CONFIGS(X) X(0, 4, 2, 8) X(1, 4, 2, 4) X(2, 2, 2, 4) X(3, 2, 2, 2)
constexpr int kConfigs = 4;

#define EDGEKIT_SP24_TILED_INST(C, WN, WM, MT)                                                               \
  template __global__ void matmul_sparse24_tiled<false, WN, WM, MT>(                                         \
      const u8*, const u8*, const u8*, const float*, const int*, float, int, void*, int, int, int);          \
  template __global__ void matmul_sparse24_tiled<true, WN, WM, MT>(                                          \
      const u8*, const u8*, const u8*, const float*, const int*, float, int, void*, int, int, int);
EDGEKIT_SP24_TILED_CONFIGS(EDGEKIT_SP24_TILED_INST)
#undef EDGEKIT_SP24_TILED_INST

}  // namespace tiled
