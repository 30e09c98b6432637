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
    warmup: int = 50  # samples seen before anything is uploaded (the band needs a distribution)
    redundancy: float = 0.98  # cosine of the input to a recent upload above which a sample is redundant
    recent: int = 64


def day_of(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if t is None else t))


def encode_sample(feeds: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in feeds.items()})
    return buf.getvalue()


class Selector:
    def __init__(self, cfg: SelectConfig | None = None) -> None:
        self.cfg = cfg or SelectConfig()
        self.entropies: deque[float] = deque(maxlen=self.cfg.history)
        self.uploaded: deque[np.ndarray] = deque(maxlen=self.cfg.recent)
        self.stats = {"seen": 0, "band_low": 0, "band_high": 0, "redundant": 0, "over_budget": 0, "queued": 0}

    def band(self) -> tuple[float, float] | None:
        if len(self.entropies) < self.cfg.warmup:
            return None
        lo, hi = np.quantile(np.fromiter(self.entropies, float), self.cfg.band)
        return float(lo), float(hi)

    def consider(self, feeds: Mapping[str, np.ndarray], entropy: float) -> np.ndarray | None:
        """Whether to upload this sample (one sample): returns its normalized feature vector when it should be
        queued (pass it to ``accepted`` once it is), else None."""
        self.stats["seen"] += 1
        band = self.band()
        self.entropies.append(float(entropy))
        if band is None:
            return None
        if entropy < band[0]:
            self.stats["band_low"] += 1
            return None
        if entropy > band[1]:
            self.stats["band_high"] += 1
            return None
        x = np.concatenate([np.asarray(v, np.float64).ravel() for v in feeds.values()])
        x = x - x.mean()
        x = x / (np.linalg.norm(x) + 1e-12)
        if self.uploaded and float(np.max(np.stack(self.uploaded) @ x)) > self.cfg.redundancy:
            self.stats["redundant"] += 1
            return None
        return x

    def over_budget(self) -> None:
        self.stats["over_budget"] += 1

    def accepted(self, feature: np.ndarray) -> None:
        self.uploaded.append(feature)
        self.stats["queued"] += 1
