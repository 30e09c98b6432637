"""Low rank for linear layers (issue 6, part 4): truncated SVD factorization and EoRA compensation, pure numpy.

A weight ``W`` is ``[N, K]`` (outputs × inputs); a layer ``y = W x`` becomes ``y = U (V x)`` with ``U`` ``[N, r]``
and ``V`` ``[r, K]``: ``r (N + K)`` weights instead of ``N K``.

- ``svd_factors``: the best rank-``r`` approximation in the Frobenius norm (Eckart–Young): the error is exactly the
  norm of the dropped singular values.
- ``activation_aware`` factors minimise the error of the layer's *outputs* on calibration inputs instead,
  ``‖(W − U V) Xᵀ‖``, by taking the SVD in the eigenspace of ``XᵀX``.
- ``eora`` ("EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation"): for a
  layer compressed some other way (quantized, sparse) to ``W_c``, a rank-``r`` residual path ``U V`` fitted to the
  compression error ``W − W_c`` in that eigenspace, so that ``W_c + U V`` repairs what matters for the outputs.

These are building blocks; choosing a layer's rank in the allocation's option space is the rest of issue 6.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import ConfigError


def _check_rank(rank: int, n: int, k: int) -> int:
    if int(rank) < 1:
        raise ConfigError(f"rank must be at least 1, got {rank}")
    return min(int(rank), n, k)


def svd_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U [N, r], V [r, K])`` with ``U @ V`` the best rank-``r`` approximation of ``w`` (float32)."""
    w = np.asarray(w, np.float64)
    r = _check_rank(rank, *w.shape)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]).astype(np.float32), vt[:r].astype(np.float32)


def _eigenspace(h: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(Q Λ^½, Λ^-½ Qᵀ)`` of the input Hessian / covariance ``h`` ``[K, K]`` (eigenvalues floored at ``eps`` of the
    largest, so that unused input directions cannot blow the inverse up)."""
    h = np.asarray(h, np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ConfigError(f"the input covariance must be square, got shape {h.shape}")
    lam, q = np.linalg.eigh((h + h.T) / 2)
    lam = np.maximum(lam, eps * max(float(lam.max()), 1e-30))
    return q * np.sqrt(lam), (q / np.sqrt(lam)).T


def activation_aware_factors(w: np.ndarray, h: np.ndarray, rank: int, *, eps: float = 1e-6
                             ) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` of rank ``r`` minimising ``‖(W − U V) Xᵀ‖_F`` for inputs with covariance ``h ∝ XᵀX``."""
    w = np.asarray(w, np.float64)
    r = _check_rank(rank, *w.shape)
    if np.shape(h) != (w.shape[1], w.shape[1]):
        raise ConfigError(f"the covariance is {np.shape(h)}; the weight takes {w.shape[1]} inputs")
    to_eig, from_eig = _eigenspace(h, eps)
    u, s, vt = np.linalg.svd(w @ to_eig, full_matrices=False)
    return (u[:, :r] * s[:r]).astype(np.float32), (vt[:r] @ from_eig).astype(np.float32)


def eora(w: np.ndarray, w_compressed: np.ndarray, h: np.ndarray, rank: int, *, eps: float = 1e-6
         ) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``r`` residual path ``(U, V)`` compensating ``w_compressed`` for ``w`` in the inputs' eigenspace:
    ``w_compressed + U @ V`` is what the layer computes."""
    w = np.asarray(w, np.float64)
    if np.shape(w_compressed) != w.shape:
        raise ConfigError(f"the compressed weight is {np.shape(w_compressed)}; the original is {w.shape}")
    return activation_aware_factors(w - np.asarray(w_compressed, np.float64), h, rank, eps=eps)


def factored_size(n: int, k: int, rank: int) -> int:
    """Weights in a rank-``rank`` factorization of an ``[n, k]`` layer."""
    return int(rank) * (int(n) + int(k))
