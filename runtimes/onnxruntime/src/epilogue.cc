// MatMulLowBit's fused epilogues (spec: edgekit/kernels/lowbit.py), run over outputs a task has just written (still
// in cache), after the bias: the activation (attribute activation="Gelu"), then the residual add and LayerNorm of
// whole rows (inputs skip, ln_scale, ln_bias; residual_layernorm_rows, at the end of this file's kernels).
//
// GELU: Y = gelu(Y) in place.
//
// gelu(y) = y * Phi(y) = 0.5 * y * (1 + erf(y / sqrt(2)))  (exact GELU, as torch's nn.GELU() and ONNX's Gelu).
// With u = |y| / sqrt(2) and erfc(u) ~= poly(t) * exp(-u^2), t = 1 / (1 + p u) (Abramowitz & Stegun 7.1.26,
// |error of erf| <= 1.5e-7 on all reals):
//   y <  0:  gelu = 0.5 * y * erfc(u)          (no cancellation: the small tail is computed directly)
//   y >= 0:  gelu = 0.5 * y * (2 - erfc(u))
// exp(-u^2) by range reduction to 2^n * e^r, |r| <= ln2/2, and a degree-6 Taylor polynomial (relative error
// < 2e-8), 2^n applied through the exponent bits. The AVX-512 and AVX2 paths compute exactly this, 16 or 8 lanes at
// a time (~27 cycles per 16 values on Zen 4: about 30 vector instructions, one per cycle; a reciprocal estimate
// with a Newton step instead of the division measured the same); the scalar path (other CPUs) calls std::erf.
// tests/test_kernels_ort_native.py checks every path against math.erf.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace edgekit {
namespace {

constexpr float kP = 0.3275911f;
constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f, kA4 = -1.453152027f,
                kA5 = 1.061405429f;
constexpr float kRsqrt2 = 0.70710678118654752f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
constexpr float kMaxU2 = 87.f;  // exp(-87) ~ 1.6e-38: past it erfc is 0 in fp32 arithmetic anyway

void gelu_scalar(float* Y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* y = Y + m * ldy;
    for (int64_t n = n0; n < n1; ++n) y[n] = 0.5f * y[n] * (1.f + std::erf(y[n] * kRsqrt2));
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define EK_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#define EK_AVX2 __attribute__((target("avx2,fma")))

EK_AVX512 inline __m512 gelu16(__m512 y) {
  const __m512 u = _mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(kRsqrt2));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_set1_ps(kP), u, _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(kA5), t, _mm512_set1_ps(kA4));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA3));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA2));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA1));
  poly = _mm512_mul_ps(poly, t);
  // e = exp(-u^2)
  const __m512 x = _mm512_max_ps(_mm512_mul_ps(_mm512_mul_ps(u, u), _mm512_set1_ps(-1.f)), _mm512_set1_ps(-kMaxU2));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 720.f), r, _mm512_set1_ps(1.f / 120.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  e = _mm512_scalef_ps(e, n);
  const __m512 erfc = _mm512_mul_ps(poly, e);
  const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi2 = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.f), erfc), erfc);  // 2 * Phi(y)
  return _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), phi2);
}

EK_AVX512 void gelu_avx512(float* Y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* y = Y + m * ldy;
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) _mm512_storeu_ps(y + n, gelu16(_mm512_loadu_ps(y + n)));
    if (n < n1) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n1 - n)) - 1u);
      _mm512_mask_storeu_ps(y + n, k, gelu16(_mm512_maskz_loadu_ps(k, y + n)));
    }
  }
}

EK_AVX2 inline __m256 gelu8(__m256 y) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 u = _mm256_mul_ps(_mm256_and_ps(y, absmask), _mm256_set1_ps(kRsqrt2));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(_mm256_set1_ps(kP), u, _mm256_set1_ps(1.f)));
  __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(kA5), t, _mm256_set1_ps(kA4));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA3));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA2));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA1));
  poly = _mm256_mul_ps(poly, t);
  const __m256 x = _mm256_max_ps(_mm256_mul_ps(_mm256_mul_ps(u, u), _mm256_set1_ps(-1.f)), _mm256_set1_ps(-kMaxU2));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT |
                                                                                  _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 e = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720.f), r, _mm256_set1_ps(1.f / 120.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 24.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 6.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  // 2^n through the exponent bits: n in [-126, 0] here (x in [-87, 0]), so 127 + n is a normal exponent
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  e = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
  const __m256 erfc = _mm256_mul_ps(poly, e);
  const __m256 neg = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi2 = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.f), erfc), erfc, neg);
  return _mm256_mul_ps(_mm256_mul_ps(y, _mm256_set1_ps(0.5f)), phi2);
}

EK_AVX2 void gelu_avx2(float* Y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* y = Y + m * ldy;
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) _mm256_storeu_ps(y + n, gelu8(_mm256_loadu_ps(y + n)));
    if (n < n1) {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = n; i < n1; ++i) tmp[i - n] = y[i];
      _mm256_store_ps(tmp, gelu8(_mm256_load_ps(tmp)));
      for (int64_t i = n; i < n1; ++i) y[i] = tmp[i - n];
    }
  }
}
#endif

// Residual add and LayerNorm of whole rows: x = y + skip (skip optional); with gamma, y = (x - mean) / sqrt(var + eps)
// * gamma (+ beta), mean and variance over the row's N values (biased variance, as ONNX LayerNormalization).
void residual_layernorm_scalar(float* Y, int64_t N, const float* skip, const float* gamma, const float* beta,
                               float eps, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* y = Y + m * N;
    if (skip)
      for (int64_t n = 0; n < N; ++n) y[n] += skip[m * N + n];
    if (!gamma) continue;
    double sum = 0.0, sq = 0.0;
    for (int64_t n = 0; n < N; ++n) sum += y[n];
    const double mean = sum / static_cast<double>(N);
    for (int64_t n = 0; n < N; ++n) sq += (y[n] - mean) * (y[n] - mean);
    const float mu = static_cast<float>(mean);
    const float rs = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(N) + static_cast<double>(eps)));
    for (int64_t n = 0; n < N; ++n) y[n] = (y[n] - mu) * rs * gamma[n] + (beta ? beta[n] : 0.f);
  }
}

#if defined(__x86_64__) || defined(__i386__)
EK_AVX512 void residual_layernorm_avx512(float* Y, int64_t N, const float* skip, const float* gamma,
                                         const float* beta, float eps, int64_t m0, int64_t m1) {
  const int64_t full = N / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (N - full)) - 1u);
  for (int64_t m = m0; m < m1; ++m) {
    float* y = Y + m * N;
    const float* sk = skip ? skip + m * N : nullptr;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t n = 0; n < full; n += 16) {
      __m512 v = _mm512_loadu_ps(y + n);
      if (sk) v = _mm512_add_ps(v, _mm512_loadu_ps(sk + n)), _mm512_storeu_ps(y + n, v);
      acc = _mm512_add_ps(acc, v);
    }
    if (tail) {
      __m512 v = _mm512_maskz_loadu_ps(tail, y + full);
      if (sk) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(tail, sk + full)), _mm512_mask_storeu_ps(y + full, tail, v);
      acc = _mm512_add_ps(acc, v);
    }
    if (!gamma) continue;
    const float mean = _mm512_reduce_add_ps(acc) / static_cast<float>(N);
    const __m512 vm = _mm512_set1_ps(mean);
    __m512 sq = _mm512_setzero_ps();
    for (int64_t n = 0; n < full; n += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(y + n), vm);
      sq = _mm512_fmadd_ps(d, d, sq);
    }
    if (tail) {
      const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, y + full), vm);
      sq = _mm512_fmadd_ps(d, d, sq);
    }
    const float rs = 1.f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(N) + eps);
    const __m512 vr = _mm512_set1_ps(rs);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 k = n + 16 <= N ? static_cast<__mmask16>(0xFFFF) : tail;
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, y + n), vm), vr),
                               _mm512_maskz_loadu_ps(k, gamma + n));
      if (beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, beta + n));
      _mm512_mask_storeu_ps(y + n, k, v);
    }
  }
}
#endif

}  // namespace

void residual_layernorm_rows(Isa isa, float* Y, int64_t N, const float* skip, const float* gamma, const float* beta,
                             float eps, int64_t m0, int64_t m1) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) return residual_layernorm_avx512(Y, N, skip, gamma, beta, eps, m0, m1);
#endif
  residual_layernorm_scalar(Y, N, skip, gamma, beta, eps, m0, m1);
}

void gelu_rows(Isa isa, float* Y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) return gelu_avx512(Y, ldy, m0, m1, n0, n1);
  if (isa == Isa::kAvx2) return gelu_avx2(Y, ldy, m0, m1, n0, n1);
#endif
  gelu_scalar(Y, ldy, m0, m1, n0, n1);
}

}  // namespace edgekit
