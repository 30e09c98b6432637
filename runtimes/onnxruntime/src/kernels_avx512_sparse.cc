// AVX-512 VNNI MatMulSparse24 (int8 values, uint8 activations) for batches: the GEMM path, on weights re-packed
// once per kernel instance (constant values and indices).
//
// Why not gather per row: the unpacked kernel (kernels_avx512.cc) gathers, for every weight row and activation
// row, the 64 activations the weight row keeps (vpermt2b) and multiplies them (vpdpbusd). On the cores measured
// here the gather and the multiply issue on the same port at the same rate, so a gather per multiply costs what
// 2:4 saves: 0.85x dense int8 at best.
//
// Here the gathers are shared by all weight rows. A pair of groups (8 dense positions, 4 kept values) has one of
// 6 x 6 = 36 sparsity patterns. For 16 activation rows at a time (one per int32 lane: "lanes = m"), the kernel
// builds a table with, per pair and pattern, the 64-byte vector whose lane m holds the 4 activations of row m at
// that pattern's positions (one vpermt2b each, from the pair's 8 activations of the 16 rows). A weight row then
// costs, per pair, one table load (chosen by its pattern) and one vpdpbusd with its 4 kept values broadcast to all
// lanes: 4 useful products per lane, twice dense int8's per instruction. The table (36 vectors per pair and 16
// rows) is built per block of P pairs (in L2), once per task, and is amortized over the task's weight rows.
//
// Packed layout (PackedSparse24): per block of P pairs and per weight row, P pattern bytes (6 * p0 + p1, p0/p1 the
// index of each group's nibble in kNibbles) then P int32 words of the 4 kept values (group 2j's two, then group
// 2j+1's, in position order), blocks outermost so that a task streams its rows block by block. Row sums of the
// values give the zero-point term. Activations are re-laid as [pairs][16-row blocks][16 rows][8 bytes] per call.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#define EK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,bmi2")))

namespace edgekit {
namespace {

constexpr uint8_t kNibbles[6] = {0x4, 0x8, 0xC, 0x9, 0xD, 0xE};  // i0 | i1 << 2 (sparse24.VALID_NIBBLES)
constexpr int64_t kPairsPerBlock = 16;
constexpr int kMaxBlocksOfRows = 4;  // 16-row activation blocks per pass (registers: one accumulator each)
constexpr int kRowsPerStep = 4;      // weight rows per step (measured: 4 beats 1, 2 and 8 at M = 32 and 128)

int pattern_of(int nibble) {
  for (int i = 0; i < 6; ++i)
    if (kNibbles[i] == nibble) return i;
  return -1;
}

bool pack(const Sparse24Args& a, PackedSparse24& out) {
  if (!a.int8_values || a.K % 4 || a.N < 1) return false;
  const int64_t groups = a.K / 4, kept = a.K / 2, pairs = (groups + 1) / 2, P = kPairsPerBlock;
  out.n = a.N, out.pairs = pairs, out.pairs_per_block = P, out.blocks = (pairs + P - 1) / P;
  out.data.assign(static_cast<size_t>(out.blocks * a.N * 5 * P), 0);
  out.rowsum.assign(static_cast<size_t>(a.N), 0);
  const int8_t* values = static_cast<const int8_t*>(a.values);
  for (int64_t n = 0; n < a.N; ++n) {
    int32_t sum = 0;
    for (int64_t p = 0; p < pairs; ++p) {
      uint8_t* row = out.data.data() + ((p / P) * a.N + n) * 5 * P;
      int pattern = 0;
      int8_t w[4] = {0, 0, 0, 0};
      for (int h = 0; h < 2; ++h) {
        const int64_t g = 2 * p + h;
        int pg = 0;  // a missing last group: pattern (0, 1), values 0
        if (g < groups) {
          pg = pattern_of((a.indices[n * a.index_row_bytes + g / 2] >> (4 * (g % 2))) & 15);
          if (pg < 0) return false;  // not a valid nibble: the unpacked kernel reads it as the spec says
          w[2 * h] = values[n * kept + 2 * g], w[2 * h + 1] = values[n * kept + 2 * g + 1];
        }
        pattern = 6 * pattern + pg;
      }
      row[p % P] = static_cast<uint8_t>(pattern);
      std::memcpy(row + P + 4 * (p % P), w, 4);
      sum += w[0] + w[1] + w[2] + w[3];
    }
    out.rowsum[static_cast<size_t>(n)] = sum;
  }
  return true;
}

// The 36 vpermt2b index vectors: lane j (activation row j of 16) takes bytes i0, i1 of its group 0 and i0', i1'
// of its group 1 from its 8 bytes (8j .. 8j + 7 of the two source registers).
struct PatternIndex {
  alignas(64) uint8_t v[36][64];
  PatternIndex() {
    for (int c = 0; c < 36; ++c) {
      const int n0 = kNibbles[c / 6], n1 = kNibbles[c % 6];
      const int pos[4] = {n0 & 3, n0 >> 2, 4 + (n1 & 3), 4 + (n1 >> 2)};
      for (int j = 0; j < 16; ++j)
        for (int b = 0; b < 4; ++b) v[c][4 * j + b] = static_cast<uint8_t>(8 * j + pos[b]);
    }
  }
};

// Activations [M, lda] -> xt [pairs][mblocks][16][8] (rows past M and positions past K are zero).
void relayout(const Sparse24Args& a, const PackedSparse24& pk, std::vector<uint8_t>& xt) {
  const int64_t mblocks = (a.M + 15) / 16;
  xt.assign(static_cast<size_t>(pk.pairs * mblocks * 128), 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t p = 0; p < pk.pairs; ++p) {
      const int64_t len = std::min<int64_t>(8, a.K - 8 * p);
      std::memcpy(xt.data() + ((p * mblocks + m / 16) * 16 + m % 16) * 8, a.A_u8 + m * a.lda + 8 * p,
                  static_cast<size_t>(len));
    }
}

// NR weight rows [n, n + NR) over block b of pairs (np of them), MB activation blocks: the int32 sums in part
// (rows relative to n0) are loaded (after the first block), accumulated and stored. NR rows at once give NR * MB
// independent accumulators and share the table row addresses' arithmetic.
template <int MB, int NR>
EK_TARGET inline __attribute__((always_inline)) void rows(const PackedSparse24& pk, const uint8_t* tab, int64_t b,
                                                          int64_t np, int64_t n, int64_t n0,
                                                          std::vector<int32_t>& part) {
  const int64_t P = pk.pairs_per_block;
  const uint8_t* row[NR];
  int32_t* out[NR];
  __m512i acc[NR][MB];
  for (int r = 0; r < NR; ++r) {
    row[r] = pk.data.data() + (b * pk.n + n + r) * 5 * P;
    out[r] = part.data() + (n + r - n0) * MB * 16;
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = b ? _mm512_loadu_si512(out[r] + 16 * mb) : _mm512_setzero_si512();
  }
  for (int64_t j = 0; j < np; ++j) {
    const uint8_t* tj = tab + j * 36 * MB * 64;
    for (int r = 0; r < NR; ++r) {
      const uint8_t* t = tj + row[r][j] * MB * 64;
      int32_t wj;
      std::memcpy(&wj, row[r] + P + 4 * j, 4);
      const __m512i wb = _mm512_set1_epi32(wj);
      for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_dpbusd_epi32(acc[r][mb], _mm512_load_si512(t + 64 * mb), wb);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int mb = 0; mb < MB; ++mb) _mm512_storeu_si512(out[r] + 16 * mb, acc[r][mb]);
}

// Rows [n0, n1), activation blocks [mb0, mb0 + MB): int32 sums into part [n1 - n0][MB][16], then Y.
template <int MB>
EK_TARGET void pass(const Sparse24Args& a, const PackedSparse24& pk, const uint8_t* xt, int64_t mb0, int64_t n0,
                    int64_t n1, std::vector<uint8_t>& table, std::vector<int32_t>& part) {
  static const PatternIndex index;
  const int64_t P = pk.pairs_per_block, mblocks = (a.M + 15) / 16, count = n1 - n0;
  table.resize(static_cast<size_t>(P * 36 * MB * 64 + 64));
  uint8_t* tab = table.data() + (64 - reinterpret_cast<uintptr_t>(table.data()) % 64) % 64;  // 64-byte aligned
  part.resize(static_cast<size_t>(count * MB * 16));
  for (int64_t b = 0; b < pk.blocks; ++b) {
    const int64_t p0 = b * P, np = std::min(P, pk.pairs - p0);
    for (int64_t j = 0; j < np; ++j)
      for (int mb = 0; mb < MB; ++mb) {
        const uint8_t* src = xt + ((p0 + j) * mblocks + mb0 + mb) * 128;
        const __m512i r0 = _mm512_loadu_si512(src), r1 = _mm512_loadu_si512(src + 64);
        for (int c = 0; c < 36; ++c)
          _mm512_store_si512(tab + ((j * 36 + c) * MB + mb) * 64,
                             _mm512_permutex2var_epi8(r0, _mm512_load_si512(index.v[c]), r1));
      }
    int64_t n = n0;
    for (; n + kRowsPerStep <= n1; n += kRowsPerStep) rows<MB, kRowsPerStep>(pk, tab, b, np, n, n0, part);
    for (; n < n1; ++n) rows<MB, 1>(pk, tab, b, np, n, n0, part);
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t zterm = a.a_zero_point * pk.rowsum[static_cast<size_t>(n)];
    const double scale = static_cast<double>(a.a_scale) * static_cast<double>(a.w_scale[n]);
    const int32_t* s = part.data() + (n - n0) * MB * 16;
    for (int64_t m = 16 * mb0; m < std::min(a.M, 16 * (mb0 + MB)); ++m)
      a.Y[m * a.N + n] = static_cast<float>(static_cast<double>(s[m - 16 * mb0] - zterm) * scale);
  }
}

void run(const Sparse24Args& a, const PackedSparse24& pk, const uint8_t* xt, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> table;
  thread_local std::vector<int32_t> part;
  const int64_t mblocks = (a.M + 15) / 16;
  for (int64_t mb = 0; mb < mblocks;) {
    const int64_t left = mblocks - mb;
    if (left >= 4) {
      pass<4>(a, pk, xt, mb, n0, n1, table, part), mb += 4;
    } else if (left == 3) {
      pass<3>(a, pk, xt, mb, n0, n1, table, part), mb += 3;
    } else if (left == 2) {
      pass<2>(a, pk, xt, mb, n0, n1, table, part), mb += 2;
    } else {
      pass<1>(a, pk, xt, mb, n0, n1, table, part), mb += 1;
    }
  }
  static_assert(kMaxBlocksOfRows == 4, "run() dispatches passes of up to 4 blocks of 16 rows");
}

}  // namespace

const PackedSparse24Kernels* packed_sparse24_avx512() {
  static const PackedSparse24Kernels k{pack, relayout, run};
  return &k;
}

}  // namespace edgekit
