// edgekit ONNX Runtime custom ops: ai.edgekit::QLinearConvDirect kernels (scalar and AVX-512 VNNI).
//
// The op (specification and numpy reference: edgekit/kernels/dwconv.py, which covers both int8 convolutions) is
// ONNX QLinearConv with group 1 on channels-last uint8 activations, for layers whose reduction K = kh kw Cin is
// small (at most kMaxK), like an image model's stem (3x3 over 3 channels: K = 27). ONNX Runtime runs those as an
// im2col and a GEMM whose K is too short to pay for its packing; here each output pixel's K input bytes are gathered
// once and broadcast four at a time into `vpdpbusd` against weights held per 16 output channels. Requantization as
// dwconv.h (float scale, round half to even, zero point, saturate).
#pragma once

#include <cstdint>
#include <vector>

#include "dwconv.h"

namespace edgekit {

constexpr int64_t kDirectMaxK = 64;

struct PackedConvDirect {
  int64_t Cin = 0, Cout = 0, Coutp = 0;  // Coutp: Cout rounded up to 16
  int64_t K = 0, K4 = 0;                 // K = kh kw Cin in (ky, kx, ci) order; K4 = ceil(K / 4)
  std::vector<int8_t> w;                 // [Cout][K]: w[co, ci, ky, kx] at (ky kw + kx) Cin + ci
  std::vector<int8_t> wv;                // [K4][Coutp / 16][64]: int32 lane l holds w[16 v + l, 4 g .. 4 g + 3]
  std::vector<int32_t> bias;             // [Coutp]: B[co] - x_zero * sum_k w[co, k]
  std::vector<float> scale;              // [Coutp]: x_scale * w_scale[co] / y_scale
  int32_t y_zero = 0;
  uint8_t x_zero = 0;
};

// Output row r (of N * Ho), every output channel; a.C is Cin (the output row holds Cout channels per pixel).
using ConvDirectFn = void (*)(const DwConvArgs& a, const PackedConvDirect& p, int64_t r);

void conv_direct_row_scalar(const DwConvArgs& a, const PackedConvDirect& p, int64_t r);
ConvDirectFn conv_direct_row_avx512();  // null when not compiled in

// Fill p.wv from p.w (the AVX-512 order above).
void conv_direct_pack_vnni(PackedConvDirect& p);

}  // namespace edgekit
