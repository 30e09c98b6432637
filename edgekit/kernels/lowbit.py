"""The ``ai.edgekit::MatMulLowBit`` op: specification, packing format and numpy reference (numpy only).

Operator
--------
Domain ``ai.edgekit``, op type ``MatMulLowBit``, opset version 1.

Inputs
    ``A``            float32 ``[..., K]``: activations; leading axes are batch axes.
    ``B_packed``     uint8 ``[N, packed_row_bytes(Kp, bits)]``: the quantized weights, one packed row per output
                     feature ``n`` (B is stored transposed, ``[N, K]``, like ONNX Runtime's
                     ``com.microsoft.MatMulNBits``).
    ``scales``       float32 ``[N, Kp / group_size]``: one scale per (row, group).
    ``zero_points``  optional uint8 ``[N, Kp / group_size]``: one zero point per (row, group), one value per byte
                     (not packed). Absent (omitted, or the empty name ``""`` when ``bias`` follows) means
                     symmetric: every zero point is ``2 ** (bits - 1)``.
    ``bias``         optional float32 ``[N]``: added to every output row (the fused epilogue of a Gemm / 1x1 Conv
                     bias; implementations add it in the same pass that writes ``Y``, not as a separate ``Add``).
Attributes (INT)
    ``K``, ``N``     the logical reduction length and the number of outputs.
    ``bits``         2, 3, 4 or 8.
    ``group_size``   32, 64 or 128: consecutive values of a row along K that share a scale and a zero point.
    ``accuracy_level`` optional (native library, ``runtimes/onnxruntime/``): 0 = fp32 math (default, the reference
                     exactly up to float rounding); 4 = each activation row quantized to symmetric int8 (step
                     ``max|a| / 127``) and multiplied in int8 (VNNI); the error per output is at most
                     ``step / 2 * sum_k |dequant(B)[n, k]|`` (plus fp32 rounding).
Output
    ``Y``            float32 ``[..., N]`` = ``A @ dequant(B)[:, :K].T (+ bias)``, where
                     ``dequant(q)[n, k] = (q[n, k] - zp[n, k // group_size]) * scale[n, k // group_size]``.

Padding. ``K`` need not be a multiple of ``group_size``: the stored rows are padded to
``Kp = ceil(K / group_size) * group_size`` values (``padded_k``), and the last group of each row may hold
padding. Padding values are don't-care: the op reads only ``k < K`` (implementations may treat ``A[..., k]``
as 0 for ``k >= K``); ``quantize_rtn`` and ``pack`` write zero-weight codes there. Because ``Kp`` is a multiple
of 32, each packed row is a whole number of 32-value units of ``bits`` 32-bit words (4 * bits bytes), which the
CUDA kernel loads as aligned vectors.

Packing (``pack`` / ``unpack``)
    Each row is a dense little-endian bitstream: value ``j`` of the row occupies bits ``j*bits .. j*bits+bits-1``,
    bit ``i`` of the stream being bit ``i % 8`` of byte ``i // 8``. For 2, 4 and 8 bits the values therefore never
    straddle bytes (4-bit: value ``2i`` in the low nibble of byte ``i``, as in ``MatMulNBits``); for 3 bits the
    stream packs 8 values into 3 bytes (24 bits, little-endian), so ``packed_row_bytes(K, 3) = 3 * ceil(K / 8)``.
    Otherwise ``packed_row_bytes(K, bits) = ceil(K * bits / 8)``. Unused trailing bits are zero.

Correspondence with ``com.microsoft.MatMulNBits`` (bits=4, ``block_size = group_size``): ``B_packed`` reshaped
to ``[N, Kp / block_size, block_size / 2]`` is MatMulNBits' ``B`` byte for byte; ``scales`` flattened is its
``scales``; its ``zero_points`` are ours packed two per byte (low nibble first, each row padded to whole bytes);
both default to a zero point of 8. ``tests/test_kernels_lowbit.py`` checks this against ONNX Runtime.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "ai.edgekit"
OP_TYPE = "MatMulLowBit"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def check_attributes(K: int, N: int, bits: int, group_size: int) -> None:
    """Raise ValueError when the attributes are outside the specification."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"MatMulLowBit: bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"MatMulLowBit: group_size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}")
    if K < 1 or N < 1:
        raise ValueError(f"MatMulLowBit: K and N must be positive, got K={K}, N={N}")


def padded_k(K: int, group_size: int) -> int:
    """The stored row length: K rounded up to a whole number of groups."""
    return -(-K // group_size) * group_size


def num_groups(K: int, group_size: int) -> int:
    """Groups per row (the second dimension of ``scales`` and ``zero_points``)."""
    return -(-K // group_size)


def packed_row_bytes(K: int, bits: int) -> int:
    """Bytes of one packed row of K values (3 bits: whole 3-byte units of 8 values)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if bits == 3:
        return 3 * (-(-K // 8))
    return -(-K * bits // 8)


def storage_bytes(K: int, N: int, bits: int, group_size: int, zero_points: bool) -> int:
    """Exact bytes of the op's weight inputs: packed weights, float32 scales, and uint8 zero points if present."""
    check_attributes(K, N, bits, group_size)
    groups = num_groups(K, group_size)
    total = N * packed_row_bytes(padded_k(K, group_size), bits) + N * groups * 4
    return total + (N * groups if zero_points else 0)


def _word_dtype(bits: int) -> type[np.unsignedinteger]:
    """An integer wide enough for 8 values of ``bits`` bits."""
    return np.uint32 if bits <= 4 else np.uint64


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``q`` (integers in ``[0, 2**bits)``, shape [N, K]) into [N, packed_row_bytes(K, bits)] uint8."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D [N, K] array of codes, got shape {q.shape}")
    row_bytes = packed_row_bytes(q.shape[1], bits)
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"pack: codes must lie in [0, {1 << bits}) for bits={bits}, got [{q.min()}, {q.max()}]")
    N, K = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    units = -(-K // 8)  # 8 values -> `bits` bytes
    wdt = _word_dtype(bits)
    padded = np.zeros((N, units * 8), dtype=wdt)
    padded[:, :K] = q
    padded = padded.reshape(N, units, 8)
    shifts = (np.arange(8, dtype=wdt) * wdt(bits)).astype(wdt)
    word = np.bitwise_or.reduce(padded << shifts, axis=2)  # [N, units]: 8*bits bits each
    byte_shifts = (np.arange(bits, dtype=wdt) * wdt(8)).astype(wdt)
    out = ((word[:, :, None] >> byte_shifts) & wdt(0xFF)).astype(np.uint8).reshape(N, units * bits)
    return np.ascontiguousarray(out[:, :row_bytes])


def unpack(packed: np.ndarray, bits: int, K: int) -> np.ndarray:
    """Inverse of ``pack``: [N, packed_row_bytes(K, bits)] uint8 -> codes [N, K] uint8."""
    packed = np.asarray(packed)
    row_bytes = packed_row_bytes(K, bits)
    if packed.ndim != 2 or packed.shape[1] != row_bytes or packed.dtype != np.uint8:
        raise ValueError(
            f"unpack: expected uint8 [N, {row_bytes}] for K={K}, bits={bits}; got {packed.dtype} {packed.shape}"
        )
    N = packed.shape[0]
    if bits == 8:
        return packed.copy()
    units = -(-K // 8)
    wdt = _word_dtype(bits)
    full = np.zeros((N, units * bits), dtype=wdt)
    full[:, :row_bytes] = packed
    full = full.reshape(N, units, bits)
    byte_shifts = (np.arange(bits, dtype=wdt) * wdt(8)).astype(wdt)
    word = np.bitwise_or.reduce(full << byte_shifts, axis=2)  # [N, units]
    shifts = (np.arange(8, dtype=wdt) * wdt(bits)).astype(wdt)
    q = (word[:, :, None] >> shifts) & wdt((1 << bits) - 1)
    return q.reshape(N, units * 8)[:, :K].astype(np.uint8)


def _check_weights(packed, scales, zero_points, bits: int, group_size: int, K: int) -> int:
    """Validate the op's weight inputs against the attributes; return N."""
    N = packed.shape[0] if packed.ndim == 2 else -1
    check_attributes(K, max(N, 1), bits, group_size)
    row_bytes = packed_row_bytes(padded_k(K, group_size), bits)
    groups = num_groups(K, group_size)
    if packed.ndim != 2 or packed.shape[1] != row_bytes or packed.dtype != np.uint8:
        raise ValueError(
            f"B_packed must be uint8 [N, {row_bytes}] for K={K}, bits={bits}, group_size={group_size}; "
            f"got {packed.dtype} {packed.shape}"
        )
    if scales.shape != (N, groups):
        raise ValueError(f"scales must be [N, {groups}] = [{N}, {groups}], got {scales.shape}")
    if zero_points is not None and (zero_points.shape != (N, groups) or zero_points.dtype != np.uint8):
        raise ValueError(f"zero_points must be uint8 [{N}, {groups}], got {zero_points.dtype} {zero_points.shape}")
    return N


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    group_size: int,
    K: int,
) -> np.ndarray:
    """The float32 weights [N, K] that the op multiplies by (padding columns dropped)."""
    packed, scales = np.asarray(packed), np.asarray(scales, dtype=np.float32)
    zero_points = None if zero_points is None else np.asarray(zero_points)
    _check_weights(packed, scales, zero_points, bits, group_size, K)
    q = unpack(packed, bits, padded_k(K, group_size))[:, :K].astype(np.float32)
    gidx = np.arange(K) // group_size
    zp = np.float32(1 << (bits - 1)) if zero_points is None else zero_points[:, gidx].astype(np.float32)
    return ((q - zp) * scales[:, gidx]).astype(np.float32)


def reference_matmul(
    A: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    group_size: int,
    K: int,
    N: int,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """The op's output ``Y[..., N] = A[..., K] @ dequantize(...).T (+ bias[N])`` in float32."""
    A = np.asarray(A, dtype=np.float32)
    if A.shape[-1:] != (K,):
        raise ValueError(f"A's last dimension must be K={K}, got shape {A.shape}")
    W = dequantize(packed, scales, zero_points, bits, group_size, K)
    if W.shape[0] != N:
        raise ValueError(f"B_packed has {W.shape[0]} rows but the attribute N={N}")
    Y = np.matmul(A, W.T).astype(np.float32)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (N,) or not np.issubdtype(bias.dtype, np.floating):
            raise ValueError(f"MatMulLowBit: bias must be float32 [N] = [{N}], got {bias.dtype} {bias.shape}")
        Y += bias.astype(np.float32)
    return Y


def quantize_rtn(
    W: np.ndarray, bits: int, group_size: int, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest min/max quantization of W [N, K] -> (B_packed, scales, zero_points or None).

    Symmetric: ``scale = max|w| / (2**(bits-1) - 1)`` per group, zero point implicit (``2**(bits-1)``).
    Asymmetric: the group's range widened to include 0, ``scale = range / (2**bits - 1)``, integer zero point.
    Meant for tests and examples; the product's quantizers live in ``edgekit.compress``.
    """
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"quantize_rtn expects W [N, K], got shape {W.shape}")
    N, K = W.shape
    check_attributes(K, N, bits, group_size)
    Kp = padded_k(K, group_size)
    Wp = np.zeros((N, Kp), dtype=np.float32)
    Wp[:, :K] = W  # zero padding never changes the ranges below (both include 0)
    G = Wp.reshape(N, Kp // group_size, group_size)
    qmax_code = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        scales = np.abs(G).max(axis=2) / np.float32(mid - 1 if bits > 1 else 1)
        scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(G / scales[:, :, None]) + mid, 0, qmax_code)
        zero_points = None
    else:
        lo, hi = np.minimum(G.min(axis=2), 0.0), np.maximum(G.max(axis=2), 0.0)
        scales = ((hi - lo) / np.float32(qmax_code)).astype(np.float32)
        scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
        zp = np.clip(np.rint(-lo / scales), 0, qmax_code)
        q = np.clip(np.rint(G / scales[:, :, None]) + zp[:, :, None], 0, qmax_code)
        zero_points = zp.astype(np.uint8)
    return pack(q.reshape(N, Kp).astype(np.uint8), bits), scales, zero_points


def make_node(
    inputs: list[str],
    outputs: list[str],
    *,
    K: int,
    N: int,
    bits: int,
    group_size: int,
    name: str | None = None,
    domain: str = DOMAIN,
):
    """An ONNX NodeProto for MatMulLowBit; ``inputs`` = [A, B_packed, scales(, zero_points(, bias))].

    ``zero_points`` may be ``""`` (symmetric) when ``bias`` is given; every other name must be non-empty.
    ``domain`` defaults to ``ai.edgekit``; ``edgekit.kernels.ort_python`` rewrites it for its Python fallback.
    """
    import onnx.helper

    check_attributes(K, N, bits, group_size)
    inputs = list(inputs)
    required = inputs[:3] + inputs[4:]  # zero_points (index 3) may be empty when a bias follows
    if (
        len(inputs) not in (3, 4, 5)
        or not all(required)
        or (len(inputs) == 4 and not inputs[3])
        or len(outputs) != 1
        or not outputs[0]
    ):
        raise ValueError(
            "MatMulLowBit takes inputs [A, B_packed, scales(, zero_points(, bias))] (non-empty names; zero_points "
            f"may be '' only before a bias) and one output; got inputs {inputs}, outputs {list(outputs)}"
        )
    return onnx.helper.make_node(
        OP_TYPE, inputs, outputs, name=name, domain=domain, K=K, N=N, bits=bits, group_size=group_size
    )
