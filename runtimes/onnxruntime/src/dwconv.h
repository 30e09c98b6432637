// edgekit ONNX Runtime custom ops: ai.edgekit::QLinearDepthwiseConv kernels (scalar and AVX-512 VNNI).
//
// The op (specification and numpy reference: edgekit/kernels/dwconv.py) is ONNX QLinearConv restricted to a
// depthwise convolution (group = channels, one filter per channel) on channels-last (NHWC) uint8 activations with
// int8 weights, zero weight zero points (symmetric) and per-tensor or per-channel weight scales:
//
//   acc[c]   = B[c] + sum_t (x_t[c] - x_zero) * w[c, t]          (padding taps read x_zero: they add nothing)
//   y[c]     = clamp(round_half_even(float(acc[c]) * s[c]) + y_zero, 0, 255),  s[c] = x_scale * w_scale[c] / y_scale
//
// which is how ONNX Runtime's QLinearConv requantizes (MLAS: float scale, round to nearest even, add the zero point,
// saturate). Work is split into tasks of (output row, range of channels).
#pragma once

#include <cstdint>
#include <vector>

namespace edgekit {

// Weights and requantization constants of one node, packed once (dwconv_op.cc: pack_dwconv).
struct PackedDwConv {
  int64_t C = 0, Cp = 0, taps = 0;  // channels, channels rounded up to 64, kernel taps (kh * kw)
  int64_t taps_padded = 0;           // taps rounded up to 4 (the padding taps have zero weights)
  std::vector<int32_t> w;            // [taps][Cp]: w[c, t] widened to int32 (0 past C)
  std::vector<int32_t> bias;         // [Cp]: B[c] - x_zero * sum_t w[c, t]
  std::vector<float> scale;          // [Cp]: x_scale * w_scale[c] / y_scale
  // The AVX-512 kernel's order (dwconv_avx512.cc): per 64-channel block b, per group g of 4 taps, per vector j
  // (0-3), 64 bytes: int32 lane 4 L + k holds w[c, 4 g + 0..3] for c = 64 b + 16 (L % G) + 4 j + k, G = 4 / P
  // (P = pixels per vector: 1, or dwconv_tail_pixels for a partial last block). bias_v and scale_v: per block, per
  // vector j, lane 4 L + k: the same channel.
  std::vector<int8_t> wv;
  std::vector<int32_t> bias_v;
  std::vector<float> scale_v;
  int32_t y_zero = 0;
  std::vector<uint8_t> zero_row;     // [Cp] bytes of x_zero: what padding taps read
};

struct DwConvArgs {
  int64_t N = 0, H = 0, W = 0, C = 0;   // input [N, H, W, C]
  int64_t kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1, pad_top = 0, pad_left = 0;
  int64_t Ho = 0, Wo = 0;              // output [N, Ho, Wo, C]
  const uint8_t* X = nullptr;
  uint8_t* Y = nullptr;
  // [taps_padded] (dwconv_tap_offsets): tap t's offset in bytes from its column's first tap, (ky dh W + kx dw) C;
  // the padding taps (zero weights) repeat tap 0
  const int64_t* tap_offsets = nullptr;
};

// The tap offsets of a (dwconv.h DwConvArgs::tap_offsets) for p's padded tap count.
std::vector<int64_t> dwconv_tap_offsets(const DwConvArgs& a, const PackedDwConv& p);

// Output row r (of N * Ho), channels [c0, c1) (c0 a multiple of 64).
using DwConvFn = void (*)(const DwConvArgs& a, const PackedDwConv& p, int64_t r, int64_t c0, int64_t c1);

void dwconv_row_scalar(const DwConvArgs& a, const PackedDwConv& p, int64_t r, int64_t c0, int64_t c1);
DwConvFn dwconv_row_avx512();  // null when not compiled in

// Tap pointers of columns [ox0, ox1) of output row r: ptr[(ox - ox0) * stride + t] = the input pixel tap t of
// output column ox reads, or p.zero_row when it falls in the padding; taps t in [kh kw, stride) also read
// p.zero_row (stride >= kh kw).
void dwconv_tap_pointers(const DwConvArgs& a, const PackedDwConv& p, int64_t r, std::vector<const uint8_t*>& ptr,
                         int64_t stride, int64_t ox0, int64_t ox1);

// The last 64-channel block of a channel count that is not a multiple of 64 holds `valid` < 64 channels, i.e.
// ceil(valid / 16) groups of 16: the AVX-512 kernel puts 4 / groups pixels in one vector (one group: 4 pixels, two:
// 2, three: 1 pixel and an idle 128-bit lane), each pixel's groups in consecutive 128-bit lanes.
inline int dwconv_tail_pixels(int64_t valid) {
  const int64_t groups = (valid + 15) / 16;
  return groups == 1 ? 4 : groups == 2 ? 2 : 1;
}

// Fill p.wv, p.bias_v, p.scale_v from p.w, p.bias, p.scale (the AVX-512 order above).
void dwconv_pack_vnni(PackedDwConv& p);

}  // namespace edgekit
