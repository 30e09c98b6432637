// ai.edgekit::QLinearDepthwiseConv: the portable kernel (the AVX2 path runs it too) and the tap pointers every
// kernel shares. Integer accumulation is exact; the requantization is the float formula of dwconv.h.
#include <algorithm>
#include <cmath>

#include "dwconv.h"

namespace edgekit {

void dwconv_tap_pointers(const DwConvArgs& a, const PackedDwConv& p, int64_t r, std::vector<const uint8_t*>& ptr,
                         int64_t stride, int64_t ox0, int64_t ox1) {
  const int64_t n = r / a.Ho, oy = r % a.Ho;
  ptr.assign(static_cast<size_t>((ox1 - ox0) * stride), p.zero_row.data());
  for (int64_t ox = ox0; ox < ox1; ++ox)
    for (int64_t ky = 0; ky < a.kh; ++ky)
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t iy = oy * a.sh - a.pad_top + ky * a.dh, ix = ox * a.sw - a.pad_left + kx * a.dw;
        const bool in = iy >= 0 && iy < a.H && ix >= 0 && ix < a.W;
        ptr[(ox - ox0) * stride + ky * a.kw + kx] = in ? a.X + ((n * a.H + iy) * a.W + ix) * a.C : p.zero_row.data();
      }
}

void dwconv_row_scalar(const DwConvArgs& a, const PackedDwConv& p, int64_t r, int64_t c0, int64_t c1) {
  thread_local std::vector<const uint8_t*> ptr;
  const int64_t taps = p.taps;
  dwconv_tap_pointers(a, p, r, ptr, taps, 0, a.Wo);
  uint8_t* yrow = a.Y + r * a.Wo * a.C;
  for (int64_t ox = 0; ox < a.Wo; ++ox) {
    const uint8_t* const* tp = ptr.data() + ox * taps;
    for (int64_t c = c0; c < c1; ++c) {
      int32_t acc = p.bias[c];
      for (int64_t t = 0; t < taps; ++t) acc += static_cast<int32_t>(tp[t][c]) * p.w[t * p.Cp + c];
      const float v = std::nearbyint(static_cast<float>(acc) * p.scale[c]);
      const int64_t q = static_cast<int64_t>(v) + p.y_zero;
      yrow[ox * a.C + c] = static_cast<uint8_t>(std::min<int64_t>(255, std::max<int64_t>(0, q)));
    }
  }
}

std::vector<int64_t> dwconv_tap_offsets(const DwConvArgs& a, const PackedDwConv& p) {
  std::vector<int64_t> off(static_cast<size_t>(p.taps_padded), 0);
  for (int64_t ky = 0; ky < a.kh; ++ky)
    for (int64_t kx = 0; kx < a.kw; ++kx) off[ky * a.kw + kx] = (ky * a.dh * a.W + kx * a.dw) * a.C;
  return off;
}

void dwconv_pack_vnni(PackedDwConv& p) {
  const int64_t blocks = p.Cp / 64, groups = p.taps_padded / 4;
  p.wv.assign(static_cast<size_t>(blocks * groups * 256), 0);
  p.bias_v.assign(static_cast<size_t>(p.Cp), 0);
  p.scale_v.assign(static_cast<size_t>(p.Cp), 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t valid = std::min<int64_t>(64, p.C - 64 * b);
    const int64_t G = 4 / (valid == 64 ? 1 : dwconv_tail_pixels(valid));
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t L = 0; L < 4; ++L)
        for (int64_t k = 0; k < 4; ++k) {
          const int64_t c = 64 * b + 16 * (L % G) + 4 * j + k, lane = 4 * L + k;
          p.bias_v[64 * b + 16 * j + lane] = p.bias[c];
          p.scale_v[64 * b + 16 * j + lane] = p.scale[c];
          for (int64_t g = 0; g < groups; ++g)
            for (int64_t i = 0; i < 4; ++i) {
              const int64_t t = 4 * g + i;
              p.wv[((b * groups + g) * 4 + j) * 64 + 4 * lane + i] =
                  t < p.taps ? static_cast<int8_t>(p.w[t * p.Cp + c]) : int8_t(0);
            }
        }
  }
}

}  // namespace edgekit
