"""Which samples the device uploads for cloud-side adaptation.

After "Towards Robust and Efficient Cloud-Edge Elastic Model Adaptation via Selective Entropy Distillation"
(Chen et al., ICLR 2024): a sample is worth uploading when its prediction entropy lies in a dynamic band — not
above it (unreliable: the cloud teacher learns little from noise) and not below it (uninformative: the model is
already sure) — and it is not redundant with what was recently uploaded. The band follows the running entropy
distribution (quantiles ``band`` of the last ``history`` samples), the redundancy test is the cosine similarity of
the sample's input to the last ``recent`` uploads, and everything stays within a byte budget per UTC day. The
accepted samples go to the durable queue (``state.State.enqueue``). numpy only.
"""

from __future__ import annotations

import calendar
import io
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class SelectConfig:
    budget_bytes_per_day: int = 5 << 20
    band: tuple[float, float] = (0.5, 0.9)  # entropy quantiles: accept samples between them
    history: int = 500
    warmup: int = 50  # samples considered before anything is uploaded (the band needs a distribution)
    redundancy: float = 0.98  # cosine of the input to a recent upload above which a sample is redundant
    recent: int = 64
    every: int = 8  # consider at most one request in this many (at random; the budget allows few uploads anyway)
    time_share: float | None = 0.0015  # ... and within this share of the model's run time (None: no time limit)
    feature_size: int = 1024  # inputs are compared through an evenly strided subsample of this many values


def day_of(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if t is None else t))


def next_day(day: str) -> float:
    """The time (``time.time()``) at which the UTC day after ``day`` (``YYYY-MM-DD``) starts."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d")) + 86400.0


def encode_sample(feeds: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` of the inputs, uncompressed: float inputs barely compress, and zlib would cost ~30 ms of a
    device's CPU per image-sized sample."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in feeds.items()})
    return buf.getvalue()


class Selector:
    def __init__(self, cfg: SelectConfig | None = None) -> None:
        self.cfg = cfg or SelectConfig()
        self.entropies: deque[float] = deque(maxlen=self.cfg.history)
        self._band: tuple[float, float] | None = None
        self._feats: np.ndarray | None = None  # ring of the recent uploads' normalized features
        self._filled = 0
        self._next = 0
        self.stats = {"seen": 0, "band_low": 0, "band_high": 0, "redundant": 0, "queued": 0}

    def band(self) -> tuple[float, float] | None:
        n = len(self.entropies)
        if n < self.cfg.warmup:
            return None
        if self._band is None or n % 16 == 0:  # recomputed now and then, not per sample
            lo, hi = np.quantile(np.fromiter(self.entropies, float), self.cfg.band)
            self._band = float(lo), float(hi)
        return self._band

    def _feature(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        parts = [np.asarray(v).reshape(-1) for v in feeds.values()]
        total = sum(len(p) for p in parts)
        step = max(1, total // self.cfg.feature_size)
        x = np.concatenate([p[::step] for p in parts]).astype(np.float64)[: self.cfg.feature_size]
        x = x - x.mean()
        return x / (np.linalg.norm(x) + 1e-12)

    def admit(self, entropy: float) -> bool:
        """The entropy test (cheap; the request path runs it inline): records ``entropy`` in the running
        distribution and says whether it lies in the band."""
        self.stats["seen"] += 1
        band = self.band()
        self.entropies.append(entropy)
        if band is None:
            return False
        if entropy < band[0]:
            self.stats["band_low"] += 1
            return False
        if entropy > band[1]:
            self.stats["band_high"] += 1
            return False
        return True

    def novel(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The redundancy test of an admitted sample: its feature vector when it is not too similar to a recent
        upload (pass it to ``accepted`` once the sample is queued), else None."""
        x = self._feature(feeds)
        if self._filled and (self._feats.shape[1] != len(x) or
                             float(np.max(self._feats[: self._filled] @ x)) > self.cfg.redundancy):
            if self._feats.shape[1] == len(x):
                self.stats["redundant"] += 1
                return None
            self._feats, self._filled, self._next = None, 0, 0  # a model with another input: start over
        return x

    def consider(self, feeds: Mapping[str, np.ndarray], entropy: float) -> np.ndarray | None:
        """Whether to upload this sample (one sample): its feature vector when it should be queued (pass it to
        ``accepted`` once it is), else None."""
        return self.novel(feeds) if self.admit(float(entropy)) else None

    def accepted(self, feature: np.ndarray) -> None:
        if self._feats is None:
            self._feats = np.zeros((self.cfg.recent, len(feature)))
        self._feats[self._next] = feature
        self._next = (self._next + 1) % self.cfg.recent
        self._filled = min(self._filled + 1, self.cfg.recent)
        self.stats["queued"] += 1
