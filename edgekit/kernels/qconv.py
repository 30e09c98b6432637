"""The ``ai.edgekit`` int8 convolutions on channels-last activations: ``QLinearDepthwiseConv`` and
``QLinearConvDirect``.

Numpy only (no torch, no onnx at import time).

Why they exist
--------------
ONNX Runtime fuses an int8 QDQ convolution into ``QLinearConv`` and runs it channels-last through MLAS. Two kinds
of layer gain little or nothing there over the float path on AVX-512 machines (profiled on EfficientNet-Lite0 here,
uniform INT8 ~3.2 ms): depthwise convolutions (the 16 of them ~1.0 ms, as in FP32) and the stem, a 3x3 convolution
over the 3 colour channels (~0.25 ms; FP32 ~0.2 ms), which MLAS runs as an im2col and a GEMM with a reduction of 27.
The native library (``runtimes/onnxruntime/src/``) runs both with AVX-512 VNNI, bit-exact with ``QLinearConv``:

- ``QLinearDepthwiseConv`` (``dwconv_*.cc``): four taps per ``vpdpbusd``, 64 channels per vector, weights packed
  once.
- ``QLinearConvDirect`` (``conv_direct.cc``): a convolution with ``group = 1`` whose reduction ``K = kh kw Cin`` is
  at most ``DIRECT_MAX_K``: each output pixel's K input bytes gathered once, four at a time broadcast into
  ``vpdpbusd`` against 16 output channels.

Operators
---------
Domain ``ai.edgekit``, opset version 1. The inputs are ``QLinearConv``'s, in its order; only the activations' layout
differs (NHWC), and the weights are symmetric:

    ``x``             uint8 ``[N, H, W, Cin]`` (channels last)
    ``x_scale``       float32 scalar, ``x_zero_point`` uint8 scalar
    ``w``             int8: ``[C, 1, kh, kw]`` for ``QLinearDepthwiseConv`` (one filter per channel, Cout = Cin = C),
                      ``[Cout, Cin, kh, kw]`` for ``QLinearConvDirect`` (``kh kw Cin <= DIRECT_MAX_K``)
    ``w_scale``       float32 ``[Cout]`` or scalar, ``w_zero_point`` int8 ``[Cout]`` or scalar, all zero
    ``y_scale``       float32 scalar, ``y_zero_point`` uint8 scalar
    ``B``             int32 ``[Cout]``, optional: the bias in units of ``x_scale * w_scale[c]``
Attributes
    ``kernel_shape`` ``[kh, kw]`` (required), ``strides`` ``[sh, sw]``, ``pads`` ``[top, left, bottom, right]``,
    ``dilations`` ``[dh, dw]`` (defaults 1, 0 and 1).
Output
    ``y``             uint8 ``[N, Ho, Wo, Cout]``, ``Ho = (H + top + bottom - dh (kh - 1) - 1) // sh + 1`` (likewise
                      Wo).

Every input but ``x`` must be a constant initializer (the native kernels pack them once). Math, per output pixel and
output channel (padding reads ``x_zero_point``, i.e. contributes zero):

    ``acc = B[c] + sum over the kernel's taps (and input channels) of (x - x_zero_point) * w``   (exact, int32)
    ``y   = clamp(round_half_even(float32(acc) * s[c]) + y_zero_point, 0, 255)``,
    ``s[c] = float32(float32(x_scale * w_scale[c]) / y_scale)``

which is how ONNX Runtime's ``QLinearConv`` requantizes, so they agree bit for bit (``tests/test_qconv.py``).
"""

from __future__ import annotations

import numpy as np

DOMAIN = "ai.edgekit"
OP_DEPTHWISE = "QLinearDepthwiseConv"
OP_DIRECT = "QLinearConvDirect"
DIRECT_MAX_K = 64  # kh * kw * Cin of QLinearConvDirect (runtimes/onnxruntime/src/conv_direct.h, kDirectMaxK)


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of one spatial axis (ValueError when the kernel does not fit the padded input)."""
    extent = size + pad_before + pad_after - dilation * (kernel - 1) - 1
    if extent < 0:
        raise ValueError(f"kernel {kernel} (dilation {dilation}) does not fit an input of {size} padded by "
                         f"{pad_before} + {pad_after}")
    return extent // stride + 1


def requant_scales(x_scale: float, w_scale: np.ndarray, y_scale: float, channels: int) -> np.ndarray:
    """Per-channel output scale, float32 in QLinearConv's order of operations: ``(x_scale * w_scale) / y_scale``."""
    ws = np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (channels,))
    return (np.float32(x_scale) * ws).astype(np.float32) / np.float32(y_scale)


def reference(x: np.ndarray, x_scale: float, x_zero_point: int, w: np.ndarray, w_scale, y_scale: float,
              y_zero_point: int, bias: np.ndarray | None = None, *, kernel_shape=None, strides=(1, 1),
              pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """Either op in numpy: ``x`` uint8 NHWC; ``w`` int8 ``[C, 1, kh, kw]`` (depthwise: one filter per channel) or
    ``[Cout, Cin, kh, kw]`` (``group = 1``); returns uint8 ``[N, Ho, Wo, Cout]``."""
    x = np.asarray(x)
    w = np.asarray(w)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
    C = x.shape[3]
    depthwise = w.ndim == 4 and w.shape[1] == 1 and w.shape[0] == C
    if w.dtype != np.int8 or w.ndim != 4 or not (depthwise or w.shape[1] == C):
        raise ValueError(f"w must be int8 [{C}, 1, kh, kw] or [Cout, {C}, kh, kw], got {w.dtype} {w.shape}")
    cout = w.shape[0]
    kh, kw = (w.shape[2], w.shape[3]) if kernel_shape is None else (int(kernel_shape[0]), int(kernel_shape[1]))
    if (kh, kw) != w.shape[2:]:
        raise ValueError(f"kernel_shape {[kh, kw]} does not match w {list(w.shape)}")
    sh, sw = (int(s) for s in strides)
    top, left, bottom, right = (int(p) for p in pads)
    dh, dw = (int(d) for d in dilations)
    N, H, W = x.shape[:3]
    Ho = output_size(H, kh, sh, top, bottom, dh)
    Wo = output_size(W, kw, sw, left, right, dw)
    xp = np.full((N, H + top + bottom, W + left + right, C), x_zero_point, np.int64)
    xp[:, top:top + H, left:left + W] = x
    xp -= int(x_zero_point)
    acc = np.zeros((N, Ho, Wo, cout), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            patch = xp[:, y0:y0 + sh * (Ho - 1) + 1:sh, x0:x0 + sw * (Wo - 1) + 1:sw]
            if depthwise:
                acc += patch * w[:, 0, ky, kx].astype(np.int64)
            else:
                acc += patch @ w[:, :, ky, kx].astype(np.int64).T
    if bias is not None:
        acc += np.asarray(bias, np.int64).reshape(cout)
    if np.abs(acc).max(initial=0) >= 2**31:
        raise ValueError("int32 accumulator overflow")
    scale = requant_scales(x_scale, w_scale, y_scale, cout)
    f = acc.astype(np.int32).astype(np.float32) * scale  # float32 product, as the kernels compute it
    y = np.rint(f).astype(np.int64) + int(y_zero_point)  # rint: round half to even
    return np.clip(y, 0, 255).astype(np.uint8)
