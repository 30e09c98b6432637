// AVX-512 kernels (F, BW, VL, DQ, VNNI, VBMI: Ice Lake, Sapphire Rapids, Zen 4 and later). Compiled with target
// attributes so that the library itself needs no -march and runs anywhere; selected at run time (edgekit_ort.cc).
//
// Unpacking (any of 2, 3, 4 bits): 64 values at a time. vpermb copies source bytes b*q .. b*q+7 into qword q
// (8 values of b bits are exactly b bytes), vpmultishiftqb picks the 8 bits at offset b*t for byte t, and an AND
// keeps b of them: three instructions give 64 codes in natural order, one per byte.
//
// MatMulLowBit, accuracy_level 4: the codes (unsigned, 0 .. 2^b-1) are the u8 operand of vpdpbusd and the
// per-row int8 activations the s8 operand; per group  s * (sum q*a - zp * sum a), the zero-point term from the
// activation group sums computed once per call. accuracy_level 0, 2/4 bits: see lowbit_f32_fast_tile (re-ordered
// activations, shift + vpermps per 16 codes); 3/8 bits: codes -> fp32 through a 16-entry table (q - zp) * s per
// group (vpermps), FMA with the fp32 activations.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))
#define EK_INLINE EK_TARGET inline __attribute__((always_inline))

namespace edgekit {
namespace {

struct Unpack {
  __m512i perm, shift, mask;
  int bits;
  int64_t nbytes;  // packed bytes per 64 values
};

EK_INLINE Unpack make_unpack(int bits) {
  alignas(64) uint8_t p[64], s[64];
  for (int q = 0; q < 8; ++q)
    for (int t = 0; t < 8; ++t) {
      p[8 * q + t] = static_cast<uint8_t>(bits * q + t);
      s[8 * q + t] = static_cast<uint8_t>(bits * t);
    }
  Unpack u;
  u.perm = _mm512_load_si512(p);
  u.shift = _mm512_load_si512(s);
  u.mask = _mm512_set1_epi8(static_cast<char>((1 << bits) - 1));
  u.bits = bits;
  u.nbytes = 8 * bits;
  return u;
}

// Codes 64c .. 64c+63 of a packed row (bytes past row_bytes read as 0).
EK_INLINE __m512i unpack64(const Unpack& u, const uint8_t* row, int64_t row_bytes, int64_t c) {
  const int64_t off = c * u.nbytes;
  int64_t avail = row_bytes - off;
  if (avail > u.nbytes) avail = u.nbytes;
  const __mmask64 m = avail >= 64 ? ~0ULL : ((1ULL << avail) - 1);
  __m512i x = _mm512_maskz_loadu_epi8(m, row + off);
  if (u.bits == 8) return x;
  x = _mm512_permutexvar_epi8(u.perm, x);
  x = _mm512_multishift_epi64_epi8(u.shift, x);
  return _mm512_and_si512(x, u.mask);
}

EK_INLINE __mmask16 mask16(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : (1u << n) - 1u; }

// ---------------------------------------------------------------------------------------------------------------
// MatMulLowBit, int8 activations: NR weight rows x MT activation rows.

// Y = a_scale * (sum of accf - sum_g s[g] * zp[g] * asum[m, g]) for NR x MT outputs.
template <int NR, int MT>
EK_INLINE void finish_i8(const LowBitArgs& a, int64_t n, int64_t m0, const float* const* srow,
                      __m512 (&accf)[NR][MT]) {
  // Zero-point term: sum_g s[g] * zp[g] * asum[m, g].
  const __m512 sym = _mm512_set1_ps(static_cast<float>(1 << (a.bits - 1)));
  for (int r = 0; r < NR; ++r) {
    const uint8_t* zrow = a.zero_points ? a.zero_points + (n + r) * a.groups : nullptr;
    __m512 corr[MT];
    for (int m = 0; m < MT; ++m) corr[m] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < a.groups; g0 += 16) {
      const __mmask16 gm = mask16(a.groups - g0);
      const __m512 s = _mm512_maskz_loadu_ps(gm, srow[r] + g0);
      const __m512 z =
          zrow ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(gm, zrow + g0))) : sym;
      const __m512 sz = _mm512_mul_ps(s, z);
      for (int m = 0; m < MT; ++m) {
        const __m512 as = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(gm, a.asum + (m0 + m) * a.groups + g0));
        corr[m] = _mm512_fmadd_ps(sz, as, corr[m]);
      }
    }
    for (int m = 0; m < MT; ++m)
      a.Y[(m0 + m) * a.N + n + r] =
          (_mm512_reduce_add_ps(accf[r][m]) - _mm512_reduce_add_ps(corr[m])) * a.a_scale[m0 + m];
  }
}


template <int NR, int MT>
EK_TARGET void lowbit_i8_tile(const LowBitArgs& a, const Unpack& u, int64_t n, int64_t m0) {
  const int64_t nch = (a.Kp + 63) / 64;
  const bool g32 = a.group == 32;
  const int64_t cpg = a.group / 64;
  __m512 accf[NR][MT];
  __m512i acci[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_setzero_ps(), acci[r][m] = _mm512_setzero_si512();
  const uint8_t* rows[NR];
  const float* srow[NR];
  for (int r = 0; r < NR; ++r) rows[r] = a.B + (n + r) * a.row_bytes, srow[r] = a.scales + (n + r) * a.groups;
  const int8_t* arow[MT];
  for (int m = 0; m < MT; ++m) arow[m] = a.aq + (m0 + m) * a.lda_q;
  const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t c = 0; c < nch; ++c) {
    __m512i codes[NR];
    for (int r = 0; r < NR; ++r) codes[r] = unpack64(u, rows[r], a.row_bytes, c);
    if (g32) {
      const __mmask16 sm = (2 * c + 1 < a.groups) ? 3 : 1;
      __m512 sv[NR];
      for (int r = 0; r < NR; ++r) sv[r] = _mm512_permutexvar_ps(sel, _mm512_maskz_loadu_ps(sm, srow[r] + 2 * c));
      for (int m = 0; m < MT; ++m) {
        const __m512i av = _mm512_loadu_si512(arow[m] + 64 * c);
        for (int r = 0; r < NR; ++r) {
          const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[r], av);
          accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sv[r], accf[r][m]);
        }
      }
    } else {
      for (int m = 0; m < MT; ++m) {
        const __m512i av = _mm512_loadu_si512(arow[m] + 64 * c);
        for (int r = 0; r < NR; ++r) acci[r][m] = _mm512_dpbusd_epi32(acci[r][m], codes[r], av);
      }
      if ((c + 1) % cpg == 0) {
        const int64_t g = c / cpg;
        for (int r = 0; r < NR; ++r) {
          const __m512 s = _mm512_set1_ps(srow[r][g]);
          for (int m = 0; m < MT; ++m) {
            accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[r][m]), s, accf[r][m]);
            acci[r][m] = _mm512_setzero_si512();
          }
        }
      }
    }
  }
  finish_i8<NR, MT>(a, n, m0, srow, accf);
}


// 2- and 4-bit weights, int8 activations: one 64-byte load holds 128 (4-bit) or 256 (2-bit) codes; vector p of
// the block is (bytes >> p*BITS) & mask, whose byte j is value (V/64)*j + p. The activations are stored in the
// same order (prepare_i8: aq'[b*V + 64p + j] = aq[b*V + (V/64)*j + p]), so no shuffle is needed per weight.
// Each int32 lane covers V/16 consecutive values, inside one group; its scale comes from a permuted load.
template <int BITS, int NR, int MT>
EK_TARGET void lowbit_i8_fast_tile(const LowBitArgs& a, int64_t n, int64_t m0) {
  constexpr int V = 512 / BITS, P = 8 / BITS;
  const int64_t nblk = (a.Kp + V - 1) / V;
  const int64_t ng = V / a.group;  // groups per block
  alignas(64) int32_t gi[16];
  for (int l = 0; l < 16; ++l) gi[l] = (l * (V / 16)) / a.group;
  const __m512i gidx = _mm512_load_si512(gi);
  const __m512i cmask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  __m512 accf[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  const float* srow[NR];
  for (int r = 0; r < NR; ++r) rows[r] = a.B + (n + r) * a.row_bytes, srow[r] = a.scales + (n + r) * a.groups;
  const int8_t* arow[MT];
  for (int m = 0; m < MT; ++m) arow[m] = a.aq + (m0 + m) * a.lda_q;
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i codes[NR][P];
    __m512 sv[NR];
    const bool full = 64 * (b + 1) <= a.row_bytes;
    const __mmask64 lm = full ? ~0ULL : ((1ULL << (a.row_bytes - 64 * b)) - 1);
    const int64_t gl = a.groups - b * ng;
    const __mmask16 gm = gl >= ng ? static_cast<__mmask16>((1u << ng) - 1) : static_cast<__mmask16>((1u << gl) - 1);
    for (int r = 0; r < NR; ++r) {
      const __m512i w = full ? _mm512_loadu_si512(rows[r] + 64 * b) : _mm512_maskz_loadu_epi8(lm, rows[r] + 64 * b);
      codes[r][0] = _mm512_and_si512(w, cmask);
      for (int p = 1; p < P; ++p) codes[r][p] = _mm512_and_si512(_mm512_srli_epi16(w, p * BITS), cmask);
      sv[r] = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(gm, srow[r] + b * ng));
    }
    for (int m = 0; m < MT; ++m) {
      __m512i t[NR];
      for (int r = 0; r < NR; ++r) t[r] = _mm512_setzero_si512();
      for (int p = 0; p < P; ++p) {
        const __m512i av = _mm512_loadu_si512(arow[m] + b * V + 64 * p);
        for (int r = 0; r < NR; ++r) t[r] = _mm512_dpbusd_epi32(t[r], codes[r][p], av);
      }
      for (int r = 0; r < NR; ++r) accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r]), sv[r], accf[r][m]);
    }
  }
  finish_i8<NR, MT>(a, n, m0, srow, accf);
}

template <int BITS>
EK_TARGET void lowbit_i8_fast(const LowBitArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) lowbit_i8_fast_tile<BITS, 4, 1>(a, n, 0);
    for (; n < n1; ++n) lowbit_i8_fast_tile<BITS, 1, 1>(a, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4)
      two ? lowbit_i8_fast_tile<BITS, 2, 4>(a, n, m) : lowbit_i8_fast_tile<BITS, 1, 4>(a, n, m);
    for (; m < a.M; ++m) two ? lowbit_i8_fast_tile<BITS, 2, 1>(a, n, m) : lowbit_i8_fast_tile<BITS, 1, 1>(a, n, m);
    if (!two) break;
  }
}

EK_TARGET void lowbit_i8(const LowBitArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) return lowbit_i8_fast<4>(a, n0, n1);
  if (a.bits == 2) return lowbit_i8_fast<2>(a, n0, n1);
  const Unpack u = make_unpack(a.bits);
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) lowbit_i8_tile<4, 1>(a, u, n, 0);
    for (; n < n1; ++n) lowbit_i8_tile<1, 1>(a, u, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) two ? lowbit_i8_tile<2, 4>(a, u, n, m) : lowbit_i8_tile<1, 4>(a, u, n, m);
    for (; m < a.M; ++m) two ? lowbit_i8_tile<2, 1>(a, u, n, m) : lowbit_i8_tile<1, 1>(a, u, n, m);
    if (!two) break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// MatMulLowBit, fp32 activations.

template <int NR, int MT>
EK_TARGET void lowbit_f32_tile(const LowBitArgs& a, const Unpack& u, int64_t n, int64_t m0) {
  const int64_t nch = (a.Kp + 63) / 64;
  const bool table = a.bits <= 4;
  const int sym = 1 << (a.bits - 1);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  const float* srow[NR];
  const uint8_t* zrow[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = a.B + (n + r) * a.row_bytes;
    srow[r] = a.scales + (n + r) * a.groups;
    zrow[r] = a.zero_points ? a.zero_points + (n + r) * a.groups : nullptr;
  }
  const float* arow[MT];
  for (int m = 0; m < MT; ++m) arow[m] = a.A + (m0 + m) * a.lda;
  __m512 T[NR];   // table (bits <= 4) or scale
  __m512i Z[NR];  // zero point (8 bits)
  for (int r = 0; r < NR; ++r) T[r] = _mm512_setzero_ps(), Z[r] = _mm512_setzero_si512();

#define EK_F32_SUB(J)                                                                                     \
  {                                                                                                       \
    const int64_t k = 64 * c + 16 * (J);                                                                  \
    if (k < a.Kp) {                                                                                       \
      if (k % a.group == 0) {                                                                             \
        const int64_t g = k / a.group;                                                                    \
        for (int r = 0; r < NR; ++r) {                                                                    \
          const int z = zrow[r] ? zrow[r][g] : sym;                                                       \
          if (table)                                                                                      \
            T[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(z))),        \
                                 _mm512_set1_ps(srow[r][g]));                                             \
          else                                                                                            \
            T[r] = _mm512_set1_ps(srow[r][g]), Z[r] = _mm512_set1_epi32(z);                               \
        }                                                                                                 \
      }                                                                                                   \
      __m512 w[NR];                                                                                       \
      for (int r = 0; r < NR; ++r) {                                                                      \
        const __m512i qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes[r], J));                  \
        w[r] = table ? _mm512_permutexvar_ps(qi, T[r])                                                    \
                     : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qi, Z[r])), T[r]);               \
      }                                                                                                   \
      for (int m = 0; m < MT; ++m) {                                                                      \
        const __m512 av = _mm512_loadu_ps(arow[m] + k);                                                   \
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(av, w[r], acc[r][m]);                    \
      }                                                                                                   \
    }                                                                                                     \
  }

  for (int64_t c = 0; c < nch; ++c) {
    __m512i codes[NR];
    for (int r = 0; r < NR; ++r) codes[r] = unpack64(u, rows[r], a.row_bytes, c);
    EK_F32_SUB(0)
    EK_F32_SUB(1)
    EK_F32_SUB(2)
    EK_F32_SUB(3)
  }
#undef EK_F32_SUB
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) a.Y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// 2- and 4-bit weights, fp32 activations (accuracy level 0), with the activations re-ordered by prepare_f32: int32
// lane l of a 64-byte weight load holds V/16 consecutive codes (V = 512/BITS codes per load), code p of the lane in
// bits BITS*p. Step p shifts the load right by BITS*p and vpermps reads each lane's low 4 bits as an index into a
// constant table: 16 codes as fp32 in two instructions, no unpacking. Symmetric weights: the table holds
// (code - 2^(BITS-1)) (the identity shifted, repeated every 2^BITS entries); with zero points it holds the code and
// each lane subtracts its group's zero point (one more instruction). Either way the weights are the exact integers
// q - zp in fp32, FMA'd with the activations stored in the same order (A'[b*V + 16p + l] = A[b*V + (V/16)*l + p]).
// A lane's codes lie in one group, so per block each lane's sum takes its group's scale in one more FMA.
template <int BITS, bool ZP, int NR, int MT>
EK_TARGET void lowbit_f32_fast_tile(const LowBitArgs& a, int64_t n, int64_t m0) {
  constexpr int V = 512 / BITS, P = 32 / BITS;
  const int64_t nblk = (a.Kp + V - 1) / V;
  const int64_t ng = V / a.group;  // groups per block (V >= group: 128 or 256 codes, groups of 32..128)
  alignas(64) int32_t gi[16];
  alignas(64) float tv[16];
  for (int l = 0; l < 16; ++l)
    gi[l] = (l * (V / 16)) / a.group, tv[l] = static_cast<float>((l & ((1 << BITS) - 1)) - (ZP ? 0 : 1 << (BITS - 1)));
  const __m512i gidx = _mm512_load_si512(gi);
  const __m512 table = _mm512_load_ps(tv);
  __m512 accf[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  const float* srow[NR];
  const uint8_t* zrow[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = a.B + (n + r) * a.row_bytes, srow[r] = a.scales + (n + r) * a.groups;
    zrow[r] = ZP ? a.zero_points + (n + r) * a.groups : nullptr;
  }
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i w[NR];
    __m512 sv[NR], zv[NR], t[NR][MT];
    const bool full = 64 * (b + 1) <= a.row_bytes;
    const __mmask64 lm = full ? ~0ULL : ((1ULL << (a.row_bytes - 64 * b)) - 1);
    const int64_t gl = a.groups - b * ng;
    const __mmask16 gm = gl >= ng ? static_cast<__mmask16>((1u << ng) - 1) : static_cast<__mmask16>((1u << gl) - 1);
    for (int r = 0; r < NR; ++r) {
      w[r] = full ? _mm512_loadu_si512(rows[r] + 64 * b) : _mm512_maskz_loadu_epi8(lm, rows[r] + 64 * b);
      sv[r] = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(gm, srow[r] + b * ng));
      if (ZP)
        zv[r] = _mm512_permutexvar_ps(
            gidx, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(gm, zrow[r] + b * ng))));
      for (int m = 0; m < MT; ++m) t[r][m] = _mm512_setzero_ps();
    }
    for (int p = 0; p < P; ++p) {
      __m512 q[NR];
      for (int r = 0; r < NR; ++r) {
        q[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(w[r], BITS * p), table);
        if (ZP) q[r] = _mm512_sub_ps(q[r], zv[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 av = _mm512_loadu_ps(a.A + (m0 + m) * a.lda + b * V + 16 * p);
        for (int r = 0; r < NR; ++r) t[r][m] = _mm512_fmadd_ps(av, q[r], t[r][m]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_fmadd_ps(t[r][m], sv[r], accf[r][m]);
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) a.Y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(accf[r][m]);
}

template <int BITS, bool ZP>
EK_TARGET void lowbit_f32_fast(const LowBitArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) lowbit_f32_fast_tile<BITS, ZP, 4, 1>(a, n, 0);
    for (; n < n1; ++n) lowbit_f32_fast_tile<BITS, ZP, 1, 1>(a, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4)
      two ? lowbit_f32_fast_tile<BITS, ZP, 2, 4>(a, n, m) : lowbit_f32_fast_tile<BITS, ZP, 1, 4>(a, n, m);
    for (; m < a.M; ++m)
      two ? lowbit_f32_fast_tile<BITS, ZP, 2, 1>(a, n, m) : lowbit_f32_fast_tile<BITS, ZP, 1, 1>(a, n, m);
    if (!two) break;
  }
}

EK_TARGET void lowbit_f32(const LowBitArgs& a, int64_t n0, int64_t n1) {
  if (a.f32_reordered) {
    const bool zp = a.zero_points != nullptr;
    if (a.bits == 4) return zp ? lowbit_f32_fast<4, true>(a, n0, n1) : lowbit_f32_fast<4, false>(a, n0, n1);
    if (a.bits == 2) return zp ? lowbit_f32_fast<2, true>(a, n0, n1) : lowbit_f32_fast<2, false>(a, n0, n1);
  }
  const Unpack u = make_unpack(a.bits);

  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) lowbit_f32_tile<4, 1>(a, u, n, 0);
    for (; n < n1; ++n) lowbit_f32_tile<1, 1>(a, u, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 6 <= a.M; m += 6) two ? lowbit_f32_tile<2, 6>(a, u, n, m) : lowbit_f32_tile<1, 6>(a, u, n, m);
    for (; m < a.M; ++m) two ? lowbit_f32_tile<2, 1>(a, u, n, m) : lowbit_f32_tile<1, 1>(a, u, n, m);
    if (!two) break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// MatMulSparse24, float activations: 16 kept values (8 groups, 32 dense positions) per step; the activations
// are gathered from two registers with vpermt2ps at lane 2g+j -> 4g + i_j.

template <int NR, int MT>
EK_TARGET void sparse_f32_tile(const Sparse24Args& a, int64_t n, int64_t m0) {
  const int64_t kept = a.K / 2, nch = (kept + 15) / 16;
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nch; ++c) {
    __m512i idx[NR];
    __m512 vals[NR];
    const __mmask16 vm = mask16(kept - 16 * c);
    int64_t ib = a.index_row_bytes - 4 * c;
    if (ib > 4) ib = 4;
    for (int r = 0; r < NR; ++r) {
      uint32_t word = 0;
      std::memcpy(&word, a.indices + (n + r) * a.index_row_bytes + 4 * c, static_cast<size_t>(ib));
      idx[r] = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                                 three),
                                base);
      if (a.int8_values) {
        const int8_t* v = static_cast<const int8_t*>(a.values) + (n + r) * kept + 16 * c;
        vals[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(vm, v)));
      } else {
        vals[r] = _mm512_maskz_loadu_ps(vm, static_cast<const float*>(a.values) + (n + r) * kept + 16 * c);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const float* x = a.A + (m0 + m) * a.lda + 32 * c;
      const __m512 a0 = _mm512_loadu_ps(x), a1 = _mm512_loadu_ps(x + 16);
      for (int r = 0; r < NR; ++r)
        acc[r][m] = _mm512_fmadd_ps(_mm512_permutex2var_ps(a0, idx[r], a1), vals[r], acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) {
      float y = _mm512_reduce_add_ps(acc[r][m]);
      if (a.int8_values) y *= a.w_scale[n + r];
      a.Y[(m0 + m) * a.N + n + r] = y;
    }
}

EK_TARGET void sparse24_f32(const Sparse24Args& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) sparse_f32_tile<4, 1>(a, n, 0);
    for (; n < n1; ++n) sparse_f32_tile<1, 1>(a, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 6 <= a.M; m += 6) two ? sparse_f32_tile<2, 6>(a, n, m) : sparse_f32_tile<1, 6>(a, n, m);
    for (; m < a.M; ++m) two ? sparse_f32_tile<2, 1>(a, n, m) : sparse_f32_tile<1, 1>(a, n, m);
    if (!two) break;
  }
}

// MatMulSparse24, uint8 activations x int8 values: 64 kept values (128 dense positions) per step; the 2-bit
// positions unpack like 2-bit codes, vpermt2b gathers the activations, vpdpbusd multiplies (u8 x s8, exact).

template <int NR, int MT>
EK_TARGET void sparse_u8_tile(const Sparse24Args& a, const Unpack& u2, int64_t n, int64_t m0) {
  const int64_t kept = a.K / 2, nch = (kept + 63) / 64;
  alignas(64) uint8_t b[64];
  for (int f = 0; f < 64; ++f) b[f] = static_cast<uint8_t>(4 * (f / 2));
  const __m512i base = _mm512_load_si512(b);
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[NR][MT], rs[NR];
  for (int r = 0; r < NR; ++r) {
    rs[r] = _mm512_setzero_si512();
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < nch; ++c) {
    __m512i idx[NR], vals[NR];
    const int64_t left = kept - 64 * c;
    const __mmask64 vm = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
    for (int r = 0; r < NR; ++r) {
      idx[r] = _mm512_add_epi8(unpack64(u2, a.indices + (n + r) * a.index_row_bytes, a.index_row_bytes, c), base);
      vals[r] = _mm512_maskz_loadu_epi8(vm, static_cast<const int8_t*>(a.values) + (n + r) * kept + 64 * c);
      rs[r] = _mm512_dpbusd_epi32(rs[r], ones, vals[r]);
    }
    for (int m = 0; m < MT; ++m) {
      const uint8_t* x = a.A_u8 + (m0 + m) * a.lda + 128 * c;
      const __m512i a0 = _mm512_loadu_si512(x), a1 = _mm512_loadu_si512(x + 64);
      for (int r = 0; r < NR; ++r)
        acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], _mm512_permutex2var_epi8(a0, idx[r], a1), vals[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int32_t rowsum = _mm512_reduce_add_epi32(rs[r]);
    const double ws = static_cast<double>(a.w_scale[n + r]);
    for (int m = 0; m < MT; ++m) {
      const int32_t exact = _mm512_reduce_add_epi32(acc[r][m]) - a.a_zero_point * rowsum;
      a.Y[(m0 + m) * a.N + n + r] =
          static_cast<float>(static_cast<double>(exact) * static_cast<double>(a.a_scale) * ws);
    }
  }
}

EK_TARGET void sparse24_u8(const Sparse24Args& a, int64_t n0, int64_t n1) {
  const Unpack u2 = make_unpack(2);
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + 4 <= n1; n += 4) sparse_u8_tile<4, 1>(a, u2, n, 0);
    for (; n < n1; ++n) sparse_u8_tile<1, 1>(a, u2, n, 0);
    return;
  }
  for (; n < n1; n += 2) {
    const bool two = n + 2 <= n1;
    int64_t m = 0;
    for (; m + 6 <= a.M; m += 6) two ? sparse_u8_tile<2, 6>(a, u2, n, m) : sparse_u8_tile<1, 6>(a, u2, n, m);
    for (; m < a.M; ++m) two ? sparse_u8_tile<2, 1>(a, u2, n, m) : sparse_u8_tile<1, 1>(a, u2, n, m);
    if (!two) break;
  }
}

// Rows [M, ld] of T re-ordered for the 2/4-bit kernels: within each block of V = 512/bits values, vector p (LANES
// elements) holds values p, p + per, p + 2*per, ... (per = V/LANES), the order the codes of a 64-byte weight load
// come out in when each lane of LANES holds `per` consecutive codes. ld must be a multiple of V.
template <class T, int LANES>
const T* interleave(const T* rows, int64_t M, int64_t ld, int bits, std::vector<T>& buf) {
  const int64_t V = 512 / bits, per = V / LANES;
  buf.resize(static_cast<size_t>(M * ld));
  for (int64_t m = 0; m < M; ++m) {
    const T* src = rows + m * ld;
    T* dst = buf.data() + m * ld;
    for (int64_t b = 0; b + V <= ld; b += V)
      for (int64_t p = 0; p < per; ++p)
        for (int64_t j = 0; j < LANES; ++j) dst[b + LANES * p + j] = src[b + per * j + p];
  }
  return buf.data();
}

// lowbit_i8_fast: one int8 per byte lane (64 per vector); other widths keep the natural order.
void prepare_i8(LowBitArgs& a, std::vector<int8_t>& buf) {
  if (a.bits == 2 || a.bits == 4) a.aq = interleave<int8_t, 64>(a.aq, a.M, a.lda_q, a.bits, buf);
}

// lowbit_f32_fast: one float per int32 lane (16 per vector).
void prepare_f32(LowBitArgs& a, std::vector<float>& buf) {
  if (a.bits != 2 && a.bits != 4) return;
  a.A = interleave<float, 16>(a.A, a.M, a.lda, a.bits, buf);
  a.f32_reordered = true;
}

}  // namespace

const KernelTable* kernels_avx512() {

  static const KernelTable table{lowbit_f32, lowbit_i8, sparse24_f32, sparse24_u8, prepare_i8, prepare_f32};
  return &table;
}

}  // namespace edgekit

namespace edgekit {
// Benchmark helper: OR-reduce [p, p + bytes) with 512-bit loads (bytes a multiple of 256).
EK_TARGET uint64_t stream_read_avx512(const uint8_t* p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= bytes; i += 256) {
    a0 = _mm512_or_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_or_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_or_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_or_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  const __m512i r = _mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3));
  return static_cast<uint64_t>(_mm512_reduce_or_epi64(r));
}
}  // namespace edgekit
