"""Bias correction of weight-quantization error (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", 2019, empirical variant).

Quantizing W to W_q shifts a layer's expected output by (W_q − W)·E[x]. Subtracting that shift from the bias removes
the systematic part of the error at no run-time cost. E[x] is the per-input-channel mean of the layer's input over
calibration data (spatial positions included for convolutions). Pure numpy: the graph plumbing is in ``quant.py``.
"""

from __future__ import annotations

import numpy as np


def output_shift(
    w: np.ndarray, w_q: np.ndarray, mean_in: np.ndarray, *, group: int = 1, trans_b: bool = True
) -> np.ndarray:
    """Expected output shift (one value per output channel) caused by replacing ``w`` with ``w_q``.

    Conv weights are (O, C/group, *kernel) and ``mean_in`` has C entries; Gemm weights are (N, K) when ``trans_b``
    (else (K, N)) and ``mean_in`` has K entries. Zero padding at borders is ignored (it shifts the mean slightly).
    """
    delta = (w_q.astype(np.float64) - w.astype(np.float64))
    mean_in = mean_in.astype(np.float64)
    if delta.ndim >= 3:  # Conv1d/2d/3d: (O, C/group, *kernel)
        out_ch, cin_g = delta.shape[:2]
        per_in = delta.reshape(out_ch, cin_g, -1).sum(-1)  # (O, C/group)
        groups = mean_in.reshape(group, cin_g)  # group g sees input channels g*cin_g ... (g+1)*cin_g-1
        per_group = out_ch // group
        shift = np.einsum("gok,gk->go", per_in.reshape(group, per_group, cin_g), groups)
        return shift.reshape(out_ch)
    if delta.ndim == 2:
        return delta @ mean_in if trans_b else delta.T @ mean_in
    raise ValueError(f"unsupported weight rank {delta.ndim}")  # 1-D weights: callers skip those layers


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """DequantizeLinear: (q − zero_point) · scale, per-axis when ``scale`` is 1-D."""
    q = q.astype(np.float64)
    zp = np.zeros_like(scale, dtype=np.float64) if zero_point is None else zero_point.astype(np.float64)
    if np.ndim(scale) == 0 or np.size(scale) == 1:
        return ((q - zp.reshape(())) * scale.reshape(())).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    return ((q - zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
