"""Weight sparsity (issue 6, parts 1 and 2): masks and pruning of a linear layer's weight, pure numpy.

A weight ``W`` is ``[N, K]`` (one row per output, as in ``wquant``); calibration inputs ``X`` are ``[rows, K]``.

- ``magnitude``: the importance of a weight is ``|W_ij|``.
- ``wanda_scores`` (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"): importance
  ``|W_ij| · ‖X_j‖₂``: a small weight on an input feature with large activations still matters. Compared within
  each output row.
- ``nm_mask``: N:M semi-structured sparsity (2:4, 4:8): in every group of ``m`` consecutive inputs of a row, the
  ``n`` most important weights are kept: the pattern sparse tensor cores (and the CPU kernels of issue 7) run.
- ``sparsegpt`` (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
  prunes column by column and moves each removed weight's error onto the columns not yet visited through the
  inverse Hessian of the layer's inputs (the same Cholesky factor GPTQ uses, ``wquant.gptq_prepare``); the mask is
  chosen per block of columns by ``w² / [H⁻¹]_jj²``, or per group of ``m`` for N:M.

``pq_index`` measures how compressible a weight is. Masks are boolean "keep" arrays of ``W``'s shape. These are
the building blocks; choosing a layer's sparsity inside the allocation's option space is the rest of issue 6.
"""

from __future__ import annotations

import numpy as np

from edgekit.compress.wquant import gptq_prepare
from edgekit.errors import ConfigError


def _check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"sparsity is the share of weights removed, in [0, 1); got {sparsity}")
    return float(sparsity)


def _check_nm(n: int, m: int, k: int) -> None:
    if not (0 < n < m) or m < 2:
        raise ConfigError(f"N:M sparsity keeps n of every m weights with 0 < n < m; got {n}:{m}")
    if k % m:
        raise ConfigError(f"{n}:{m} sparsity needs the input size to be a multiple of {m}; it is {k}")


def wanda_scores(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``|W_ij| · ‖X_j‖₂`` for ``w`` ``[N, K]`` and inputs ``x`` (any leading shape, ``K`` features last)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    if x.shape[1] != np.shape(w)[1]:
        raise ConfigError(f"inputs have {x.shape[1]} features; the weight takes {np.shape(w)[1]}")
    return np.abs(np.asarray(w, np.float64)) * np.sqrt((x * x).sum(axis=0))[None, :]


def unstructured_mask(scores: np.ndarray, sparsity: float, *, per_row: bool = True) -> np.ndarray:
    """Keep mask removing the ``sparsity`` share of the lowest ``scores``: in each row (Wanda's comparison group) or
    over the whole layer (``per_row=False``, magnitude pruning's). Ties are broken by position, so the count is
    exact: ``floor(sparsity · size)`` removed per group."""
    s = np.asarray(scores, np.float64)
    sparsity = _check_sparsity(sparsity)
    flat = s if per_row else s.reshape(1, -1)
    drop = int(np.floor(sparsity * flat.shape[1]))
    keep = np.ones(flat.shape, bool)
    if drop:
        order = np.argsort(flat, axis=1, kind="stable")[:, :drop]
        np.put_along_axis(keep, order, False, axis=1)
    return keep.reshape(s.shape)


def nm_mask(scores: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """Keep mask with exactly ``n`` of every ``m`` consecutive inputs of each row: the highest ``scores``."""
    s = np.asarray(scores, np.float64)
    rows, k = s.shape
    _check_nm(n, m, k)
    groups = s.reshape(rows, k // m, m)
    order = np.argsort(-groups, axis=2, kind="stable")[:, :, :n]
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order, True, axis=2)
    return keep.reshape(rows, k)


def sparsegpt(w: np.ndarray, h: np.ndarray, *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
              block: int = 128, damp: float = 0.01) -> np.ndarray:
    """``w`` ``[N, K]`` pruned with SparseGPT's error compensation, given the input Hessian ``h`` ``[K, K]``
    (``wquant.hessian``). Either ``sparsity`` (unstructured, the mask chosen per block of ``block`` columns over all
    rows) or ``nm=(n, m)``. Returns the pruned float32 weight; its zeros are the mask."""
    if (sparsity is None) == (nm is None):
        raise ConfigError("sparsegpt needs exactly one of sparsity= and nm=")
    w = np.array(w, dtype=np.float32)
    rows, k = w.shape
    if nm is not None:
        _check_nm(nm[0], nm[1], k)
        if block % nm[1]:
            raise ConfigError(f"block ({block}) must be a multiple of m ({nm[1]})")
    else:
        sparsity = _check_sparsity(sparsity)
    prep = gptq_prepare(h, damp=damp, act_order=False)  # columns in their order: masks and N:M groups stay aligned
    if prep.hinv.shape != (k, k):
        raise ConfigError(f"Hessian shape {prep.hinv.shape} does not match the weight's K={k}")
    w[:, prep.dead] = 0.0
    hinv = prep.hinv.astype(np.float64)
    w = w.astype(np.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = np.diag(h1)
        if nm is None:  # the block's mask at once: lowest w² / [H⁻¹]_jj² across the block
            keep1 = unstructured_mask(w1 ** 2 / d[None, :] ** 2, sparsity, per_row=False)
        else:
            keep1 = np.ones_like(w1, bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # each group of m: keep the n with the largest saliency
                g = slice(i, i + nm[1])
                keep1[:, g] = nm_mask(w1[:, g] ** 2 / d[None, g] ** 2, nm[0], nm[1])
            col = w1[:, i]
            pruned = np.where(keep1[:, i], col, 0.0)
            e = (col - pruned) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            w1[:, i] = pruned
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.astype(np.float32)


def pq_index(w: np.ndarray, p: float = 0.5, q: float = 1.0) -> float:
    """The PQ Index of a weight (Diao et al., "Pruning Deep Neural Networks from a Sparsity Perspective"):
    ``1 − d^(1/q − 1/p) · ‖w‖_p / ‖w‖_q`` for ``0 < p < q``: 0 when every magnitude is equal (nothing to prune),
    rising towards ``1 − d^(1/q − 1/p)`` as the mass concentrates in few weights (much to prune): the per-layer
    compressibility figure of the report."""
    if not 0 < p < q:
        raise ConfigError(f"the PQ Index needs 0 < p < q, got p={p}, q={q}")
    a = np.abs(np.asarray(w, np.float64)).ravel()
    d = a.size
    norm_q = float((a ** q).sum() ** (1 / q))
    if d == 0 or norm_q == 0:
        return 0.0
    norm_p = float((a ** p).sum() ** (1 / p))
    return float(1.0 - d ** (1 / q - 1 / p) * norm_p / norm_q)


def sparsity_of(w: np.ndarray) -> float:
    """The share of exact zeros in ``w``."""
    w = np.asarray(w)
    return float((w == 0).sum() / max(w.size, 1))
