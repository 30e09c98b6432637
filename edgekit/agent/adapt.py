"""Test-time adaptation on the device, tiered and guarded.

Tier (a), forward-only:
- ``NormAdapter`` re-estimates normalization statistics from a window of recent inputs (Schneider et al. 2020,
  "Improving robustness against common corruptions by covariate shift adaptation"): each BatchNorm-folded Conv
  (``normtable``) gets the per-channel correction that maps its output statistics on the recent inputs back to the
  source statistics, blended with a source prior of ``prior`` samples. It is applied as initializer overrides of
  the serving session, so the integer kernels stay fused.
- ``Lame`` adapts the outputs only (Boudiaf et al. 2022, "Parameter-free Online Test-time Adaptation"): the
  class assignment of the current sample is solved jointly with a window of recent ones under a kNN affinity of
  their features, with the model's probabilities as the prior. No parameter changes, so it cannot drift.
Tier (b), where torch is present: entropy minimization of the same per-channel affine parameters (TENT/EATA,
``edgekit.agent_torch.tent``).

Guardrails (``Guard``): adaptation state is versioned and bounded (a fixed window of inputs); on collapse signals
(mean entropy far below the source's, or predictions concentrating on one class) the model is reset to source.
numpy + onnx; no torch.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgekit.agent import normtable
from edgekit.agent.normtable import NormLayer
from edgekit.agent.scores import softmax

log = logging.getLogger(__name__)

EPS = 1e-5


@dataclass
class AdaptState:
    """What the serving session is adapted with: a per-channel affine per norm layer, and its version."""

    version: int = 0
    scale: dict[str, np.ndarray] = field(default_factory=dict)
    shift: dict[str, np.ndarray] = field(default_factory=dict)
    reason: str = "source"

    def is_source(self) -> bool:
        return not self.scale

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for k, v in self.scale.items():
            out[f"scale/{k}"] = v
        for k, v in self.shift.items():
            out[f"shift/{k}"] = v
        return out

    @classmethod
    def from_npz_dict(cls, arrays: Mapping[str, np.ndarray], version: int, reason: str) -> AdaptState:
        scale = {k.removeprefix("scale/"): np.asarray(v) for k, v in arrays.items() if k.startswith("scale/")}
        shift = {k.removeprefix("shift/"): np.asarray(v) for k, v in arrays.items() if k.startswith("shift/")}
        return cls(version, scale, shift, reason)


class InputWindow:
    """The most recent inputs (one sample each), bounded in count and bytes."""

    def __init__(self, size: int, max_bytes: int = 64 << 20) -> None:
        self.size, self.max_bytes = int(size), int(max_bytes)
        self._items: deque[dict[str, np.ndarray]] = deque()
        self._bytes = 0

    def add(self, feeds: Mapping[str, np.ndarray]) -> None:
        sample = {k: np.array(v, copy=True) for k, v in feeds.items()}
        self._items.append(sample)
        self._bytes += sum(v.nbytes for v in sample.values())
        while self._items and (len(self._items) > self.size or self._bytes > self.max_bytes):
            old = self._items.popleft()
            self._bytes -= sum(v.nbytes for v in old.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def batch(self) -> dict[str, np.ndarray]:
        keys = self._items[0].keys()
        return {k: np.concatenate([s[k] for s in self._items]) for k in keys}

    def samples(self) -> list[dict[str, np.ndarray]]:
        return list(self._items)


class NormAdapter:
    """Forward-only re-estimation of the norm layers' statistics on a window of recent inputs."""

    def __init__(self, model, layers: Sequence[NormLayer], *, prior: float = 16.0, batched: bool = True) -> None:
        """``model`` is the artifact's ModelProto; ``prior`` the weight of the source statistics in samples."""
        self.layers = list(layers)
        self.prior = float(prior)
        self.batched = batched
        self.source_values = normtable.initial_values(model, self.layers)
        self._stats_bytes = normtable.stats_model(model, [la.to_dict() for la in self.layers]).SerializeToString()
        self._stats_rt = None
        self._stats_for: int | None = None

    def overrides(self, state: AdaptState) -> dict[str, np.ndarray]:
        return normtable.overrides(self.layers, self.source_values, state.scale, state.shift)

    def _stats(self, state: AdaptState, window: InputWindow) -> list[tuple[np.ndarray, np.ndarray]]:
        from edgekit.agent.runtime import OrtRuntime

        if self._stats_rt is None or self._stats_for != state.version:
            self._stats_rt = OrtRuntime(self._stats_bytes, overrides=self.overrides(state))
            self._stats_for = state.version
        names = [f"edgekit_{k}_{i}" for i in range(len(self.layers)) for k in ("mean", "msq")]
        if self.batched:
            outs = self._stats_rt.session.run(names, window.batch())
            return normtable.stats_outputs(dict(zip(names, outs)), len(self.layers))
        sums: list[np.ndarray] | None = None
        samples = window.samples()
        for feeds in samples:  # static-batch models: one sample at a time
            outs = self._stats_rt.session.run(names, feeds)
            sums = [np.asarray(o, np.float64) for o in outs] if sums is None else [a + o for a, o in zip(sums, outs)]
        means = {n: v / len(samples) for n, v in zip(names, sums)}
        return normtable.stats_outputs(means, len(self.layers))

    def update(self, state: AdaptState, window: InputWindow) -> AdaptState:
        """The next state from the statistics of the window (measured under ``state``'s correction)."""
        n = len(window)
        scale, shift = {}, {}
        for layer, (mean_y, var_y) in zip(self.layers, self._stats(state, window)):
            s0 = np.asarray(state.scale.get(layer.name, 1.0), np.float64)
            t0 = np.asarray(state.shift.get(layer.name, 0.0), np.float64)
            mean_z = (mean_y - t0) / s0  # statistics of the uncorrected output, as the window's inputs produce it
            var_z = var_y / (s0 * s0)
            src_mean = np.asarray(layer.src_mean, np.float64)
            src_var = np.asarray(layer.src_std, np.float64) ** 2
            w = n / (n + self.prior)
            mean = (1 - w) * src_mean + w * mean_z
            var = (1 - w) * src_var + w * var_z
            s = np.sqrt(src_var + EPS) / np.sqrt(var + EPS)
            scale[layer.name] = np.clip(s, *normtable.SCALE_BOUNDS).astype(np.float32)
            shift[layer.name] = (src_mean - scale[layer.name] * mean).astype(np.float32)
        return AdaptState(state.version + 1, scale, shift, f"norm statistics of {n} recent inputs")


class Lame:
    """LAME output adaptation over a sliding window of recent samples (features and log-probabilities)."""

    def __init__(self, window: int = 64, knn: int = 5, iters: int = 20) -> None:
        self.feats: deque[np.ndarray] = deque(maxlen=int(window))
        self.logp: deque[np.ndarray] = deque(maxlen=int(window))
        self.knn, self.iters = int(knn), int(iters)

    def reset(self) -> None:
        self.feats.clear()
        self.logp.clear()

    def __call__(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Adapted probabilities for the samples of ``logits`` [B, K] (each joins the window first)."""
        logits = np.atleast_2d(np.asarray(logits, np.float64))
        feats = logits if features is None else np.asarray(features, np.float64).reshape(len(logits), -1)
        feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
        p = softmax(logits)
        for f, q in zip(feats, p):
            self.feats.append(f)
            self.logp.append(np.log(np.clip(q, 1e-12, 1.0)))
        F = np.stack(self.feats)
        logp = np.stack(self.logp)
        n = len(F)
        k = min(self.knn, n - 1)
        if k < 1:
            return p
        sim = F @ F.T
        np.fill_diagonal(sim, -np.inf)
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        W = np.zeros((n, n))
        np.put_along_axis(W, idx, 1.0, axis=1)
        W = (W + W.T) / 2  # symmetric kNN affinity
        Z = np.exp(logp)
        for _ in range(self.iters):  # concave-convex procedure: Z ∝ P ⊙ exp(W Z)
            logits_z = logp + W @ Z
            Z_new = softmax(logits_z)
            if np.abs(Z_new - Z).max() < 1e-6:
                Z = Z_new
                break
            Z = Z_new
        return Z[-len(logits):]


@dataclass
class GuardConfig:
    window: int = 200  # predictions watched
    entropy_ratio: float = 0.25  # collapse: mean entropy below this fraction of the source's
    class_share: float = 0.6  # collapse: one class takes more than this share of predictions (and > 3x source)


class Guard:
    """Collapse signals on the adapted model's recent predictions."""

    def __init__(self, config: GuardConfig, ref_entropy: float | None, ref_max_share: float | None) -> None:
        self.config = config
        self.ref_entropy = ref_entropy
        self.ref_max_share = ref_max_share
        self.entropies: deque[float] = deque(maxlen=config.window)
        self.preds: deque[int] = deque(maxlen=config.window)

    def reset(self) -> None:
        self.entropies.clear()
        self.preds.clear()

    def observe(self, entropies: np.ndarray, predictions: np.ndarray) -> None:
        """Per-sample entropies and predicted classes of recent requests."""
        self.entropies.extend(np.asarray(entropies, float).tolist())
        self.preds.extend(np.asarray(predictions).astype(int).tolist())

    def collapsed(self) -> str | None:
        """A reason when the recent predictions show a collapse, else None (needs a full window)."""
        cfg = self.config
        if len(self.preds) < cfg.window:
            return None
        mean_e = float(np.mean(self.entropies))
        if self.ref_entropy and mean_e < cfg.entropy_ratio * self.ref_entropy:
            return f"entropy collapse (mean {mean_e:.3f} vs source {self.ref_entropy:.3f})"
        share = Counter(self.preds).most_common(1)[0][1] / len(self.preds)
        floor = max(cfg.class_share, 3 * (self.ref_max_share or 0.0))
        if share > floor:
            return f"prediction collapse ({share:.0%} of recent predictions in one class)"
        return None
