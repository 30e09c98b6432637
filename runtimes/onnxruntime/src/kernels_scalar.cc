// Portable scalar kernels: the fallback path, and the readable statement of what the SIMD paths compute.
#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace edgekit {
namespace {

// Codes of one packed row (lowbit.py's little-endian bitstream), values [0, count).
void unpack_row(const uint8_t* row, int64_t row_bytes, int bits, int64_t count, uint8_t* out) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t bit = j * bits;
    const int64_t byte = bit >> 3;
    uint32_t w = row[byte];
    if (byte + 1 < row_bytes) w |= static_cast<uint32_t>(row[byte + 1]) << 8;
    out[j] = static_cast<uint8_t>((w >> (bit & 7)) & mask);
  }
}

void lowbit_f32(const LowBitArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> codes;
  codes.resize(static_cast<size_t>(a.Kp));
  const int sym_zp = 1 << (a.bits - 1);
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(a.B + n * a.row_bytes, a.row_bytes, a.bits, a.Kp, codes.data());
    const float* s = a.scales + n * a.groups;
    const uint8_t* zp = a.zero_points ? a.zero_points + n * a.groups : nullptr;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.A + m * a.lda;
      float total = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int z = zp ? zp[g] : sym_zp;
        const int64_t k0 = g * a.group, k1 = std::min<int64_t>(k0 + a.group, a.K);
        float acc = 0.f;
        for (int64_t k = k0; k < k1; ++k) acc += x[k] * (static_cast<float>(codes[k] - z) * s[g]);
        total += acc;
      }
      a.Y[m * a.N + n] = total;
    }
  }
}

void lowbit_i8(const LowBitArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> codes;
  codes.resize(static_cast<size_t>(a.Kp));
  const int sym_zp = 1 << (a.bits - 1);
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(a.B + n * a.row_bytes, a.row_bytes, a.bits, a.Kp, codes.data());
    const float* s = a.scales + n * a.groups;
    const uint8_t* zp = a.zero_points ? a.zero_points + n * a.groups : nullptr;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.aq + m * a.lda_q;
      const int32_t* asum = a.asum + m * a.groups;
      float total = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int z = zp ? zp[g] : sym_zp;
        int32_t dot = 0;
        for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) dot += static_cast<int32_t>(codes[k]) * x[k];
        total += s[g] * static_cast<float>(dot) - s[g] * static_cast<float>(z) * static_cast<float>(asum[g]);
      }
      a.Y[m * a.N + n] = total * a.a_scale[m];
    }
  }
}

inline void positions(const uint8_t* idx, int64_t g, int& i0, int& i1) {
  const int nib = (idx[g >> 1] >> ((g & 1) * 4)) & 15;
  i0 = nib & 3;
  i1 = nib >> 2;
}

void sparse24_f32(const Sparse24Args& a, int64_t n0, int64_t n1) {
  const int64_t G = a.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* idx = a.indices + n * a.index_row_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.A + m * a.lda;
      float acc = 0.f;
      if (a.int8_values) {
        const int8_t* v = static_cast<const int8_t*>(a.values) + n * (a.K / 2);
        for (int64_t g = 0; g < G; ++g) {
          int i0, i1;
          positions(idx, g, i0, i1);
          acc += x[4 * g + i0] * static_cast<float>(v[2 * g]) + x[4 * g + i1] * static_cast<float>(v[2 * g + 1]);
        }
        acc *= a.w_scale[n];
      } else {
        const float* v = static_cast<const float*>(a.values) + n * (a.K / 2);
        for (int64_t g = 0; g < G; ++g) {
          int i0, i1;
          positions(idx, g, i0, i1);
          acc += x[4 * g + i0] * v[2 * g] + x[4 * g + i1] * v[2 * g + 1];
        }
      }
      a.Y[m * a.N + n] = acc;
    }
  }
}

void sparse24_u8(const Sparse24Args& a, int64_t n0, int64_t n1) {
  const int64_t G = a.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* idx = a.indices + n * a.index_row_bytes;
    const int8_t* v = static_cast<const int8_t*>(a.values) + n * (a.K / 2);
    int32_t rowsum = 0;
    for (int64_t j = 0; j < a.K / 2; ++j) rowsum += v[j];
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* x = a.A_u8 + m * a.lda;
      int32_t acc = 0;
      for (int64_t g = 0; g < G; ++g) {
        int i0, i1;
        positions(idx, g, i0, i1);
        acc += static_cast<int32_t>(x[4 * g + i0]) * v[2 * g] + static_cast<int32_t>(x[4 * g + i1]) * v[2 * g + 1];
      }
      const int32_t exact = acc - a.a_zero_point * rowsum;
      a.Y[m * a.N + n] = static_cast<float>(static_cast<double>(exact) * static_cast<double>(a.a_scale) *
                                            static_cast<double>(a.w_scale[n]));
    }
  }
}

}  // namespace

const KernelTable& kernels_scalar() {
  static const KernelTable table{lowbit_f32, lowbit_i8, sparse24_f32, sparse24_u8, nullptr, nullptr};
  return table;
}

}  // namespace edgekit
