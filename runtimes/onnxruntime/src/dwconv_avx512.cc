// ai.edgekit::QLinearDepthwiseConv on AVX-512 VNNI (dwconv.h has the math).
//
// Channels-last, so one output pixel's channels are contiguous in every tap. Taps are taken four at a time (the
// kernel's taps padded to a multiple of 4 with zero weights), so one `vpdpbusd` (uint8 x int8, four products summed
// into each int32 lane, exact) does 64 multiply-adds: per 64 channels and 4 taps, four 64-byte loads, two
// `vpunpck{l,h}bw` pairs interleave the taps' bytes and two `vpunpck{l,h}wd` pairs make four vectors whose int32
// lane (128-bit lane L, element k) holds channel 16 L + 4 j + k's four tap bytes (vector j). The weights are
// packed once in that order (PackedDwConv::wv), as are the bias and scale (bias_v, scale_v). Several columns run
// at once (independent accumulators hide vpdpbusd's latency; a weight vector is loaded once for all of them).
// Requantization: float multiply, round to nearest even (`vcvtps2dq`), add the zero point; then `vpackssdw` of
// vectors 0,1 and 2,3 and `vpackuswb` of the two saturate to uint8 (the clamp) and, lane by lane, put the channels
// back in order: 16 L + 0..3, 4..7, 8..11, 12..15.
#include <immintrin.h>

#include <algorithm>

#include "dwconv.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))

namespace edgekit {
namespace {

// Store a vector of P pixels' outputs: pixel u (128-bit lanes [u * 4 / P, (u + 1) * 4 / P)) to column ox + u when
// ox + u < limit.
template <int P>
EK_TARGET inline void scatter(__m512i v, uint8_t* yrow, int64_t C, int64_t ox, int64_t limit, int64_t c,
                              uint64_t mask) {
  if constexpr (P == 1) {
    _mm512_mask_storeu_epi8(yrow + ox * C + c, mask, v);
  } else if constexpr (P == 2) {
    _mm256_mask_storeu_epi8(yrow + ox * C + c, static_cast<__mmask32>(mask), _mm512_castsi512_si256(v));
    if (ox + 1 < limit)
      _mm256_mask_storeu_epi8(yrow + (ox + 1) * C + c, static_cast<__mmask32>(mask), _mm512_extracti64x4_epi64(v, 1));
  } else {
    const __mmask16 m = static_cast<__mmask16>(mask);
    _mm_mask_storeu_epi8(yrow + ox * C + c, m, _mm512_castsi512_si128(v));
    if (ox + 1 < limit) _mm_mask_storeu_epi8(yrow + (ox + 1) * C + c, m, _mm512_extracti32x4_epi32(v, 1));
    if (ox + 2 < limit) _mm_mask_storeu_epi8(yrow + (ox + 2) * C + c, m, _mm512_extracti32x4_epi32(v, 2));
    if (ox + 3 < limit) _mm_mask_storeu_epi8(yrow + (ox + 3) * C + c, m, _mm512_extracti32x4_epi32(v, 3));
  }
}

// Where a column's taps are: interior columns of interior rows at base + ox * col_stride + off[t] (no padding
// touched); the others through a table of pointers (dwconv_tap_pointers) for columns [ox0, ...).
template <bool kInterior>
struct Taps {
  const uint8_t* base;
  int64_t col_stride;
  const int64_t* off;        // [taps_padded]
  const uint8_t* const* ptr;  // [(ox - ox0) * taps_padded + t]
  int64_t ox0, taps;
  EK_TARGET inline const uint8_t* at(int64_t ox, int64_t t) const {
    if constexpr (kInterior) return base + ox * col_stride + off[t];
    return ptr[(ox - ox0) * taps + t];
  }
};

// Columns [ox0, ox1) of the row for the block of channels starting at c (block index b; `valid` channels real,
// masked past them): X vectors of P pixels at a time (the last vector's missing pixels read the last column and
// are not stored).
template <int P, int X, bool kInterior>
EK_TARGET void block(const DwConvArgs& a, const PackedDwConv& p, const Taps<kInterior>& src, uint8_t* yrow, int64_t c,
                     int64_t b, int64_t valid, int64_t ox0, int64_t ox1) {
  const int64_t groups = p.taps_padded / 4;
  const uint64_t mask = valid >= 64 ? ~uint64_t(0) : (uint64_t(1) << valid) - 1;
  const int8_t* wv = p.wv.data() + b * groups * 256;
  const int32_t* bias = p.bias_v.data() + b * 64;
  const float* scale = p.scale_v.data() + b * 64;
  const __m512i yz = _mm512_set1_epi32(p.y_zero);
  const __m512 lo = _mm512_set1_ps(-1073741824.f), hi = _mm512_set1_ps(1073741824.f);
  for (int64_t ox = ox0; ox < ox1; ox += P * X) {
    __m512i acc[X][4];
    for (int j = 0; j < 4; ++j) {
      const __m512i bj = _mm512_loadu_si512(bias + 16 * j);
      for (int u = 0; u < X; ++u) acc[u][j] = bj;
    }
    int64_t col[X * P];
    for (int u = 0; u < X * P; ++u) col[u] = std::min(ox + u, ox1 - 1);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i w0 = _mm512_loadu_si512(wv + g * 256), w1 = _mm512_loadu_si512(wv + g * 256 + 64),
                    w2 = _mm512_loadu_si512(wv + g * 256 + 128), w3 = _mm512_loadu_si512(wv + g * 256 + 192);
      for (int u = 0; u < X; ++u) {
        __m512i t[4];
        for (int i = 0; i < 4; ++i) {
          const int64_t tap = 4 * g + i;
          if constexpr (P == 1) {
            t[i] = _mm512_maskz_loadu_epi8(mask, src.at(col[u], tap) + c);
          } else if constexpr (P == 2) {
            const __mmask32 m = static_cast<__mmask32>(mask);
            const __m256i x0 = _mm256_maskz_loadu_epi8(m, src.at(col[2 * u], tap) + c);
            const __m256i x1 = _mm256_maskz_loadu_epi8(m, src.at(col[2 * u + 1], tap) + c);
            t[i] = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
          } else {
            const __mmask16 m = static_cast<__mmask16>(mask);
            __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, src.at(col[4 * u], tap) + c));
            v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, src.at(col[4 * u + 1], tap) + c), 1);
            v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, src.at(col[4 * u + 2], tap) + c), 2);
            t[i] = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, src.at(col[4 * u + 3], tap) + c), 3);
          }
        }
        const __m512i alo = _mm512_unpacklo_epi8(t[0], t[1]), ahi = _mm512_unpackhi_epi8(t[0], t[1]);
        const __m512i blo = _mm512_unpacklo_epi8(t[2], t[3]), bhi = _mm512_unpackhi_epi8(t[2], t[3]);
        acc[u][0] = _mm512_dpbusd_epi32(acc[u][0], _mm512_unpacklo_epi16(alo, blo), w0);
        acc[u][1] = _mm512_dpbusd_epi32(acc[u][1], _mm512_unpackhi_epi16(alo, blo), w1);
        acc[u][2] = _mm512_dpbusd_epi32(acc[u][2], _mm512_unpacklo_epi16(ahi, bhi), w2);
        acc[u][3] = _mm512_dpbusd_epi32(acc[u][3], _mm512_unpackhi_epi16(ahi, bhi), w3);
      }
    }
    for (int u = 0; u < X; ++u) {
      if (ox + u * P >= ox1) break;
      __m512i q[4];
      for (int j = 0; j < 4; ++j) {
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[u][j]), _mm512_loadu_ps(scale + 16 * j));
        f = _mm512_min_ps(_mm512_max_ps(f, lo), hi);  // vcvtps2dq overflows past 2^31; the packs saturate anyway
        q[j] = _mm512_add_epi32(_mm512_cvtps_epi32(f), yz);
      }
      const __m512i out = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
      scatter<P>(out, yrow, a.C, ox + u * P, ox1, c, mask);
    }
  }
}

// Columns [ox0, ox1) for every block of channels in [c0, c1).
template <bool kInterior>
EK_TARGET void columns(const DwConvArgs& a, const PackedDwConv& p, const Taps<kInterior>& src, uint8_t* yrow,
                       int64_t c0, int64_t c1, int64_t ox0, int64_t ox1) {
  if (ox0 >= ox1) return;
  for (int64_t c = c0; c < c1; c += 64) {
    const int64_t valid = std::min<int64_t>(64, c1 - c), b = c / 64;
    // the last block of a channel count that is not a multiple of 64 packs P pixels per vector (dwconv.h)
    switch (valid == 64 ? 1 : dwconv_tail_pixels(valid)) {
      case 4:
        block<4, 3>(a, p, src, yrow, c, b, valid, ox0, ox1);
        break;
      case 2:
        block<2, 3>(a, p, src, yrow, c, b, valid, ox0, ox1);
        break;
      default: {
        const int64_t main = ox0 + (ox1 - ox0) / 3 * 3;
        block<1, 3>(a, p, src, yrow, c, b, valid, ox0, main);
        block<1, 1>(a, p, src, yrow, c, b, valid, main, ox1);
      }
    }
  }
}

EK_TARGET void row_avx512(const DwConvArgs& a, const PackedDwConv& p, int64_t r, int64_t c0, int64_t c1) {
  const int64_t n = r / a.Ho, oy = r % a.Ho, taps = p.taps_padded;
  uint8_t* yrow = a.Y + r * a.Wo * a.C;
  thread_local std::vector<const uint8_t*> ptr;
  const int64_t iy0 = oy * a.sh - a.pad_top;
  const bool row_inside = iy0 >= 0 && iy0 + (a.kh - 1) * a.dh < a.H;
  // interior columns: every tap inside the row (ox * sw - pad_left >= 0, ... + (kw - 1) dw < W)
  int64_t cx0 = (a.pad_left + a.sw - 1) / a.sw, cx1 = 0;
  if (a.W - 1 - (a.kw - 1) * a.dw + a.pad_left >= 0) cx1 = (a.W - 1 - (a.kw - 1) * a.dw + a.pad_left) / a.sw + 1;
  cx0 = std::min(cx0, a.Wo), cx1 = std::min(std::max(cx1, cx0), a.Wo);
  if (!row_inside) cx0 = cx1 = a.Wo;
  auto table = [&](int64_t ox0, int64_t ox1) {
    if (ox0 >= ox1) return;
    dwconv_tap_pointers(a, p, r, ptr, taps, ox0, ox1);
    const Taps<false> src{nullptr, 0, nullptr, ptr.data(), ox0, taps};
    columns<false>(a, p, src, yrow, c0, c1, ox0, ox1);
  };
  table(0, cx0);
  if (cx0 < cx1) {
    const Taps<true> src{a.X + ((n * a.H + iy0) * a.W - a.pad_left) * a.C, a.sw * a.C, a.tap_offsets, nullptr, 0,
                         taps};
    columns<true>(a, p, src, yrow, c0, c1, cx0, cx1);
  }
  table(cx1, a.Wo);
}

}  // namespace

DwConvFn dwconv_row_avx512() { return &row_avx512; }

}  // namespace edgekit
