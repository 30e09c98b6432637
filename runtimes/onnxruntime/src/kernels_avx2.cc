// AVX2 + FMA + BMI2 kernels (Haswell and later, Zen): the path for x86 CPUs without AVX-512 VNNI/VBMI.
//
// Each weight row is unpacked once per call into a per-thread code buffer (pdep spreads 8 values of b bits into 8
// bytes), then: fp32 math with 8-wide FMA, or int8 math with vpmaddubsw (codes <= 15, no saturation) or vpmaddwd
// (8-bit codes), both exact in int32. MatMulSparse24 decompresses each row into a dense buffer.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#define EK_TARGET __attribute__((target("avx2,fma,bmi2")))

namespace edgekit {
namespace {

EK_TARGET const uint8_t* unpack_row(const LowBitArgs& a, int64_t n, std::vector<uint8_t>& buf) {
  const uint8_t* row = a.B + n * a.row_bytes;
  if (a.bits == 8) return row;
  buf.resize(static_cast<size_t>(a.Kp));
  const uint64_t mask = a.bits == 2 ? 0x0303030303030303ULL : a.bits == 3 ? 0x0707070707070707ULL
                                                                          : 0x0F0F0F0F0F0F0F0FULL;
  const int64_t units = a.Kp / 8;  // Kp is a multiple of 32: whole units of 8 values = `bits` bytes
  for (int64_t u = 0; u < units; ++u) {
    uint64_t x = 0;
    std::memcpy(&x, row + u * a.bits, static_cast<size_t>(a.bits));
    const uint64_t out = _pdep_u64(x, mask);
    std::memcpy(buf.data() + 8 * u, &out, 8);
  }
  return buf.data();
}

EK_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

EK_TARGET inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

constexpr int kMT = 4;

EK_TARGET void lowbit_f32(const LowBitArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> buf;
  const int sym = 1 << (a.bits - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = unpack_row(a, n, buf);
    const float* s = a.scales + n * a.groups;
    const uint8_t* zp = a.zero_points ? a.zero_points + n * a.groups : nullptr;
    for (int64_t m0 = 0; m0 < a.M; m0 += kMT) {
      const int mt = static_cast<int>(std::min<int64_t>(kMT, a.M - m0));
      __m256 acc[kMT][2];
      for (int m = 0; m < kMT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
      for (int64_t g = 0; g < a.groups; ++g) {
        const __m256i z = _mm256_set1_epi32(zp ? zp[g] : sym);
        const __m256 sv = _mm256_set1_ps(s[g]);
        for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 16) {
          __m256 w[2];
          for (int h = 0; h < 2; ++h) {
            const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k + 8 * h)));
            w[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, z)), sv);
          }
          for (int m = 0; m < mt; ++m) {
            const float* x = a.A + (m0 + m) * a.lda + k;
            acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w[0], acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w[1], acc[m][1]);
          }
        }
      }
      for (int m = 0; m < mt; ++m) a.Y[(m0 + m) * a.N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
    }
  }
}

EK_TARGET void lowbit_i8(const LowBitArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> buf;
  const int sym = 1 << (a.bits - 1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = unpack_row(a, n, buf);
    const float* s = a.scales + n * a.groups;
    const uint8_t* zp = a.zero_points ? a.zero_points + n * a.groups : nullptr;
    for (int64_t m0 = 0; m0 < a.M; m0 += kMT) {
      const int mt = static_cast<int>(std::min<int64_t>(kMT, a.M - m0));
      __m256 accf[kMT];
      float corr[kMT] = {0.f, 0.f, 0.f, 0.f};
      for (int m = 0; m < kMT; ++m) accf[m] = _mm256_setzero_ps();
      for (int64_t g = 0; g < a.groups; ++g) {
        __m256i acci[kMT];
        for (int m = 0; m < kMT; ++m) acci[m] = _mm256_setzero_si256();
        for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k));
          if (a.bits <= 4) {
            for (int m = 0; m < mt; ++m) {
              const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.aq + (m0 + m) * a.lda_q + k));
              acci[m] = _mm256_add_epi32(acci[m], _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones16));
            }
          } else {
            const __m256i q0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
            const __m256i q1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
            for (int m = 0; m < mt; ++m) {
              const int8_t* xp = a.aq + (m0 + m) * a.lda_q + k;
              const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp)));
              const __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + 16)));
              acci[m] = _mm256_add_epi32(acci[m], _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1)));
            }
          }
        }
        const __m256 sv = _mm256_set1_ps(s[g]);
        const float sz = s[g] * static_cast<float>(zp ? zp[g] : sym);
        for (int m = 0; m < mt; ++m) {
          accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acci[m]), sv, accf[m]);
          corr[m] += sz * static_cast<float>(a.asum[(m0 + m) * a.groups + g]);
        }
      }
      for (int m = 0; m < mt; ++m) a.Y[(m0 + m) * a.N + n] = (hsum(accf[m]) - corr[m]) * a.a_scale[m0 + m];
    }
  }
}

EK_TARGET void sparse24_f32(const Sparse24Args& a, int64_t n0, int64_t n1) {
  thread_local std::vector<float> dense;
  dense.assign(static_cast<size_t>(a.lda), 0.f);
  const int64_t G = a.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* idx = a.indices + n * a.index_row_bytes;
    std::fill(dense.begin(), dense.end(), 0.f);
    for (int64_t g = 0; g < G; ++g) {
      const int nib = (idx[g >> 1] >> ((g & 1) * 4)) & 15;
      float v0, v1;
      if (a.int8_values) {
        const int8_t* v = static_cast<const int8_t*>(a.values) + n * (a.K / 2);
        v0 = static_cast<float>(v[2 * g]), v1 = static_cast<float>(v[2 * g + 1]);
      } else {
        const float* v = static_cast<const float*>(a.values) + n * (a.K / 2);
        v0 = v[2 * g], v1 = v[2 * g + 1];
      }
      dense[4 * g + (nib & 3)] = v0;
      dense[4 * g + (nib >> 2)] = v1;
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.A + m * a.lda;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t k = 0; k < a.lda; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(dense.data() + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(dense.data() + k + 8), acc1);
      }
      float y = hsum(_mm256_add_ps(acc0, acc1));
      if (a.int8_values) y *= a.w_scale[n];
      a.Y[m * a.N + n] = y;
    }
  }
}

EK_TARGET void sparse24_u8(const Sparse24Args& a, int64_t n0, int64_t n1) {
  thread_local std::vector<int8_t> dense;
  dense.assign(static_cast<size_t>(a.lda), 0);
  const int64_t G = a.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* idx = a.indices + n * a.index_row_bytes;
    const int8_t* v = static_cast<const int8_t*>(a.values) + n * (a.K / 2);
    std::fill(dense.begin(), dense.end(), 0);
    int32_t rowsum = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int nib = (idx[g >> 1] >> ((g & 1) * 4)) & 15;
      dense[4 * g + (nib & 3)] = v[2 * g];
      dense[4 * g + (nib >> 2)] = v[2 * g + 1];
      rowsum += v[2 * g] + v[2 * g + 1];
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* x = a.A_u8 + m * a.lda;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t k = 0; k < a.lda; k += 16) {
        const __m256i xa = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k)));
        const __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dense.data() + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xa, wa));
      }
      const int32_t exact = hsum_epi32(acc) - a.a_zero_point * rowsum;
      a.Y[m * a.N + n] = static_cast<float>(static_cast<double>(exact) * static_cast<double>(a.a_scale) *
                                            static_cast<double>(a.w_scale[n]));
    }
  }
}

}  // namespace

const KernelTable* kernels_avx2() {
  static const KernelTable table{lowbit_f32, lowbit_i8, sparse24_f32, sparse24_u8, nullptr, nullptr};
  return &table;
}

}  // namespace edgekit
