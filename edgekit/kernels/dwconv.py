"""The ``ai.edgekit::QLinearDepthwiseConv`` op: a quantized depthwise convolution on channels-last activations.

Numpy only (no torch, no onnx at import time).

Why it exists
-------------
ONNX Runtime fuses an int8 QDQ depthwise convolution into ``QLinearConv`` and runs it channels-last through MLAS's
depthwise kernel, which gains little over the float path on AVX-512 machines: profiled on EfficientNet-Lite0 here,
the 16 depthwise layers took ~1.0 ms of uniform INT8's ~3.2 ms (and ~1.0 ms in FP32). The native library
(``runtimes/onnxruntime/src/dwconv_*.cc``) runs this op with AVX-512 VNNI: four taps per ``vpdpbusd``, the weights
packed once, bit-exact with ``QLinearConv``.

Operator
--------
Domain ``ai.edgekit``, op type ``QLinearDepthwiseConv``, opset version 1. The inputs are ``QLinearConv``'s, in its
order; only the activations' layout differs (NHWC), and the weights are symmetric:

    ``x``             uint8 ``[N, H, W, C]`` (channels last)
    ``x_scale``       float32 scalar, ``x_zero_point`` uint8 scalar
    ``w``             int8 ``[C, 1, kh, kw]`` (ONNX's depthwise weight: one filter per channel)
    ``w_scale``       float32 ``[C]`` or scalar, ``w_zero_point`` int8 ``[C]`` or scalar, all zero
    ``y_scale``       float32 scalar, ``y_zero_point`` uint8 scalar
    ``B``             int32 ``[C]``, optional: the bias in units of ``x_scale * w_scale[c]``
Attributes
    ``kernel_shape`` ``[kh, kw]`` (required), ``strides`` ``[sh, sw]``, ``pads`` ``[top, left, bottom, right]``,
    ``dilations`` ``[dh, dw]`` (defaults 1, 0 and 1).
Output
    ``y``             uint8 ``[N, Ho, Wo, C]``, ``Ho = (H + top + bottom - dh (kh - 1) - 1) // sh + 1`` (likewise Wo).

Every input but ``x`` must be a constant initializer (the native kernel packs them once). Math, per output pixel and
channel (padding reads ``x_zero_point``, i.e. contributes zero):

    ``acc = B[c] + sum_t (x_t - x_zero_point) * w[c, t]``                    (exact, int32)
    ``y   = clamp(round_half_even(float32(acc) * s[c]) + y_zero_point, 0, 255)``,
    ``s[c] = float32(float32(x_scale * w_scale[c]) / y_scale)``

which is how ONNX Runtime's ``QLinearConv`` requantizes, so the two agree bit for bit (``tests/test_dwconv.py``).
"""

from __future__ import annotations

import numpy as np

DOMAIN = "ai.edgekit"
OP_TYPE = "QLinearDepthwiseConv"


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
    """The op in numpy: ``x`` uint8 NHWC, ``w`` int8 ``[C, 1, kh, kw]``; returns uint8 ``[N, Ho, Wo, C]``."""
    x = np.asarray(x)
    w = np.asarray(w)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
    C = x.shape[3]
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[0] != C or w.shape[1] != 1:
        raise ValueError(f"w must be int8 [{C}, 1, kh, kw], got {w.dtype} {w.shape}")
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
    acc = np.zeros((N, Ho, Wo, C), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            patch = xp[:, y0:y0 + sh * (Ho - 1) + 1:sh, x0:x0 + sw * (Wo - 1) + 1:sw]
            acc += patch * w[:, 0, ky, kx].astype(np.int64)
    if bias is not None:
        acc += np.asarray(bias, np.int64).reshape(C)
    if np.abs(acc).max(initial=0) >= 2**31:
        raise ValueError("int32 accumulator overflow")
    scale = requant_scales(x_scale, w_scale, y_scale, C)
    f = acc.astype(np.int32).astype(np.float32) * scale  # float32 product, as the kernels compute it
    y = np.rint(f).astype(np.int64) + int(y_zero_point)  # rint: round half to even
    return np.clip(y, 0, 255).astype(np.uint8)
