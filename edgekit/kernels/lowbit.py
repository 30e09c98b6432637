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
    ``skip``         optional float32, ``Y``'s shape: a residual added after the bias and the activation.
    ``ln_scale``     optional float32 ``[N]``: then each output row is layer-normalized (mean and biased variance
                     over its ``N`` values, ``epsilon``) and multiplied by it: ONNX ``LayerNormalization`` over the
                     last axis, fused (a transformer's ``Add`` + ``LayerNorm`` after its output projections).
    ``ln_bias``      optional float32 ``[N]``: added after ``ln_scale`` (needs it).
                     Absent optional inputs are omitted at the end or named ``""`` before a later one.
Attributes (INT)
    ``K``, ``N``     the logical reduction length and the number of outputs.
    ``bits``         2, 3, 4 or 8.
    ``group_size``   32, 64 or 128: consecutive values of a row along K that share a scale and a zero point.
    ``accuracy_level`` optional (native library, ``runtimes/onnxruntime/``): 0 = fp32 math (default, the reference
                     exactly up to float rounding); 4 = each activation row quantized to 8 bits, asymmetric
                     (``quantize_activations``: step ``(max(0, max a) - min(0, min a)) / 255``, a zero point per
                     row) and multiplied in integers (VNNI); the error per output is at most
                     ``step / 2 * sum_k |dequant(B)[n, k]|`` (plus fp32 rounding), and
                     ``reference_matmul(..., accuracy_level=4)`` is the same quantization followed by exact math.
Attributes (FLOAT)
    ``epsilon``      the LayerNorm's (default 1e-5).
Attributes (INTS)
    ``split``        optional: 2 to ``MAX_SPLIT`` positive widths summing to ``N``; the op then has one output per
                     width, each ``[..., width]``, holding consecutive columns of ``Y`` (a transformer's Q, K and V
                     projections computed as one GEMM; implementations copy them out in the epilogue). Absent: one
                     output ``Y``.
Attributes (STRING)
    ``activation``   optional: ``"Gelu"`` applies the exact GELU ``0.5 * y * (1 + erf(y / sqrt(2)))`` (ONNX ``Gelu``,
                     torch's ``nn.GELU()``) to every output after the bias, in the same epilogue pass; absent or
                     ``""`` = none. The native library evaluates erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26;
                     ``runtimes/onnxruntime/src/epilogue.cc``).
Output
    ``Y``            float32 ``[..., N]`` = ``LN(act(A @ dequant(B)[:, :K].T (+ bias)) (+ skip))``, where
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
ACTIVATIONS = ("", "Gelu")
MAX_SPLIT = 4  # outputs of one op (the split attribute)
INPUTS = ("A", "B_packed", "scales", "zero_points", "bias", "skip", "ln_scale", "ln_bias")


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
    activation: str = "",
    accuracy_level: int = 0,
    skip: np.ndarray | None = None,
    ln_scale: np.ndarray | None = None,
    ln_bias: np.ndarray | None = None,
    epsilon: float = 1e-5,
) -> np.ndarray:
    """The op's output ``Y[..., N] = act(A[..., K] @ dequantize(...).T (+ bias[N]))`` in float32; with
    ``accuracy_level=4``, ``A`` is first replaced by its per-row 8-bit quantization (``quantize_activations``)."""
    A = np.asarray(A, dtype=np.float32)
    if A.shape[-1:] != (K,):
        raise ValueError(f"A's last dimension must be K={K}, got shape {A.shape}")
    if accuracy_level not in (0, 4):
        raise ValueError(f"MatMulLowBit: accuracy_level must be 0 or 4, got {accuracy_level!r}")
    if accuracy_level == 4:
        q, scale, zero = quantize_activations(A.reshape(-1, K))
        A = ((q.astype(np.float64) - zero[:, None]) * scale[:, None]).reshape(A.shape)
    W = dequantize(packed, scales, zero_points, bits, group_size, K)
    if W.shape[0] != N:
        raise ValueError(f"B_packed has {W.shape[0]} rows but the attribute N={N}")
    Y = np.matmul(A, W.T).astype(np.float32)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (N,) or not np.issubdtype(bias.dtype, np.floating):
            raise ValueError(f"MatMulLowBit: bias must be float32 [N] = [{N}], got {bias.dtype} {bias.shape}")
        Y += bias.astype(np.float32)
    Y = apply_activation(Y, activation)
    if skip is not None:
        Y = (Y + np.asarray(skip, np.float32)).astype(np.float32)
    if ln_scale is not None:
        y = Y.astype(np.float64)
        mean = y.mean(axis=-1, keepdims=True)
        var = ((y - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (y - mean) / np.sqrt(var + float(epsilon)) * np.asarray(ln_scale, np.float64)
        Y = (y + (0.0 if ln_bias is None else np.asarray(ln_bias, np.float64))).astype(np.float32)
    elif ln_bias is not None:
        raise ValueError("MatMulLowBit: ln_bias needs ln_scale")
    return Y


def quantize_activations(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``A [M, K]`` quantized as ``accuracy_level`` 4 does, in the native library's float32 arithmetic
    (bit for bit): ``lo = min(0, min a)``, ``hi = max(0, max a)``, ``inv = 255 / (hi - lo)``, uint8 zero point
    ``z = clip(round(-lo * inv), 0, 255)``, levels ``u = clip(round(a * inv) + z, 0, 255)`` (round half to even).
    Returns ``(q, scale, zero)``: ``q = u - 128`` int8 ``[M, K]``, ``scale = (hi - lo) / 255`` float32 ``[M]`` and
    ``zero = z - 128`` int32 ``[M]``, so that ``a ~= (q - zero) * scale``. All-zero rows: scale 0, q 0, zero 0."""
    A = np.asarray(A, dtype=np.float32)
    if A.ndim != 2:
        raise ValueError(f"quantize_activations expects A [M, K], got shape {A.shape}")
    f = np.float32
    lo = np.minimum(A.min(axis=1), f(0)) if A.shape[1] else np.zeros(len(A), f)
    hi = np.maximum(A.max(axis=1), f(0)) if A.shape[1] else np.zeros(len(A), f)
    rng = (hi - lo).astype(f)
    live = rng > 0
    inv = np.where(live, f(255) / np.where(live, rng, f(1)), f(0)).astype(f)
    z = np.where(live, np.clip(np.rint((-lo * inv).astype(f)), 0, 255), f(128)).astype(f)
    u = np.clip(np.rint((A * inv[:, None]).astype(f)) + z[:, None], 0, 255)
    return (u - 128).astype(np.int8), (rng / f(255)).astype(f), (z - 128).astype(np.int32)


def apply_activation(Y: np.ndarray, activation: str) -> np.ndarray:
    """``Y`` through the op's ``activation`` (``ACTIVATIONS``), in float64 math, returned as float32."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"MatMulLowBit: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not activation:
        return Y
    from math import erf, sqrt

    y = np.asarray(Y, np.float64)
    phi = 0.5 * (1.0 + np.vectorize(erf, otypes=[np.float64])(y / sqrt(2.0)))
    return (y * phi).astype(np.float32)


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
    activation: str = "",
    split: list[int] | None = None,
    epsilon: float | None = None,
):
    """An ONNX NodeProto for MatMulLowBit; ``inputs`` = [A, B_packed, scales(, zero_points(, bias(, skip(,
    ln_scale(, ln_bias))))))]; ``activation`` (``ACTIVATIONS``), ``split`` (one output per part) and ``epsilon`` are
    written only when set.

    Optional inputs may be ``""`` before a later one (e.g. symmetric zero points before a bias); the last one named
    and A, B_packed, scales must be non-empty; ``ln_bias`` needs ``ln_scale``; ``split`` excludes skip/ln_scale.
    ``domain`` defaults to ``ai.edgekit``; ``edgekit.kernels.ort_python`` rewrites it for its Python fallback.
    """
    import onnx.helper

    check_attributes(K, N, bits, group_size)
    inputs = list(inputs)
    named = dict(zip(INPUTS, [bool(i) for i in inputs]))
    if (
        not 3 <= len(inputs) <= len(INPUTS)
        or not all(inputs[:3])
        or not inputs[-1]
        or (named.get("ln_bias") and not named.get("ln_scale"))
        or (split and (named.get("skip") or named.get("ln_scale")))
        or len(outputs) != (len(split) if split else 1)
        or not all(outputs)
    ):
        raise ValueError(
            f"MatMulLowBit takes inputs {list(INPUTS)} (the first three and the last named non-empty, others '' "
            "when absent; ln_bias only with ln_scale; split not with skip/ln_scale) and one output per split part; "
            f"got inputs {inputs}, outputs {list(outputs)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"MatMulLowBit: activation must be one of {ACTIVATIONS}, got {activation!r}")
    extra = {"activation": activation} if activation else {}
    if epsilon is not None:
        extra["epsilon"] = float(epsilon)
    if split:
        split = [int(v) for v in split]
        if not 2 <= len(split) <= MAX_SPLIT or min(split) < 1 or sum(split) != N:
            raise ValueError(f"MatMulLowBit: split must be 2 to {MAX_SPLIT} positive widths summing to N={N}, "
                             f"got {split}")
        extra["split"] = split
    return onnx.helper.make_node(
        OP_TYPE, inputs, outputs, name=name, domain=domain, K=K, N=N, bits=bits, group_size=group_size, **extra
    )
