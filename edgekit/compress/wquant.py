"""Low-bit weight quantizers (weight-only, group-wise): pure functions over numpy arrays.

A weight ``W`` is ``[N, K]``: one row per output, groups of ``group`` consecutive input columns share a scale (and,
asymmetric, a zero point). Stored values ``q`` are unsigned (``0 .. 2^bits - 1``); the float weight is
``(q - zero) * scale``, with ``zero = 2^(bits-1)`` when symmetric. That is the convention of ONNX Runtime's
``MatMulNBits`` / ``GatherBlockQuantized`` and of the ``ai.edgekit`` ops, so what is measured is what ships.

- ``rtn``: round to nearest, with the clipping range chosen per group to minimise the (optionally
  Hessian-diagonal-weighted) squared error over a grid of shrink factors (MSE-optimal clipping).
- ``gptq``: GPTQ (Frantar et al., 2022): columns quantized one at a time, the error of each spread over the columns
  not yet quantized through the inverse Hessian of the layer's inputs (``H = 2 XᵀX / n``), with dampening, lazy
  block updates and act-order (columns by decreasing Hessian diagonal). Group parameters are fixed up front from
  the clipped RTN ranges ("static groups"), so groups stay contiguous in the original column order, as the runtime
  kernels require, while act-order still decides the order of rounding.
- ``hessian``: ``2 XᵀX / n`` from calibration inputs ``X`` (``[rows, K]``), accumulated in float64.

No torch here; float64 linear algebra in numpy is fast enough for the layer sizes of edge models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import ConfigError

CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.55, 10), 3))  # shrink factors tried by MSE-optimal clipping


@dataclass(frozen=True)
class QWeight:
    """A group-wise quantized ``[N, K]`` weight: ``q`` uint8 ``[N, K_padded]``, ``scales`` float32 ``[N, blocks]``,
    ``zeros`` uint8 ``[N, blocks]`` or None (symmetric: ``2^(bits-1)``). K is padded to a multiple of ``group``
    with values that dequantize to exactly 0."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    group: int
    k: int  # the real K (before padding)

    @property
    def n(self) -> int:
        return int(self.q.shape[0])

    @property
    def blocks(self) -> int:
        return int(self.scales.shape[1])

    def zero_points(self) -> np.ndarray:
        """Zero points as ``[N, blocks]`` uint8 (the implicit symmetric midpoint when ``zeros`` is None)."""
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """The float ``[N, K]`` weight this encodes."""
        zp = np.repeat(self.zero_points().astype(np.float32), self.group, axis=1)
        s = np.repeat(self.scales.astype(np.float32), self.group, axis=1)
        return ((self.q.astype(np.float32) - zp) * s)[:, : self.k]


def check_params(bits: int, group: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"weight-only quantization supports 2, 3, 4 or 8 bits, not {bits}")
    if group < 16 or group & (group - 1):
        raise ConfigError(f"group size must be a power of two >= 16, not {group}")


def _pad(w: np.ndarray, group: int) -> np.ndarray:
    n, k = w.shape
    kp = -(-k // group) * group
    return w if kp == k else np.concatenate([w, np.zeros((n, kp - k), w.dtype)], axis=1)


def _params(wg: np.ndarray, bits: int, symmetric: bool, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per group for clipping factor(s) ``alpha`` (broadcast over ``wg``'s leading axes)."""
    qmax = (1 << bits) - 1
    if symmetric:
        amax = np.abs(wg).max(-1) * alpha
        half = 1 << (bits - 1)
        scale = np.maximum(amax / max(half - 1, 1), 1e-12)
        return scale, np.full_like(scale, half)
    lo = np.minimum(wg.min(-1), 0) * alpha
    hi = np.maximum(wg.max(-1), 0) * alpha
    scale = np.maximum((hi - lo) / qmax, 1e-12)
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    return scale, zero


def _quant(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale + zero), 0, (1 << bits) - 1)


def rtn(w: np.ndarray, bits: int, group: int, *, symmetric: bool = False, clip: bool = True,
        importance: np.ndarray | None = None) -> QWeight:
    """Round-to-nearest group-wise quantization of ``w`` ``[N, K]``. With ``clip``, each group's range is shrunk by
    the factor from ``CLIP_GRID`` that minimises its squared error, weighted per column by ``importance`` (e.g.
    the Hessian diagonal) when given."""
    check_params(bits, group)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ConfigError(f"rtn expects a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    wp = _pad(w, group)
    blocks = wp.shape[1] // group
    wg = wp.reshape(n, blocks, group)
    imp = None
    if importance is not None:
        imp = _pad(np.asarray(importance, np.float32).reshape(1, k), group).reshape(1, blocks, group)
    best_scale, best_zero = _params(wg, bits, symmetric, 1.0)
    if clip:
        best_err = np.full((n, blocks), np.inf)
        for a in CLIP_GRID:
            scale, zero = _params(wg, bits, symmetric, a)
            deq = (_quant(wg, scale[..., None], zero[..., None], bits) - zero[..., None]) * scale[..., None]
            d2 = (deq - wg) ** 2
            err = (d2 * imp).sum(-1) if imp is not None else d2.sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    q = _quant(wg, best_scale[..., None], best_zero[..., None], bits).reshape(n, -1)
    scales = best_scale.astype(np.float32)
    return QWeight(q=q.astype(np.uint8), scales=scales, zeros=None if symmetric else best_zero.astype(np.uint8),
                   bits=bits, group=group, k=k)


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 XᵀX / rows`` of layer inputs ``x`` (any leading shape, features last), float64."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    return 2.0 * (x.T @ x) / max(len(x), 1)


@dataclass(frozen=True)
class GPTQPrep:
    """What GPTQ derives from a layer's Hessian alone (shared by every bit-width and group size of that layer):
    the column order, the dampened Hessian's diagonal and the upper Cholesky factor of its inverse (permuted)."""

    perm: np.ndarray
    dead: np.ndarray
    diag: np.ndarray  # Hessian diagonal in the original column order (dead columns set to 1)
    hinv: np.ndarray  # upper U with inv(H_perm + damp) = Uᵀ U


def gptq_prepare(h: np.ndarray, *, damp: float = 0.01, act_order: bool = True) -> GPTQPrep:
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ConfigError(f"GPTQ needs a square Hessian, got shape {h.shape}")
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    diag = np.diag(h).copy()
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * float(np.mean(diag))
    try:
        # With J the reversal, J·H·J = M·Mᵀ gives H = R·Rᵀ, R = J·M·J upper triangular, so inv(H) = (R⁻¹)ᵀ·R⁻¹:
        # the factor GPTQ needs is R⁻¹ (one Cholesky and one triangular inverse instead of inverting H).
        r = np.ascontiguousarray(np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1])
        try:
            from scipy.linalg.lapack import dtrtri

            hinv, info = dtrtri(r, lower=0)
            if info != 0:
                raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
        except ImportError:  # numpy only
            hinv = np.linalg.inv(r)
    except np.linalg.LinAlgError as exc:
        raise ConfigError(f"GPTQ: the layer's input Hessian is not positive definite ({exc})",
                          hint="use more calibration samples or a larger damp") from None
    return GPTQPrep(perm=perm, dead=dead, diag=diag, hinv=hinv.astype(np.float32))


def gptq(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, *, symmetric: bool = False, damp: float = 0.01,
         act_order: bool = True, clip: bool = True, block: int = 128, prep: GPTQPrep | None = None) -> QWeight:
    """GPTQ of ``w`` ``[N, K]`` given the input Hessian ``h`` ``[K, K]`` (or its ``gptq_prepare``; see the module
    docstring)."""
    check_params(bits, group)
    w = np.array(w, dtype=np.float32)
    n, k = w.shape
    if prep is None:
        if h is None:
            raise ConfigError("gptq needs the Hessian or its gptq_prepare()")
        prep = gptq_prepare(h, damp=damp, act_order=act_order)
    if prep.hinv.shape != (k, k):
        raise ConfigError(f"Hessian shape {prep.hinv.shape} does not match the weight's K={k}")
    w[:, prep.dead] = 0.0
    # static groups: clipped RTN ranges from the original weights, weighted by the Hessian diagonal
    ref = rtn(w, bits, group, symmetric=symmetric, clip=clip, importance=prep.diag)
    perm, hinv = prep.perm, prep.hinv
    scale_col = np.repeat(ref.scales, group, axis=1)[:, :k][:, perm]
    zero_col = np.repeat(ref.zero_points().astype(np.float32), group, axis=1)[:, :k][:, perm]
    w = w[:, perm]
    q = np.zeros((n, k), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s, z = scale_col[:, i1 + i], zero_col[:, i1 + i]
            qc = _quant(col, s, z, bits)
            q[:, i1 + i] = qc
            e = (col - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, np.argsort(perm)]
    full = _pad(q, group)
    if full.shape[1] > k:  # padding dequantizes to 0
        full[:, k:] = np.repeat(ref.zero_points(), group, axis=1)[:, k:]
    return QWeight(q=full.astype(np.uint8), scales=ref.scales, zeros=ref.zeros, bits=bits, group=group, k=k)


def refit_scales(qw: QWeight, w: np.ndarray, h: np.ndarray, *, ridge: float = 1e-6) -> QWeight:
    """Per-layer calibration of the scales (in the spirit of AdaQuant, Hubara et al. 2021, with the integer codes
    fixed): for each output row, the group scales ``s`` that minimise the expected output error
    ``(ŵ(s) − w)ᵀ H (ŵ(s) − w)`` with ``ŵ = s ⊙ (q − z)`` blockwise. The error is quadratic in ``s``, so each row is
    one small linear solve (blocks × blocks). A row keeps its old scales unless the refit lowers its error."""
    k, blocks, group = qw.k, qw.blocks, qw.group
    kp = blocks * group
    codes = np.zeros((qw.n, kp))
    codes[:, :k] = (qw.q.astype(np.float64) - np.repeat(qw.zero_points().astype(np.float64), group, axis=1))[:, :k]
    hp = np.zeros((kp, kp))
    hp[:k, :k] = np.asarray(h, dtype=np.float64)
    wp = np.zeros((qw.n, kp))
    wp[:, :k] = np.asarray(w, dtype=np.float64)
    hw = wp @ hp  # [N, Kp]: row n is (H w_n)ᵀ
    scales = qw.scales.astype(np.float64).copy()
    for n in range(qw.n):
        c = codes[n]
        hb = (hp * c[None, :]).reshape(kp, blocks, group).sum(-1)  # H @ basis, [Kp, blocks]
        a = (hb * c[:, None]).reshape(blocks, group, blocks).sum(1)  # basisᵀ H basis
        b = (hw[n] * c).reshape(blocks, group).sum(-1)  # basisᵀ H w
        a[np.diag_indices(blocks)] += ridge * max(float(np.trace(a)) / blocks, 1e-30)
        try:
            s_new = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            continue
        if np.any(s_new <= 0):
            continue
        s_old = scales[n]
        # error(s) = sᵀ A s − 2 sᵀ b + const: compare without forming the weights
        if s_new @ a @ s_new - 2 * s_new @ b < s_old @ a @ s_old - 2 * s_old @ b:
            scales[n] = s_new
    return QWeight(q=qw.q, scales=scales.astype(np.float32), zeros=qw.zeros, bits=qw.bits, group=qw.group, k=k)


def storage_bytes(n: int, k: int, bits: int, group: int, *, symmetric: bool) -> int:
    """Bytes of a group-wise weight as ONNX Runtime stores it (``MatMulNBits``): packed values (K padded to the
    group), one float32 scale per group, and (asymmetric) zero points packed at ``bits`` per value per row."""
    blocks = -(-k // group)
    packed = n * blocks * (group * bits // 8)
    zp = 0 if symmetric else n * (-(-blocks * bits // 8) if bits in (2, 4) else blocks)
    return packed + 4 * n * blocks + zp
