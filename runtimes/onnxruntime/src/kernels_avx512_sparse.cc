// AVX-512 VNNI MatMulSparse24 (int8 values, uint8 activations) for batches: the GEMM path, on weights re-packed
// once per kernel instance (constant values and indices).
//
// Lanes are weight rows (16 per vector, as in a dense int8 GEMM), so a weight vector holds, per pair of groups
// (8 dense positions), the 4 kept values of each of 16 rows, and the activation vector it multiplies must hold, in
// lane n, the 4 activations row n keeps. One `vpshufb` builds that vector from the 8 activations of the pair
// broadcast to every 128-bit lane (`vpbroadcastq`), with a per-lane index vector (the kept positions, 0-7): one
// in-lane shuffle and one `vpdpbusd` per 4 kept products per lane, twice dense int8's products per multiply.
//
// Why this shape (measured on the Zen 5 cores of these machines, register-resident probes; runtimes/onnxruntime/
// README.md): a 512-bit `vpdpbusd` issues at one per cycle; a `vpshufb` beside it costs ~0.45 cycle (they overlap),
// where a cross-lane `vpermt2b` gather per multiply and a pattern-table load per multiply (the two earlier designs)
// both capped the kernel near dense speed. A 512-bit load costs ~1.2 cycles here, so the weights and indices are
// loaded once per pair and reused by 8 activation rows, and the indices of two pairs share one vector (low and high
// nibble: `vpshufb` reads bits 0-3 and 7 of an index byte, positions are 0-7, so the high nibble never zeroes a
// lane, and one `vpsrlw` by 4 exposes the second pair's positions).
//
// Register block: 2 tiles (32 weight rows) x 8 activation rows = 16 accumulators, held in zmm0-15 by the inline
// assembly below (GCC 12 spills or copies accumulators of a 16-accumulator vpdpbusd block written with intrinsics:
// measured 8-20 % slower).
//
// Packed layout (PackedSparse24): tiles of 16 weight rows, their count rounded up to even (rows past N are zero);
// per tile, per step of 2 pairs (16 dense positions): 64 bytes of values of the first pair (lane n: the row's 4
// kept values, group 2j's two then group 2j+1's, in position order), 64 bytes of the second pair's, then 64 bytes of
// positions (byte b of lane n: position of value b in the first pair's 8 activations | that of the second pair's
// << 4). 0.75 bytes per dense position (the op's own format: 0.625). Row sums of the values give the zero-point term.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace edgekit {
namespace {

constexpr int64_t kStepBytes = 192;  // per tile and step: 2 x 64 value bytes, 64 position bytes
constexpr int kRows = 8;             // activation rows per block

bool pack(const Sparse24Args& a, PackedSparse24& out) {
  if (!a.int8_values || a.K % 4 || a.N < 1) return false;
  const int64_t groups = a.K / 4, kept = a.K / 2, pairs = (groups + 1) / 2;
  out.n = a.N, out.tiles = (a.N + 31) / 32 * 2, out.steps = (pairs + 1) / 2;
  out.data.assign(static_cast<size_t>(out.tiles * out.steps * kStepBytes), 0);
  out.rowsum.assign(static_cast<size_t>(out.tiles * 16), 0);
  const int8_t* values = static_cast<const int8_t*>(a.values);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t lane = n % 16;
    int32_t sum = 0;
    for (int64_t p = 0; p < pairs; ++p) {
      uint8_t* step = out.data.data() + ((n / 16) * out.steps + p / 2) * kStepBytes;
      uint8_t* w = step + 64 * (p % 2) + 4 * lane;
      uint8_t* pos = step + 128 + 4 * lane;
      for (int h = 0; h < 2; ++h) {
        const int64_t g = 2 * p + h;
        if (g >= groups) break;  // a missing last group: values 0 (positions 0)
        // the nibble's positions as the unpacked kernels read them (i0 = bits 0-1, i1 = bits 2-3)
        const int nibble = (a.indices[n * a.index_row_bytes + g / 2] >> (4 * (g % 2))) & 15;
        for (int e = 0; e < 2; ++e) {
          const int8_t v = values[n * kept + 2 * g + e];
          w[2 * h + e] = static_cast<uint8_t>(v);
          pos[2 * h + e] |= static_cast<uint8_t>((4 * h + ((nibble >> (2 * e)) & 3)) << (4 * (p % 2)));
          sum += v;
        }
      }
    }
    out.rowsum[static_cast<size_t>(n)] = sum;
  }
  return true;
}

// One activation row (address `addr`, accumulators zmm`r` and zmm`r2` for the two tiles): broadcast the pair's 8
// activations, select each lane's 4 (zmm17 / zmm19: the tiles' positions), multiply by the values (zmm16 / zmm18).
#define EK_ROW(addr, r, r2)                                                                             \
  "vpbroadcastq " addr ", %%zmm20\n\t"                                                                  \
  "vpshufb %%zmm17, %%zmm20, %%zmm21\n\t"                                                               \
  "vpshufb %%zmm19, %%zmm20, %%zmm22\n\t"                                                               \
  "vpdpbusd %%zmm16, %%zmm21, %%zmm" #r "\n\t"                                                          \
  "vpdpbusd %%zmm18, %%zmm22, %%zmm" #r2 "\n\t"
#define EK_ROWS(off)                                                                                    \
  EK_ROW(off "(%[a0])", 0, 8) EK_ROW(off "(%[a0],%[lda])", 1, 9) EK_ROW(off "(%[a0],%[lda],2)", 2, 10) \
  EK_ROW(off "(%[a0],%[lda3])", 3, 11) EK_ROW(off "(%[a4])", 4, 12) EK_ROW(off "(%[a4],%[lda])", 5, 13) \
  EK_ROW(off "(%[a4],%[lda],2)", 6, 14) EK_ROW(off "(%[a4],%[lda3])", 7, 15)
#define EK_ZERO(r) "vpxord %%zmm" #r ", %%zmm" #r ", %%zmm" #r "\n\t"
#define EK_STORE(r) "vmovdqa64 %%zmm" #r ", " #r "*64(%[out])\n\t"

// int32 sums of 8 activation rows (A, stride lda; 16 bytes readable past every pair) with tiles t and t + 1:
// out[16][16] (tile t's rows 0-7, then tile t + 1's).
EK_TARGET void block(const PackedSparse24& pk, const uint8_t* A, int64_t lda, int64_t t, int32_t* out) {
  const uint8_t* a0 = A;
  const uint8_t* a4 = A + 4 * lda;
  const uint8_t* p = pk.data.data() + t * pk.steps * kStepBytes;
  const int64_t lda3 = 3 * lda, ts = pk.steps * kStepBytes;
  int64_t count = pk.steps;
  asm volatile(
      EK_ZERO(0) EK_ZERO(1) EK_ZERO(2) EK_ZERO(3) EK_ZERO(4) EK_ZERO(5) EK_ZERO(6) EK_ZERO(7)
      EK_ZERO(8) EK_ZERO(9) EK_ZERO(10) EK_ZERO(11) EK_ZERO(12) EK_ZERO(13) EK_ZERO(14) EK_ZERO(15)
      "1:\n\t"
      "vmovdqu64 128(%[p]), %%zmm17\n\t"
      "vmovdqu64 128(%[p],%[ts]), %%zmm19\n\t"
      "vmovdqu64 (%[p]), %%zmm16\n\t"
      "vmovdqu64 (%[p],%[ts]), %%zmm18\n\t"
      EK_ROWS("0")
      "vpsrlw $4, %%zmm17, %%zmm17\n\t"
      "vpsrlw $4, %%zmm19, %%zmm19\n\t"
      "vmovdqu64 64(%[p]), %%zmm16\n\t"
      "vmovdqu64 64(%[p],%[ts]), %%zmm18\n\t"
      EK_ROWS("8")
      "add $16, %[a0]\n\t"
      "add $16, %[a4]\n\t"
      "add $192, %[p]\n\t"
      "dec %[count]\n\t"
      "jnz 1b\n\t"
      EK_STORE(0) EK_STORE(1) EK_STORE(2) EK_STORE(3) EK_STORE(4) EK_STORE(5) EK_STORE(6) EK_STORE(7)
      EK_STORE(8) EK_STORE(9) EK_STORE(10) EK_STORE(11) EK_STORE(12) EK_STORE(13) EK_STORE(14) EK_STORE(15)
      : [a0] "+r"(a0), [a4] "+r"(a4), [p] "+r"(p), [count] "+r"(count)
      : [lda] "r"(lda), [lda3] "r"(lda3), [ts] "r"(ts), [out] "r"(out)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22");
  static_assert(kStepBytes == 192 && kRows == 8, "the assembly's strides and registers");
}

// Y[m0 + r, n] = (s - a_zero * rowsum[n]) * a_scale * w_scale[n] in double (the reference's order), for rows
// r < rows and columns n in [n, n1) of tile t.
EK_TARGET void store(const Sparse24Args& a, const PackedSparse24& pk, const int32_t* s, int64_t t, int64_t m0,
                     int rows, int64_t n1) {
  const int64_t n = 16 * t;
  if (n >= n1) return;
  const __mmask16 mask = static_cast<__mmask16>(n1 - n >= 16 ? 0xFFFF : (1u << (n1 - n)) - 1);
  const __m512i z = _mm512_mullo_epi32(_mm512_set1_epi32(a.a_zero_point), _mm512_loadu_si512(pk.rowsum.data() + n));
  const __m512 ws = _mm512_maskz_loadu_ps(mask, a.w_scale + n);
  const __m512d as = _mm512_set1_pd(static_cast<double>(a.a_scale));
  const __m512d ws_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(ws));
  const __m512d ws_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ws), 1)));
  for (int r = 0; r < rows; ++r) {
    const __m512i v = _mm512_sub_epi32(_mm512_load_si512(s + 16 * r), z);
    const __m512d lo = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(v)), as), ws_lo);
    const __m512d hi = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1)), as), ws_hi);
    const __m512 y = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
    _mm512_mask_storeu_ps(a.Y + (m0 + r) * a.N + n, mask, y);
  }
}

EK_TARGET void run(const Sparse24Args& a, const PackedSparse24& pk, int64_t n0, int64_t n1) {
  // the last block of rows (M % 8 of them) runs on a zero-padded copy
  thread_local std::vector<uint8_t> tail;
  const int64_t full = a.M / kRows * kRows, left = a.M - full;
  if (left) {
    tail.assign(static_cast<size_t>(kRows * a.lda + 16), 0);
    std::memcpy(tail.data(), a.A_u8 + full * a.lda, static_cast<size_t>(left * a.lda));
  }
  alignas(64) int32_t s[2 * kRows * 16];
  for (int64_t t = n0 / 32 * 2; 16 * t < n1; t += 2)
    for (int64_t m0 = 0; m0 < a.M; m0 += kRows) {
      const bool whole = m0 < full;
      block(pk, whole ? a.A_u8 + m0 * a.lda : tail.data(), a.lda, t, s);
      const int rows = whole ? kRows : static_cast<int>(left);
      store(a, pk, s, t, m0, rows, n1);
      store(a, pk, s + kRows * 16, t + 1, m0, rows, n1);
    }
}

}  // namespace

const PackedSparse24Kernels* packed_sparse24_avx512() {
  static const PackedSparse24Kernels k{pack, run, 32};
  return &k;
}

}  // namespace edgekit
