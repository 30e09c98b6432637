"""Per-sample scores of a model's outputs and inputs, and the two-sample Kolmogorov–Smirnov test.

The build computes these on held-out data into the bundle's reference sketch; the agent computes the same
functions on live traffic and tests the two against each other. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Output scores of a classifier (logits [N, K]): higher max-softmax = more confident; higher entropy = less;
# energy = -logsumexp(logits) (Liu et al. 2020): lower = more in-distribution.
OUTPUT_SCORES = ("max_softmax", "entropy", "energy")
# Input feature statistics per sample (any tensor): its mean and standard deviation.
INPUT_FEATURES = ("input_mean", "input_std", "input_rms")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def output_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Scores per sample of classifier logits ``[N, K]`` (or ``[K]`` for one sample)."""
    z = np.atleast_2d(np.asarray(logits, np.float64)).reshape(-1, np.shape(logits)[-1])
    p = softmax(z)
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
    return {"max_softmax": p.max(axis=-1), "entropy": entropy(p), "energy": -lse}


def input_features(x: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, standard deviation and root mean square of each sample of a batch ``[N, ...]``."""
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    return {"input_mean": flat.mean(axis=1), "input_std": flat.std(axis=1),
            "input_rms": np.sqrt((flat * flat).mean(axis=1))}


_ONES: dict[int, np.ndarray] = {}


def input_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-sample mean and standard deviation of a float batch ``[N, ...]`` from two BLAS dot products per sample
    (with ones, and with itself), and whether every value is finite (NaN/Inf propagate into both). The agent runs
    this on the requests its monitor watches, so it is kept to the two fastest passes numpy has."""
    flat = x.reshape(len(x), -1)
    n = flat.shape[1]
    ones = _ONES.get(n)
    if ones is None or ones.dtype != flat.dtype:
        ones = _ONES[n] = np.ones(n, flat.dtype)
    s = (flat @ ones).astype(np.float64)
    ss = np.einsum("ij,ij->i", flat, flat).astype(np.float64) if len(flat) > 1 else \
        np.asarray([np.dot(flat[0], flat[0])], np.float64)
    finite = bool(np.isfinite(s).all() and np.isfinite(ss).all())
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return mean, std, finite


def sample_scores(feeds: Mapping[str, np.ndarray], logits: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every score of a batch: output scores when ``logits`` are classifier outputs, plus the statistics of the
    first floating-point input."""
    out: dict[str, np.ndarray] = {}
    if logits is not None:
        out.update(output_scores(logits))
    for value in feeds.values():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and arr.ndim >= 2:
            out.update(input_features(arr))
            break
    return out


def _kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution (the asymptotic null of sqrt(n_eff) * D)."""
    if lam < 0.2:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return float(min(1.0, max(0.0, total)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic D and its asymptotic p-value (with Stephens' small-sample
    correction), as scipy.stats.ks_2samp(method="asymp") computes them."""
    a = np.sort(np.asarray(a, np.float64).ravel())
    b = np.sort(np.asarray(b, np.float64).ravel())
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return d, _kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def reference_values(values: np.ndarray, keep: int = 512) -> list[float]:
    """A compact stand-in for a score's reference distribution: all values if few, else ``keep`` evenly spaced
    quantiles (the KS test against them is the test against the full sample, up to 1/keep)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    v = v[np.isfinite(v)]
    if len(v) > keep:
        v = np.quantile(v, (np.arange(keep) + 0.5) / keep)
    return [float(round(x, 6)) for x in v]
