"""The ``ai.edgekit::AttentionInt8`` op: INT8 Q.K^T attention (SageAttention2-style), specification and references.

Numpy only (no torch, no onnx at import time).

Operator
--------
Domain ``ai.edgekit``, op type ``AttentionInt8``, opset version 1. Inputs ``Q`` ``[B, H, S, D]``, ``K`` and ``V``
``[B, H, Skv, D]`` (float); output ``O`` ``[B, H, S, D]`` approximating ``softmax(Q K^T * sm_scale) V``. Attributes:
``q_block`` (queries per Q scale; 1 = per token, the default), ``k_block`` (keys per K scale, default 64),
``smooth_q`` (0/1, default 1), ``sm_scale`` (FLOAT, default ``1 / sqrt(D)``). No mask (non-causal).

Computation (``quantize`` then ``reference_quantized``), per (batch, head):

1. **Smooth K**: ``Ks = K - mean_j K[j]``. Exact: it subtracts ``q_i . mean(K)`` from every score of query ``i``, a
   constant along the softmax axis. It removes the channel-wise offset that keys often carry (outlier channels
   shared by all tokens), so the int8 grid spends its range on what differs between keys.
2. **Smooth Q** (``smooth_q``): ``Qs = Q - mean_i Q[i]`` and a per-key bias ``b_j = mean(Q) . Ks[j]`` (fp32, not
   quantized), so ``Q_i . Ks_j = Qs_i . Ks_j + b_j`` exactly.
3. **Quantize** symmetric int8 (round to nearest, clip to [-127, 127]): ``Qs`` with one scale per block of
   ``q_block`` consecutive queries, ``Ks`` with one scale per block of ``k_block`` consecutive keys;
   ``scale = max|x| / 127`` over the block (1 for an all-zero block).
4. **Scores**: ``S_ij = (Q8_i . K8_j) * q_scale[i // q_block] * k_scale[j // k_block] + b_j``, the dot product
   exact in int32 (``|.| <= D * 127^2``).
5. **Softmax** in fp32 over ``j`` of ``S_ij * sm_scale``: ``p_ij = exp(S_ij * sm_scale - max_j)``, ``l_i = sum_j p_ij``.
6. **P.V in fp16**: ``O_i = (sum_j fp16(p_ij) * fp16(V_j)) / l_i``, products and sums in fp32 (tensor-core fp16
   with fp32 accumulation). Implementations with an online softmax round ``p`` relative to a running maximum; the
   difference is within fp16 rounding of ``p``.

Quantized inputs (what the CUDA kernel ``cuda/attention_int8.cu`` takes, ``quantize`` returns them as a dict):
``q8`` int8 ``[B, H, S, D]``, ``q_scale`` float32 ``[B, H, ceil(S / q_block)]``, ``k8`` int8 ``[B, H, Skv, D]``,
``k_scale`` float32 ``[B, H, ceil(Skv / k_block)]``, ``k_bias`` float32 ``[B, H, Skv]`` (zeros without
``smooth_q``), ``v16`` float16 ``[B, H, Skv, D]``. The CUDA kernel supports ``D = 64``.

``reference_exact`` is plain fp64 attention of the float inputs; ``tests/test_kernels_attention.py`` states the
tolerance (cosine similarity >= 0.999 per output, also with outlier channels in K, where smoothing is what keeps
the error small).
"""

from __future__ import annotations

import math

import numpy as np

DOMAIN = "ai.edgekit"
OP_TYPE = "AttentionInt8"
DEFAULT_Q_BLOCK = 1
DEFAULT_K_BLOCK = 64
KERNEL_HEAD_DIM = 64


def _check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"Q, K, V must be [B, H, S, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"K and V must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"Q {q.shape} and K {k.shape} must share batch, heads and head dim")
    if min(q.shape) < 1 or k.shape[2] < 1:
        raise ValueError(f"empty attention input: Q {q.shape}, K {k.shape}")


def _check_blocks(q_block: int, k_block: int) -> None:
    if q_block < 1 or k_block < 1:
        raise ValueError(f"q_block and k_block must be >= 1, got {q_block}, {k_block}")


def quantize_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 over blocks of ``block`` rows along axis -2 of ``x [..., S, D]``:
    ``(int8 [..., S, D], scales float32 [..., ceil(S / block)])``."""
    x = np.asarray(x, dtype=np.float32)
    S = x.shape[-2]
    nb = -(-S // block)
    pad = nb * block - S
    xp = np.concatenate([x, np.zeros((*x.shape[:-2], pad, x.shape[-1]), np.float32)], axis=-2) if pad else x
    blocks = xp.reshape(*x.shape[:-2], nb, block * x.shape[-1])
    scale = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    rows = np.repeat(scale, block, axis=-1)[..., :S]
    q = np.clip(np.rint(x / rows[..., None]), -127, 127).astype(np.int8)
    return q, scale


def quantize(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    q_block: int = DEFAULT_Q_BLOCK,
    k_block: int = DEFAULT_K_BLOCK,
    smooth_q: bool = True,
    smooth_k: bool = True,
) -> dict[str, np.ndarray]:
    """Steps 1-3 of the specification: the quantized inputs of the op's kernels (``smooth_k=False`` only for
    showing what smoothing buys; the op always smooths K)."""
    q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
    _check_qkv(q, k, v)
    _check_blocks(q_block, k_block)
    ks = k - k.mean(axis=2, keepdims=True) if smooth_k else k
    if smooth_q:
        q_mean = q.mean(axis=2, keepdims=True)  # [B, H, 1, D]
        qs = q - q_mean
        k_bias = np.einsum("bhd,bhjd->bhj", q_mean[:, :, 0].astype(np.float64), ks.astype(np.float64))
    else:
        qs, k_bias = q, np.zeros(k.shape[:3])
    q8, q_scale = quantize_blocks(qs, q_block)
    k8, k_scale = quantize_blocks(ks, k_block)
    return {
        "q8": q8,
        "q_scale": q_scale,
        "k8": k8,
        "k_scale": k_scale,
        "k_bias": k_bias.astype(np.float32),
        "v16": v.astype(np.float16),
    }


def scores(quantized: dict[str, np.ndarray], *, q_block: int, k_block: int) -> np.ndarray:
    """Step 4: float64 ``S [B, H, S, Skv]`` (before ``sm_scale``) from the quantized inputs."""
    q8, k8 = quantized["q8"], quantized["k8"]
    dots = np.einsum("bhid,bhjd->bhij", q8.astype(np.int64), k8.astype(np.int64))  # exact
    qs = np.repeat(quantized["q_scale"].astype(np.float64), q_block, axis=-1)[..., : q8.shape[2]]
    ks = np.repeat(quantized["k_scale"].astype(np.float64), k_block, axis=-1)[..., : k8.shape[2]]
    return dots * qs[..., :, None] * ks[..., None, :] + quantized["k_bias"].astype(np.float64)[..., None, :]


def reference_quantized(
    quantized: dict[str, np.ndarray], *, q_block: int, k_block: int, sm_scale: float | None = None
) -> np.ndarray:
    """Steps 4-6: the op's output, float32 ``[B, H, S, D]``, from ``quantize``'s dict."""
    _check_blocks(q_block, k_block)
    D = quantized["q8"].shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    s = (scores(quantized, q_block=q_block, k_block=k_block) * sm_scale).astype(np.float32)
    p = np.exp(s - s.max(axis=-1, keepdims=True))  # fp32
    l = p.sum(axis=-1, keepdims=True, dtype=np.float32)
    p16 = p.astype(np.float16).astype(np.float32)
    o = np.einsum("bhij,bhjd->bhid", p16, quantized["v16"].astype(np.float32))
    return (o / l).astype(np.float32)


def attention_int8(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    q_block: int = DEFAULT_Q_BLOCK,
    k_block: int = DEFAULT_K_BLOCK,
    smooth_q: bool = True,
    sm_scale: float | None = None,
    smooth_k: bool = True,
) -> np.ndarray:
    """The op end to end (numpy reference): ``quantize`` then ``reference_quantized``."""
    quantized = quantize(q, k, v, q_block=q_block, k_block=k_block, smooth_q=smooth_q, smooth_k=smooth_k)
    return reference_quantized(quantized, q_block=q_block, k_block=k_block, sm_scale=sm_scale)


def reference_exact(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, sm_scale: float | None = None) -> np.ndarray:
    """Plain attention in float64 (returned as float32): ``softmax(Q K^T * sm_scale) V``."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    _check_qkv(q, k, v)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    s = np.einsum("bhid,bhjd->bhij", q, k) * sm_scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (np.einsum("bhij,bhjd->bhid", p / p.sum(axis=-1, keepdims=True), v)).astype(np.float32)


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching vectors along the last axis (1 for two zero vectors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(axis=-1)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def make_node(
    inputs: list[str],
    outputs: list[str],
    *,
    q_block: int = DEFAULT_Q_BLOCK,
    k_block: int = DEFAULT_K_BLOCK,
    smooth_q: bool = True,
    sm_scale: float | None = None,
    name: str | None = None,
    domain: str = DOMAIN,
):
    """An ONNX NodeProto for AttentionInt8: inputs ``[Q, K, V]``, one output."""
    import onnx.helper

    _check_blocks(q_block, k_block)
    if len(inputs) != 3 or not all(inputs) or len(outputs) != 1:
        raise ValueError("AttentionInt8 takes inputs [Q, K, V] (non-empty names) and one output")
    attrs = dict(q_block=q_block, k_block=k_block, smooth_q=int(smooth_q))
    if sm_scale is not None:
        attrs["sm_scale"] = float(sm_scale)
    return onnx.helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=domain, **attrs)
