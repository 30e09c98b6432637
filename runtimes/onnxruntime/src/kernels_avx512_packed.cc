// AVX-512 VNNI MatMulLowBit, accuracy_level 4, on weights re-packed once per kernel instance (constant B).
//
// Layout (PackedLowBit, built by pack_lowbit from the spec's row bitstreams; lowbit.py is unchanged):
// rows are taken 16 at a time (a "tile"; the last one padded with zero rows); for each tile and each group, the
// group's codes of the 16 rows are stored as 64-byte vectors whose int32 lane l belongs to row l of the tile.
// A code of b bits (b = 2, 4, 8; 3 = a 2-bit plane for bits 0-1 followed by a 1-bit plane for bit 2) is stored
// in "planes" of width w (8/w codes per byte): in vector v of a plane, byte j of lane l, bits w*p .. w*p+w-1
// hold code 4*(8/w)*v + 4*p + j of the group (row l). So for crumb/nibble p, all 16 lanes need the same four
// consecutive activations: vpdpbusd with an embedded dword broadcast of the natural-order int8 activations, no
// shuffles, no horizontal sums. The codes are isolated with one AND each, without shifting: lane sums of
// (code << w*p) are shifted back (exactly) once per group. Batches of >= 8 rows (2/4/8-bit) instead take two tiles
// per pass and shift each field down (srl + AND per weight vector) into one accumulator per row and tile. Per group and tile: dot - zp * asum (int32), one
// conversion and one FMA with the 16 rows' scales (stored [tile][group][16]). Y of a tile is one vector store.
// Each thread streams whole tiles: one sequential stream, prefetched ahead.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))
#define EK_INLINE EK_TARGET inline __attribute__((always_inline))

namespace edgekit {
namespace {

constexpr int kTile = 16;
#ifndef EK_PF_BYTES
#define EK_PF_BYTES 2048  // software prefetch distance along the tile stream
#endif

// Code k of a packed row (the spec's little-endian bitstream; any width).
inline int get_code(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  unsigned v = byte < row_bytes ? row[byte] : 0u;
  if (byte + 1 < row_bytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
  return static_cast<int>((v >> (bit & 7)) & ((1u << bits) - 1u));
}

struct Plane {
  int width, shift;  // code bits [shift, shift + width)
};

inline int planes_of(int bits, Plane* pl) {
  if (bits == 3) {
    pl[0] = {2, 0}, pl[1] = {1, 2};
    return 2;
  }
  pl[0] = {bits, 0};
  return 1;
}

bool pack_lowbit(const LowBitArgs& a, PackedLowBit& out) {
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) return false;
  Plane pl[2];
  const int np = planes_of(a.bits, pl);
  const int64_t tiles = (a.N + kTile - 1) / kTile, G = a.group;
  const int64_t tile_group_bytes = kTile * G * a.bits / 8;
  out.bits = a.bits, out.group = a.group, out.tiles = tiles, out.groups = a.groups;
  out.tile_bytes = tile_group_bytes * a.groups;
  out.w.assign(static_cast<size_t>(tiles * out.tile_bytes), 0);
  out.s.assign(static_cast<size_t>(tiles * a.groups * kTile), 0.f);
  out.zp.clear();
  if (a.zero_points) out.zp.assign(static_cast<size_t>(tiles * a.groups * kTile), 0);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t t = n / kTile, l = n % kTile;
    const uint8_t* row = a.B + n * a.row_bytes;
    for (int64_t g = 0; g < a.groups; ++g) {
      uint8_t* dst = out.w.data() + t * out.tile_bytes + g * tile_group_bytes;
      out.s[(t * a.groups + g) * kTile + l] = a.scales[n * a.groups + g];
      if (a.zero_points) out.zp[(t * a.groups + g) * kTile + l] = a.zero_points[n * a.groups + g];
      for (int i = 0; i < np; ++i) {
        const int w = pl[i].width, P = 8 / w, per_vec = 4 * P;
        for (int64_t c = 0; c < G; ++c) {
          const int code = get_code(row, a.row_bytes, g * G + c, a.bits);
          const int part = (code >> pl[i].shift) & ((1 << w) - 1);
          const int64_t v = c / per_vec, p = (c % per_vec) / 4, j = c % 4;
          dst[v * 64 + 4 * l + j] |= static_cast<uint8_t>(part << (w * p));
        }
        dst += 64 * (G / per_vec);
      }
    }
  }
  return true;
}

// One plane of one group: accumulate into acc[m][ACC0 + p] (mask-only) for MT activation rows.
template <int W, int MT, int NACC, int ACC0>
EK_INLINE void plane_group(const uint8_t*& wp, const int8_t* const* ag, int G, __m512i (&acc)[MT][NACC]) {
  constexpr int P = 8 / W, per_vec = 4 * P;
  const int nv = G / per_vec;
  for (int v = 0; v < nv; ++v) {
    const __m512i w = _mm512_loadu_si512(wp);
    _mm_prefetch(reinterpret_cast<const char*>(wp) + EK_PF_BYTES, _MM_HINT_T0);
    wp += 64;
    for (int p = 0; p < P; ++p) {
      const __m512i c =
          W == 8 ? w : _mm512_and_si512(w, _mm512_set1_epi8(static_cast<char>(((1 << W) - 1) << (W * p))));
      for (int m = 0; m < MT; ++m) {
        int32_t d;
        std::memcpy(&d, ag[m] + per_vec * v + 4 * p, 4);
        acc[m][ACC0 + p] = _mm512_dpbusd_epi32(acc[m][ACC0 + p], c, _mm512_set1_epi32(d));
      }
    }
  }
}

// Tile t (rows 16t .. 16t+15) x activation rows m0 .. m0+MT-1. BITS in {2, 3, 4, 8}.
template <int BITS, int MT>
EK_TARGET void packed_tile(const LowBitArgs& a, const PackedLowBit& pk, int64_t t, int64_t m0) {
  constexpr int W0 = BITS == 3 ? 2 : BITS, P0 = 8 / W0, P1 = BITS == 3 ? 8 : 0, NACC = P0 + P1;
  const int G = a.group;
  const uint8_t* wp = pk.w.data() + t * pk.tile_bytes;
  const float* sp = pk.s.data() + t * pk.groups * kTile;
  const uint8_t* zp = pk.zp.empty() ? nullptr : pk.zp.data() + t * pk.groups * kTile;
  const int32_t sym = 1 << (BITS - 1);
  __m512 facc[MT];
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pk.groups; ++g) {
    __m512i acc[MT][NACC];
    for (int m = 0; m < MT; ++m)
      for (int i = 0; i < NACC; ++i) acc[m][i] = _mm512_setzero_si512();
    const int8_t* ag[MT];
    for (int m = 0; m < MT; ++m) ag[m] = a.aq + (m0 + m) * a.lda_q + g * G;
    plane_group<W0, MT, NACC, 0>(wp, ag, G, acc);
    if (BITS == 3) plane_group<1, MT, NACC, P0>(wp, ag, G, acc);
    const __m512 s = _mm512_loadu_ps(sp + g * kTile);
    __m512i z = _mm512_setzero_si512();
    if (zp) z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kTile)));
    for (int m = 0; m < MT; ++m) {
      __m512i dot = acc[m][0];
      for (int p = 1; p < P0; ++p) dot = _mm512_add_epi32(dot, _mm512_srai_epi32(acc[m][p], W0 * p));
      if (BITS == 3) {
        __m512i hi = acc[m][P0];
        for (int p = 1; p < 8; ++p) hi = _mm512_add_epi32(hi, _mm512_srai_epi32(acc[m][P0 + p], p));
        dot = _mm512_add_epi32(dot, _mm512_slli_epi32(hi, 2));
      }
      const int32_t as = a.asum[(m0 + m) * a.groups + g];
      const __m512i corr = zp ? _mm512_mullo_epi32(z, _mm512_set1_epi32(as)) : _mm512_set1_epi32(sym * as);
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, corr)), s, facc[m]);
    }
  }
  const int64_t n0 = t * kTile, left = a.N - n0;
  const __mmask16 om = left >= kTile ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  for (int m = 0; m < MT; ++m)
    _mm512_mask_storeu_ps(a.Y + (m0 + m) * a.N + n0, om, _mm512_mul_ps(facc[m], _mm512_set1_ps(a.a_scale[m0 + m])));
}

// Batched path (>= 8 rows), two tiles (32 outputs) x MT activation rows per pass, shifted code fields (srl +
// AND per weight vector), one int32 accumulator per row and tile. Each broadcast activation dword feeds two
// vpdpbusd (one per tile): on Zen 4 a vpdpbusd with an embedded {1to16} memory broadcast, or one broadcast per
// vpdpbusd, runs at about half the register-operand rate. Tile t + 1 must exist (tile t is then full).
template <int BITS, int MT>
EK_TARGET void packed_tile2(const LowBitArgs& a, const PackedLowBit& pk, int64_t t, int64_t m0) {
  constexpr int W = BITS, P = 8 / W, per_vec = 4 * P;
  const int G = a.group, nv = G / per_vec;
  const int64_t tb = pk.tile_bytes, sg = pk.groups * kTile;
  const uint8_t* wp = pk.w.data() + t * tb;
  const float* sp = pk.s.data() + t * sg;
  const uint8_t* zp = pk.zp.empty() ? nullptr : pk.zp.data() + t * sg;
  const int32_t sym = 1 << (BITS - 1);
  const __m512i low = _mm512_set1_epi8(static_cast<char>((1 << W) - 1));
  __m512 facc[MT][2];
  for (int m = 0; m < MT; ++m) facc[m][0] = facc[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pk.groups; ++g) {
    __m512i acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    const int8_t* ag[MT];
    for (int m = 0; m < MT; ++m) ag[m] = a.aq + (m0 + m) * a.lda_q + g * G;
    for (int v = 0; v < nv; ++v, wp += 64) {
      const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + tb);
      for (int p = 0; p < P; ++p) {
        const __m512i c0 = W == 8 ? w0 : _mm512_and_si512(_mm512_srli_epi16(w0, W * p), low);
        const __m512i c1 = W == 8 ? w1 : _mm512_and_si512(_mm512_srli_epi16(w1, W * p), low);
        for (int m = 0; m < MT; ++m) {
          int32_t d;
          std::memcpy(&d, ag[m] + per_vec * v + 4 * p, 4);
          const __m512i b = _mm512_set1_epi32(d);
          acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], c0, b);
          acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], c1, b);
        }
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sp + g * kTile), s1 = _mm512_loadu_ps(sp + sg + g * kTile);
    __m512i z0 = _mm512_setzero_si512(), z1 = z0;
    if (zp) {
      z0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kTile)));
      z1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + sg + g * kTile)));
    }
    for (int m = 0; m < MT; ++m) {
      const int32_t as = a.asum[(m0 + m) * a.groups + g];
      const __m512i va = _mm512_set1_epi32(zp ? as : sym * as);
      const __m512i c0 = zp ? _mm512_mullo_epi32(z0, va) : va, c1 = zp ? _mm512_mullo_epi32(z1, va) : va;
      facc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][0], c0)), s0, facc[m][0]);
      facc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][1], c1)), s1, facc[m][1]);
    }
  }
  const int64_t n0 = t * kTile, left = a.N - n0 - kTile;
  const __mmask16 om = left >= kTile ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  for (int m = 0; m < MT; ++m) {
    const __m512 sc = _mm512_set1_ps(a.a_scale[m0 + m]);
    float* y = a.Y + (m0 + m) * a.N + n0;
    _mm512_storeu_ps(y, _mm512_mul_ps(facc[m][0], sc));
    _mm512_mask_storeu_ps(y + kTile, om, _mm512_mul_ps(facc[m][1], sc));
  }
}

// Small batches (< 8 rows; 3-bit always): one tile per pass, the code fields left in place (one accumulator per
// field, no shifts), each weight vector serving MB rows.
template <int BITS, int MB>
EK_TARGET void packed_run_mb(const LowBitArgs& a, const PackedLowBit& pk, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + MB <= a.M; m += MB) packed_tile<BITS, MB>(a, pk, t, m);
    for (; m < a.M; ++m) packed_tile<BITS, 1>(a, pk, t, m);
  }
}

template <int BITS, int MB>
EK_TARGET void packed_run_pairs(const LowBitArgs& a, const PackedLowBit& pk, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 1 < t1; t += 2) {
    int64_t m = 0;
    for (; m + MB <= a.M; m += MB) packed_tile2<BITS, MB>(a, pk, t, m);
    if (MB > 4 && m + 4 <= a.M) packed_tile2<BITS, 4>(a, pk, t, m), m += 4;
    for (; m < a.M; ++m) packed_tile2<BITS, 1>(a, pk, t, m);
  }
  if (t < t1) packed_run_mb<BITS, 4>(a, pk, t, t1);
}

template <int BITS>
EK_TARGET void packed_run(const LowBitArgs& a, const PackedLowBit& pk, int64_t t0, int64_t t1) {
  if (BITS == 3) return packed_run_mb<3, 2>(a, pk, t0, t1);
  constexpr int B = BITS == 3 ? 2 : BITS;  // (3-bit returned above)
  if (a.M < 8) return packed_run_mb<B, 4>(a, pk, t0, t1);
  return packed_run_pairs<B, 4>(a, pk, t0, t1);  // 4 rows x 2 tiles: 8 int32 + 8 fp32 accumulators
}

EK_TARGET void lowbit_i8_packed(const LowBitArgs& a, const PackedLowBit& pk, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2:
      return packed_run<2>(a, pk, t0, t1);
    case 3:
      return packed_run<3>(a, pk, t0, t1);
    case 4:
      return packed_run<4>(a, pk, t0, t1);
    default:
      return packed_run<8>(a, pk, t0, t1);
  }
}

// Per-row asymmetric 8-bit quantization, bit-identical to the scalar quantize_rows_scalar (min and max are exact;
// x * inv is the same fp32 product; cvtps rounds to nearest even like nearbyint in the default rounding mode; the
// zero point and the clamps are applied to the same integers).
EK_TARGET void quantize_rows(const float* A, int64_t K, int64_t lda, int group, int64_t groups, int64_t m0,
                             int64_t m1, int8_t* q, float* a_scale, int32_t* a_zero, int32_t* asum) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = A + m * K;
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + k);
      vlo = _mm512_min_ps(vlo, v), vhi = _mm512_max_ps(vhi, v);
    }
    if (k < K) {
      const __mmask16 r = static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(r, x + k);  // zeros in the masked lanes: lo <= 0 <= hi anyway
      vlo = _mm512_min_ps(vlo, v), vhi = _mm512_max_ps(vhi, v);
    }
    const float lo = _mm512_reduce_min_ps(vlo), hi = _mm512_reduce_max_ps(vhi);
    const float range = hi - lo;
    const float inv = range > 0.f ? 255.f / range : 0.f;
    const int32_t z =
        range > 0.f ? static_cast<int32_t>(std::min(255.f, std::max(0.f, std::nearbyint(-lo * inv)))) : 128;
    a_scale[m] = range / 255.f;
    a_zero[m] = z - 128;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vz = _mm512_set1_epi32(z - 128), lo8 = _mm512_set1_epi32(-128), hi8 = _mm512_set1_epi32(127);
    int8_t* qr = q + m * lda;
    int32_t* gs = asum + m * groups;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 16) {
        const int64_t left = K - k0;
        const __mmask16 r = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : (left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u));
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(r, x + k0), vinv));
        v = _mm512_maskz_mov_epi32(r, _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, vz), lo8), hi8));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0), _mm512_cvtepi32_epi8(v));
      }
      gs[g] = _mm512_reduce_add_epi32(sum);
    }
    std::memset(qr + groups * group, 0, static_cast<size_t>(lda - groups * group));
  }
}

}  // namespace

const PackedLowBitKernels* packed_lowbit_avx512() {
  static const PackedLowBitKernels k{pack_lowbit, lowbit_i8_packed, kTile, quantize_rows};
  return &k;
}

}  // namespace edgekit
