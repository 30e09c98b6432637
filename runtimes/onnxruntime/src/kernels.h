// edgekit ONNX Runtime custom ops: kernel interface shared by the scalar, AVX2 and AVX-512 implementations.
//
// The op specifications (packing, math) are edgekit/kernels/lowbit.py and edgekit/kernels/sparse24.py. Every
// kernel here computes output rows [n0, n1) of Y for all M activation rows; the caller splits N across threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace edgekit {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
Isa detect_isa();  // the best path this CPU supports (cpuid)

// MatMulLowBit weights and activations for one call.
struct LowBitArgs {
  int64_t M = 0, K = 0, N = 0;
  int bits = 4, group = 32;
  int64_t Kp = 0;         // K padded to a whole number of groups
  int64_t groups = 0;     // Kp / group
  int64_t row_bytes = 0;  // packed bytes per row of B
  const uint8_t* B = nullptr;
  const float* scales = nullptr;       // [N, groups]
  const uint8_t* zero_points = nullptr;  // [N, groups] or null (symmetric: 2^(bits-1))
  float* Y = nullptr;                  // [M, N]
  // fp32 path: activations [M, lda] with zeros (or nothing read) past K; lda >= Kp64.
  const float* A = nullptr;
  int64_t lda = 0;
  bool f32_reordered = false;  // A re-ordered by the ISA's lowbit_f32_prepare
  // int8 path: A quantized per row, asymmetric (uint8 levels shifted by -128): a ~= (aq - a_zero[m]) * a_scale[m];
  // aq [M, lda_q] (zeros past K, lda_q a multiple of 256 >= Kp), asum [M, groups] = sum of aq over each group.
  // The kernels compute a_scale[m] * sum_g s (sum_k q aq - zp asum); the a_zero term (a_scale a_zero times the
  // column sums of the dequantized weight) is subtracted by the caller (edgekit_ort.cc, the epilogue).
  const int8_t* aq = nullptr;
  int64_t lda_q = 0;
  const float* a_scale = nullptr;
  const int32_t* asum = nullptr;
};

// MatMulSparse24 for one call.
struct Sparse24Args {
  int64_t M = 0, K = 0, N = 0;
  const void* values = nullptr;   // float [N, K/2] or int8 [N, K/2]
  bool int8_values = false;
  const uint8_t* indices = nullptr;  // [N, ceil(K/8)]
  int64_t index_row_bytes = 0;
  const float* w_scale = nullptr;  // [N] (int8 values)
  float* Y = nullptr;
  // float activations [M, lda] (lda >= K rounded up to 128, zeros past K) ...
  const float* A = nullptr;
  // ... or uint8 activations [M, lda] (zeros past K) with a scale and a zero point.
  const uint8_t* A_u8 = nullptr;
  int64_t lda = 0;
  float a_scale = 1.f;
  int32_t a_zero_point = 0;
};

struct KernelTable {
  void (*lowbit_f32)(const LowBitArgs&, int64_t n0, int64_t n1);
  void (*lowbit_i8)(const LowBitArgs&, int64_t n0, int64_t n1);
  void (*sparse24_f32)(const Sparse24Args&, int64_t n0, int64_t n1);  // float activations (float or int8 values)
  void (*sparse24_u8)(const Sparse24Args&, int64_t n0, int64_t n1);   // uint8 activations, int8 values
  // Optional: rearrange a.aq (into buf) once per call before lowbit_i8 runs; null = natural order.
  void (*lowbit_i8_prepare)(LowBitArgs&, std::vector<int8_t>& buf);
  // Optional: rearrange a.A (into buf) once per call before lowbit_f32 runs; null = natural order.
  void (*lowbit_f32_prepare)(LowBitArgs&, std::vector<float>& buf);
};

// MatMulLowBit int8-activation weights re-packed once per kernel instance (constant B; see
// kernels_avx512_packed.cc for the layout): 16-row tiles, group-major, one int32 lane per row.
struct PackedLowBit {
  int bits = 0, group = 0;
  int64_t tiles = 0, groups = 0, tile_bytes = 0;
  std::vector<uint8_t> w;   // [tiles][tile_bytes]
  std::vector<float> s;     // [tiles][groups][16]
  std::vector<uint8_t> zp;  // [tiles][groups][16] or empty (symmetric)
};

// Asymmetric per-row 8-bit quantization of activation rows [m0, m1) of A [M, K] (see edgekit_ort.cc's
// quantize_rows_scalar, which this must match bit for bit): q [M, lda] (uint8 level - 128; zeros in [K, lda)),
// a_scale [M], a_zero [M] (the zero point, as q), asum [M, groups].
using QuantizeRowsFn = void (*)(const float* A, int64_t K, int64_t lda, int group, int64_t groups, int64_t m0,
                                int64_t m1, int8_t* q, float* a_scale, int32_t* a_zero, int32_t* asum);

struct PackedLowBitKernels {
  bool (*pack)(const LowBitArgs& a, PackedLowBit& out);  // a: B, scales, zero_points, N, K, bits, group
  // Y rows of tiles [t0, t1) for all M; a.aq in natural order (no lowbit_i8_prepare), a.asum as usual.
  void (*run)(const LowBitArgs& a, const PackedLowBit& pk, int64_t t0, int64_t t1);
  int tile_rows;
  QuantizeRowsFn quantize;  // the AVX-512 quantizer (any lowbit path of this ISA may use it)
};

const PackedLowBitKernels* packed_lowbit_avx512();  // null when not compiled in

// MatMulSparse24 int8 values re-packed once per kernel instance (constant values and indices; see
// kernels_avx512_sparse.cc): tiles of 16 rows (an even number of them), per step of 2 pairs of groups the tile's
// kept values and their positions.
struct PackedSparse24 {
  int64_t n = 0, tiles = 0, steps = 0;
  std::vector<uint8_t> data;    // [tiles][steps][2 x 64 value bytes, 64 position bytes]
  std::vector<int32_t> rowsum;  // [tiles * 16]: sum of each row's values (the zero-point term), 0 past n
};

struct PackedSparse24Kernels {
  bool (*pack)(const Sparse24Args& a, PackedSparse24& out);  // a: values (int8), indices, K, N
  // Y rows [n0, n1) for all M, from a.A_u8 (padded rows, as for sparse24_u8); n0 a multiple of row_block.
  void (*run)(const Sparse24Args& a, const PackedSparse24& pk, int64_t n0, int64_t n1);
  int64_t row_block;  // weight rows per register block (split N in multiples of it)
};

const PackedSparse24Kernels* packed_sparse24_avx512();  // null when not compiled in

// MatMulLowBit's fused activation (activation="Gelu"): Y = gelu(Y) in place for rows [m0, m1), columns [n0, n1)
// of Y [., ldy]; the exact (erf) GELU, vectorized for the given ISA (epilogue.cc).
void gelu_rows(Isa isa, float* Y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// MatMulLowBit's residual + LayerNorm epilogue over whole rows [m0, m1) of Y [M, N]: Y += skip (when given); then,
// with gamma, each row normalized (biased variance, + eps) and scaled by gamma (+ beta).
void residual_layernorm_rows(Isa isa, float* Y, int64_t N, const float* skip, const float* gamma, const float* beta,
                             float eps, int64_t m0, int64_t m1);

const KernelTable& kernels_scalar();
const KernelTable* kernels_avx2();    // null when not compiled in
const KernelTable* kernels_avx512();  // null when not compiled in

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace edgekit
