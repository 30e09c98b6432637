// ai.edgekit::QLinearConvDirect: the portable kernel and the AVX-512 VNNI one (conv_direct.h has the math).
//
// AVX-512: per output pixel the K input bytes, in (ky, kx, ci) order, are gathered into a 64-byte vector (one masked
// load per kernel row, kw Cin <= 16 bytes each, placed by one `vpermb`; pixels whose taps reach the padding build it
// byte by byte with x_zero there) and stored to a small buffer, from which `vpbroadcastd` takes four bytes at a time
// for `vpdpbusd` against the packed weights of every 16 output channels. Four pixels run at once, so each weight
// vector is loaded once per four pixels.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "conv_direct.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))

namespace edgekit {
namespace {

// The K input bytes of output pixel (row r, column ox) into patch[0, K) (x_zero where a tap is in the padding),
// zeros in [K, 64).
void gather_scalar(const DwConvArgs& a, const PackedConvDirect& p, int64_t r, int64_t ox, uint8_t* patch) {
  const int64_t n = r / a.Ho, oy = r % a.Ho, cin = p.Cin;
  std::memset(patch, 0, kDirectMaxK);
  for (int64_t ky = 0; ky < a.kh; ++ky)
    for (int64_t kx = 0; kx < a.kw; ++kx) {
      const int64_t iy = oy * a.sh - a.pad_top + ky * a.dh, ix = ox * a.sw - a.pad_left + kx * a.dw;
      uint8_t* dst = patch + (ky * a.kw + kx) * cin;
      if (iy >= 0 && iy < a.H && ix >= 0 && ix < a.W)
        std::memcpy(dst, a.X + ((n * a.H + iy) * a.W + ix) * cin, static_cast<size_t>(cin));
      else
        std::memset(dst, p.x_zero, static_cast<size_t>(cin));
    }
}

uint8_t requant(int32_t acc, float scale, int32_t y_zero) {
  const int64_t q = static_cast<int64_t>(std::nearbyint(static_cast<float>(acc) * scale)) + y_zero;
  return static_cast<uint8_t>(std::min<int64_t>(255, std::max<int64_t>(0, q)));
}

// Whether every tap of output column ox in row r is inside the input (no padding), with kernel rows that are
// contiguous in memory (dilation 1 along x).
bool interior(const DwConvArgs& a, int64_t oy, int64_t ox) {
  const int64_t iy = oy * a.sh - a.pad_top, ix = ox * a.sw - a.pad_left;
  return iy >= 0 && iy + (a.kh - 1) * a.dh < a.H && ix >= 0 && ix + (a.kw - 1) * a.dw < a.W && a.dw == 1;
}

EK_TARGET void row_avx512(const DwConvArgs& a, const PackedConvDirect& p, int64_t r) {
  const int64_t n = r / a.Ho, oy = r % a.Ho, seg = a.kw * p.Cin, nv = p.Coutp / 16;
  uint8_t* yrow = a.Y + r * a.Wo * p.Cout;
  alignas(64) uint8_t patch[4][kDirectMaxK] = {};
  // vpermb index: kernel row ky's segment (bytes 0..seg-1 of 128-bit lane ky) to bytes [ky seg, (ky + 1) seg)
  alignas(64) uint8_t idx[64];
  for (int64_t b = 0; b < 64; ++b) {
    const int64_t ky = b / seg;
    idx[b] = static_cast<uint8_t>(b < p.K ? 16 * ky + b % seg : 63);  // byte 63: lane 3's last byte, zeroed below
  }
  const __m512i perm = _mm512_load_si512(idx);
  const bool fast = seg <= 16 && a.kh <= 3 && p.K <= 63;  // 3 rows in lanes 0-2, lane 3 free for the zero byte
  const __mmask16 seg_mask = fast ? static_cast<__mmask16>((1u << seg) - 1) : 0;
  const __mmask64 k_mask = p.K >= 64 ? ~__mmask64(0) : (__mmask64(1) << p.K) - 1;
  const __m512i yz = _mm512_set1_epi32(p.y_zero);
  const __m512 lo = _mm512_set1_ps(-1073741824.f), hi = _mm512_set1_ps(1073741824.f);
  const __mmask16 out_mask_last = static_cast<__mmask16>((1u << (p.Cout - 16 * (nv - 1))) - 1);
  for (int64_t ox0 = 0; ox0 < a.Wo; ox0 += 4) {
    const int np = static_cast<int>(std::min<int64_t>(4, a.Wo - ox0));
    for (int u = 0; u < np; ++u) {
      const int64_t ox = ox0 + u;
      if (fast && interior(a, oy, ox)) {
        const uint8_t* base = a.X + ((n * a.H + oy * a.sh - a.pad_top) * a.W + ox * a.sw - a.pad_left) * p.Cin;
        __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(seg_mask, base));
        if (a.kh > 1) v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(seg_mask, base + a.dh * a.W * p.Cin), 1);
        if (a.kh > 2) v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(seg_mask, base + 2 * a.dh * a.W * p.Cin), 2);
        _mm512_store_si512(patch[u], _mm512_maskz_permutexvar_epi8(k_mask, perm, v));
      } else {
        gather_scalar(a, p, r, ox, patch[u]);
      }
    }
    for (int64_t v0 = 0; v0 < nv; v0 += 2) {  // two vectors of 16 output channels at a time
      const int nvv = static_cast<int>(std::min<int64_t>(2, nv - v0));
      __m512i acc[4][2];
      for (int j = 0; j < 2; ++j) {
        const __m512i b = j < nvv ? _mm512_loadu_si512(p.bias.data() + 16 * (v0 + j)) : _mm512_setzero_si512();
        for (int u = 0; u < 4; ++u) acc[u][j] = b;
      }
      for (int64_t g = 0; g < p.K4; ++g) {
        const int8_t* wg = p.wv.data() + (g * nv + v0) * 64;
        const __m512i w0 = _mm512_loadu_si512(wg);
        const __m512i w1 = nvv > 1 ? _mm512_loadu_si512(wg + 64) : _mm512_setzero_si512();
        for (int u = 0; u < 4; ++u) {
          int32_t word;
          std::memcpy(&word, patch[u] + 4 * g, 4);
          const __m512i x = _mm512_set1_epi32(word);
          acc[u][0] = _mm512_dpbusd_epi32(acc[u][0], x, w0);
          acc[u][1] = _mm512_dpbusd_epi32(acc[u][1], x, w1);
        }
      }
      for (int u = 0; u < np; ++u)
        for (int j = 0; j < nvv; ++j) {
          const int64_t v = v0 + j;
          __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[u][j]), _mm512_loadu_ps(p.scale.data() + 16 * v));
          f = _mm512_min_ps(_mm512_max_ps(f, lo), hi);
          const __m512i q = _mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(f), yz), _mm512_setzero_si512());
          const __mmask16 m = v == nv - 1 ? out_mask_last : static_cast<__mmask16>(0xFFFF);
          _mm_mask_storeu_epi8(yrow + (ox0 + u) * p.Cout + 16 * v, m, _mm512_cvtusepi32_epi8(q));
        }
    }
  }
}

}  // namespace

void conv_direct_row_scalar(const DwConvArgs& a, const PackedConvDirect& p, int64_t r) {
  uint8_t patch[kDirectMaxK];
  uint8_t* yrow = a.Y + r * a.Wo * p.Cout;
  for (int64_t ox = 0; ox < a.Wo; ++ox) {
    gather_scalar(a, p, r, ox, patch);
    for (int64_t co = 0; co < p.Cout; ++co) {
      int32_t acc = p.bias[co];
      const int8_t* w = p.w.data() + co * p.K;
      for (int64_t k = 0; k < p.K; ++k) acc += static_cast<int32_t>(patch[k]) * w[k];
      yrow[ox * p.Cout + co] = requant(acc, p.scale[co], p.y_zero);
    }
  }
}

void conv_direct_pack_vnni(PackedConvDirect& p) {
  const int64_t nv = p.Coutp / 16;
  p.wv.assign(static_cast<size_t>(p.K4 * nv * 64), 0);
  for (int64_t g = 0; g < p.K4; ++g)
    for (int64_t co = 0; co < p.Cout; ++co)
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t k = 4 * g + i;
        if (k < p.K) p.wv[(g * nv + co / 16) * 64 + 4 * (co % 16) + i] = p.w[co * p.K + k];
      }
}

ConvDirectFn conv_direct_row_avx512() { return &row_avx512; }

}  // namespace edgekit
