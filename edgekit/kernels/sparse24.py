"""The ``ai.edgekit::MatMulSparse24`` op: 2:4 structured-sparse weights, packing format and numpy reference.

Numpy only (no torch, no onnx at import time).

Operator
--------
Domain ``ai.edgekit``, op type ``MatMulSparse24``, opset version 1. ``Y[..., N] = A[..., K] @ W.T`` where ``W``
``[N, K]`` is 2:4 sparse along K: in every group of 4 consecutive values ``W[n, 4g : 4g + 4]`` at most 2 are
non-zero. Two variants share the layout:

*float*  ``values`` float32 (float16 in the CUDA kernel) ``[N, K / 2]``: the kept weights themselves.
*int8*   ``values`` int8 ``[N, K / 2]`` and ``w_scale`` float32 ``[N]``: ``W[n, k] = q[n, k] * w_scale[n]``
         (symmetric, one scale per output row; ``quantize_int8_rows``).

Inputs
    ``A``            float32 ``[..., K]`` (float variant, or int8 variant with float activations), or uint8
                     ``[..., K]`` (int8 variant, quantized activations: the VNNI CPU path and the CUDA int8 kernel).
    ``values``       ``[N, K / 2]``: the two kept values of each group, in increasing position order:
                     ``values[n, 2g]`` is ``W[n, 4g + i0]`` and ``values[n, 2g + 1]`` is ``W[n, 4g + i1]``.
    ``indices``      uint8 ``[N, ceil(K / 8)]``: the positions ``i0 < i1`` (0..3) of the kept values (below).
    ``w_scale``      float32 ``[N]``: int8 variant only.
    ``a_scale``      float32 scalar: uint8 activations only.
    ``a_zero_point`` uint8 scalar, optional (default 0): uint8 activations only.
Attributes (INT)
    ``K``, ``N``     the reduction length and the number of outputs; ``K`` must be a multiple of 4.
Output
    ``Y``            float32 ``[..., N]``.

int8 contract (uint8 activations): ``Y[m, n] = a_scale * w_scale[n] * sum_k (A[m, k] - a_zp) * q[n, k]``, the sum
taken exactly in int32: at most K / 2 products per output are non-zero, each at most 255 * 127 in magnitude, so
int32 cannot overflow for K <= 132,000. Implementations may compute
``sum_k A[m, k] * q[n, k] - a_zp * rowsum(q)[n]`` instead (same int32 value; ``row_sums`` gives ``rowsum``).

Index layout (``indices``)
    Group ``g`` of row ``n`` is the 4-bit nibble ``i0 | (i1 << 2)`` with ``i0 < i1``. Nibbles are packed
    little-endian, two per byte: group ``g`` is in bits ``4 * (g % 2) .. 4 * (g % 2) + 3`` of byte ``g // 2``. A row
    read as little-endian 32-bit words therefore holds groups ``8w .. 8w + 7`` in word ``w``, group ``8w + j`` in bits
    ``4j .. 4j + 3``. This is exactly the per-row metadata of PTX ``mma.sp`` (2-bit index of the first kept value
    in the low bits, ordered indices as ``::ordered_metadata`` requires): for ``mma.sp.m16n8k32`` (f16) the 16-bit
    half ``h`` of word ``w`` of rows ``r`` and ``r + 8`` form the metadata register of lane ``4 * r + h`` (K range
    ``32w + 16h .. 32w + 16h + 15``); see ``edgekit/kernels/cuda/mma_layout.py`` and ``matmul_sparse24.cu``. When
    ``K / 4`` is odd the last byte's high nibble is padding and is written as 0. A group with fewer than two non-zero
    weights still stores two positions (the non-zero ones, completed with the lowest free positions) and zeros in
    ``values``.

Padding. ``K`` must be a multiple of 4 (pad the weight and the activations with zero columns otherwise: a group
of zeros is valid 2:4). Implementations tile K freely: the CUDA kernel reads whole 32- or 64-value chunks and
treats values, indices and activations past ``K`` as zero, so ``K`` need not be a multiple of any tile; ``N`` and
the batch size are masked the same way.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "ai.edgekit"
OP_TYPE = "MatMulSparse24"

# The 6 valid nibbles (i0 < i1), in the order of (i0, i1) pairs.
VALID_NIBBLES = tuple(i0 | (i1 << 2) for i0 in range(4) for i1 in range(i0 + 1, 4))


def check_attributes(K: int, N: int) -> None:
    """Raise ValueError when the attributes are outside the specification."""
    if K < 4 or N < 1:
        raise ValueError(f"MatMulSparse24: K and N must be positive (K >= 4), got K={K}, N={N}")
    if K % 4:
        raise ValueError(f"MatMulSparse24: K={K} must be a multiple of 4 (pad W and A with zero columns)")


def index_row_bytes(K: int) -> int:
    """Bytes of one row of ``indices``: one nibble per group of 4, two per byte."""
    return -(-K // 8)


def storage_bytes(K: int, N: int, value_bytes: int = 4) -> int:
    """Exact bytes of the weight inputs: values (``value_bytes`` each: 4 fp32, 2 fp16, 1 int8), indices, int8 scales."""
    check_attributes(K, N)
    return N * (K // 2) * value_bytes + N * index_row_bytes(K) + (N * 4 if value_bytes == 1 else 0)


def _as_2d(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{what} expects a 2-D [N, K] array, got shape {w.shape}")
    return w


def is_2of4(w: np.ndarray) -> bool:
    """True when W ``[N, K]`` has K a multiple of 4 and at most 2 non-zeros (NaN counts) in every group of 4."""
    w = _as_2d(w, "is_2of4")
    if w.shape[1] % 4 or w.shape[1] == 0:
        return False
    nz = (w != 0).reshape(w.shape[0], -1, 4).sum(axis=2)
    return bool((nz <= 2).all())


def _positions(w: np.ndarray) -> np.ndarray:
    """[N, G, 2] positions i0 < i1 of the kept values of every group (non-zeros first, then the lowest free)."""
    N, K = w.shape
    nz = (w != 0).reshape(N, K // 4, 4)
    # Sort key: non-zeros first (0), zeros after (1); ties by position. The two smallest keys, then ordered.
    key = np.where(nz, 0, 4) + np.arange(4)
    pos = np.sort(np.argsort(key, axis=2, kind="stable")[:, :, :2], axis=2)
    return pos.astype(np.uint8)


def pack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compress a 2:4-sparse W ``[N, K]`` into ``(values [N, K/2] of W's dtype, indices uint8 [N, ceil(K/8)])``."""
    w = _as_2d(w, "pack")
    N, K = w.shape
    check_attributes(K, max(N, 1))
    if not is_2of4(w):
        nz = (w != 0).reshape(N, K // 4, 4).sum(axis=2)
        n, g = np.argwhere(nz > 2)[0]
        raise ValueError(
            f"pack: W is not 2:4 sparse: row {n}, group {g} (columns {4 * g}..{4 * g + 3}) has {nz[n, g]} non-zeros"
        )
    pos = _positions(w)  # [N, G, 2]
    groups = w.reshape(N, K // 4, 4)
    values = np.take_along_axis(groups, pos.astype(np.intp), axis=2).reshape(N, K // 2)
    nibbles = (pos[:, :, 0] | (pos[:, :, 1] << 2)).astype(np.uint8)  # [N, G]
    return np.ascontiguousarray(values), pack_nibbles(nibbles)


def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """[N, G] nibbles (0..15) -> uint8 [N, ceil(G / 2)], group g in the low nibble of byte g // 2 when g is even."""
    nibbles = np.asarray(nibbles, dtype=np.uint8)
    N, G = nibbles.shape
    padded = np.zeros((N, 2 * (-(-G // 2))), dtype=np.uint8)
    padded[:, :G] = nibbles
    return np.ascontiguousarray(padded[:, 0::2] | (padded[:, 1::2] << 4))


def unpack_nibbles(indices: np.ndarray, K: int) -> np.ndarray:
    """Inverse of ``pack_nibbles`` for a row of K values: uint8 [N, ceil(K/8)] -> nibbles [N, K/4]."""
    indices = np.asarray(indices)
    check_attributes(K, max(indices.shape[0], 1) if indices.ndim else 1)
    if indices.ndim != 2 or indices.dtype != np.uint8 or indices.shape[1] != index_row_bytes(K):
        raise ValueError(
            f"indices must be uint8 [N, {index_row_bytes(K)}] for K={K}, got {indices.dtype} {indices.shape}"
        )
    both = np.stack([indices & 0xF, indices >> 4], axis=2).reshape(indices.shape[0], -1)
    return both[:, : K // 4]


def _check_packed(values: np.ndarray, indices: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate values/indices for K; return the [N, K/4, 2] positions (intp) and values."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != K // 2:
        raise ValueError(f"values must be [N, {K // 2}] for K={K}, got shape {values.shape}")
    nib = unpack_nibbles(indices, K)
    if nib.shape[0] != values.shape[0]:
        raise ValueError(f"indices has {nib.shape[0]} rows but values has {values.shape[0]}")
    i0, i1 = nib & 3, nib >> 2
    if (i0 >= i1).any():
        n, g = np.argwhere(i0 >= i1)[0]
        raise ValueError(
            f"indices: row {n}, group {g} holds positions ({i0[n, g]}, {i1[n, g]}); they must be increasing (i0 < i1)"
        )
    return np.stack([i0, i1], axis=2).astype(np.intp), values


def unpack(values: np.ndarray, indices: np.ndarray, K: int) -> np.ndarray:
    """The dense W ``[N, K]`` (values' dtype) that ``(values, indices)`` stand for."""
    check_attributes(K, 1)
    pos, values = _check_packed(values, indices, K)
    N = values.shape[0]
    dense = np.zeros((N, K // 4, 4), dtype=values.dtype)
    np.put_along_axis(dense, pos, values.reshape(N, K // 4, 2), axis=2)
    return dense.reshape(N, K)


def row_sums(values: np.ndarray) -> np.ndarray:
    """int32 [N]: the sum of each row's int8 weights (the zero-point correction ``a_zp * rowsum``)."""
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise ValueError(f"row_sums expects int8 values, got {values.dtype}")
    return values.astype(np.int32).sum(axis=1).astype(np.int32)


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization of W ``[N, K]``: ``(q int8 [N, K] in [-127, 127], scale float32 [N])``.

    ``scale = max|W[n]| / 127`` (1 for an all-zero row), ``q = round(W / scale)``. Works on the dense weight or,
    the same scales, on the compressed ``values`` of ``pack(w)``: ``q_values, w_scale = quantize_int8_rows(values)``
    is the int8 variant with ``pack(w)``'s ``indices`` unchanged (the way to build it: ``pack(q_dense)`` could store
    other positions for a kept weight that rounds to 0, which is equally correct but not the same bytes).
    """
    w = _as_2d(w, "quantize_int8_rows").astype(np.float32)
    scale = np.abs(w).max(axis=1) / np.float32(127) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_activations_u8(a: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """Per-tensor asymmetric uint8 quantization of activations: ``(A_u8, a_scale, a_zero_point)``."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0 or 1.0)
    zp = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(a / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def dequantize(values: np.ndarray, indices: np.ndarray, w_scale: np.ndarray | None, K: int) -> np.ndarray:
    """The float32 W ``[N, K]`` the op multiplies by (int8 values times ``w_scale[n]``, or float values as is)."""
    values = np.asarray(values)
    if values.dtype == np.int8:
        if w_scale is None:
            raise ValueError("int8 values need w_scale (float32 [N])")
        w_scale = np.asarray(w_scale, dtype=np.float32)
        if w_scale.shape != (values.shape[0],):
            raise ValueError(f"w_scale must be float32 [{values.shape[0]}], got shape {w_scale.shape}")
        return unpack(values, indices, K).astype(np.float32) * w_scale[:, None]
    if values.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"values must be float32/float16 (float variant) or int8, got {values.dtype}")
    if w_scale is not None:
        raise ValueError("w_scale is only an input of the int8 variant")
    return unpack(values, indices, K).astype(np.float32)


def reference_matmul(
    A: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    w_scale: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    a_scale: float | None = None,
    a_zero_point: int = 0,
) -> np.ndarray:
    """The op's output ``Y[..., N]`` (float32) for every variant.

    - float ``A`` (any float dtype, computed in float32): ``A @ dequantize(values, indices, w_scale).T``;
    - uint8 ``A`` with int8 ``values``: the int8 contract, the dot products exact in int64 (= int32 without
      overflow), then ``* a_scale * w_scale[n]``.
    """
    check_attributes(K, N)
    A = np.asarray(A)
    values = np.asarray(values)
    if A.shape[-1:] != (K,):
        raise ValueError(f"A's last dimension must be K={K}, got shape {A.shape}")
    if values.shape[0] != N:
        raise ValueError(f"values has {values.shape[0]} rows but the attribute N={N}")
    if A.dtype == np.uint8:
        if values.dtype != np.int8:
            raise ValueError(f"uint8 activations need int8 values (the int8 variant), got {values.dtype}")
        if a_scale is None:
            raise ValueError("uint8 activations need a_scale")
        if not 0 <= int(a_zero_point) <= 255:
            raise ValueError(f"a_zero_point must be a uint8 value, got {a_zero_point}")
        w_scale = np.asarray(w_scale, dtype=np.float32) if w_scale is not None else None
        if w_scale is None or w_scale.shape != (N,):
            raise ValueError(f"int8 values need w_scale float32 [{N}]")
        q = unpack(values, indices, K).astype(np.int64)
        acc = np.matmul(A.astype(np.int64) - int(a_zero_point), q.T)  # exact
        return (acc.astype(np.float64) * float(a_scale) * w_scale.astype(np.float64)).astype(np.float32)
    if A.dtype.kind != "f":
        raise ValueError(f"A must be float or uint8, got {A.dtype}")
    if a_scale is not None or a_zero_point:
        raise ValueError("a_scale / a_zero_point apply to uint8 activations only")
    W = dequantize(values, indices, w_scale, K)
    return np.matmul(A.astype(np.float32), W.T).astype(np.float32)


def random_2of4(rng: np.random.Generator, N: int, K: int, dtype=np.float32, *, full: bool = True) -> np.ndarray:
    """A random 2:4 weight (tests, benchmarks): ``full`` keeps exactly 2 non-zeros per group, else 0 to 2."""
    check_attributes(K, N)
    w = rng.standard_normal((N, K)).astype(np.float32)
    keep = np.zeros((N, K // 4, 4), dtype=bool)
    pos = np.argsort(rng.random((N, K // 4, 4)), axis=2)[:, :, :2]
    np.put_along_axis(keep, pos, True, axis=2)
    if not full:
        keep &= rng.random(keep.shape) < 0.7
    return (w * keep.reshape(N, K)).astype(dtype)


def make_node(
    inputs: list[str],
    outputs: list[str],
    *,
    K: int,
    N: int,
    name: str | None = None,
    domain: str = DOMAIN,
):
    """An ONNX NodeProto for MatMulSparse24.

    ``inputs``: ``[A, values, indices]`` (float), ``[A, values, indices, w_scale]`` (int8, float activations) or
    ``[A, values, indices, w_scale, a_scale(, a_zero_point)]`` (int8, uint8 activations).
    """
    import onnx.helper

    check_attributes(K, N)
    if len(inputs) not in (3, 4, 5, 6) or not all(inputs) or len(outputs) != 1:
        raise ValueError("MatMulSparse24 takes inputs [A, values, indices(, w_scale(, a_scale(, a_zero_point)))]")
    return onnx.helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=domain, K=K, N=N)
