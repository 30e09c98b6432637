"""Probation of a newly installed model: it serves, the previous model answers the same requests in shadow, and
after ``requests`` requests the new one is committed or rolled back, on the device, without the cloud.

It passes when it made no error; its median latency is within ``latency_factor`` of the previous model's (timed on
the same requests, interleaved) or slower by less than ``latency_floor_ms`` (below that, a difference of medians is
the timer's, the scheduler's and the GIL's: the same 0.03 ms model times 2x apart on shared cores); its score
distribution is not shifted from the previous model's (KS statistic of max-softmax, or of the output norm for other
tasks, at most ``max_ks``); and it agrees with the previous model on at least ``min_agreement`` of the shadowed
requests (top-1, or cosine ≥ 0.98 for other tasks).

A release made to *change* the predictions on the data devices see now (a cloud adaptation job's, ``edgekit.sync.jobs``)
says so in its manifest: ``adaptation.expected_agreement``, its top-1 agreement with its base release on the uploads
the job held out. Its probation then asks for that agreement less ``AGREEMENT_SLACK`` instead (a model that fixes a
shift disagrees with the one it fixes), and a shift of its scores fails only if they fell (less confident); a higher
confidence is what adaptation is for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgekit.agent.scores import ks_2samp, softmax

AGREEMENT_SLACK = 0.15


@dataclass
class ProbationConfig:
    requests: int = 50
    latency_factor: float = 1.5
    latency_floor_ms: float = 0.5  # a slowdown smaller than this (ms per request) is not judged
    min_agreement: float = 0.9
    max_ks: float = 0.3
    shadow_every: int = 1  # shadow one request in this many


class Probation:
    def __init__(self, cfg: ProbationConfig, previous, expected_agreement: float | None = None) -> None:
        """``previous`` is the previous model (``core.Served``) with its runtime open; ``expected_agreement`` the
        new release's declared agreement with it (an adapted release), if any."""
        self.cfg = cfg
        self.expected = expected_agreement
        self.min_agreement = cfg.min_agreement if expected_agreement is None else \
            min(cfg.min_agreement, max(0.0, float(expected_agreement) - AGREEMENT_SLACK))
        self.previous = previous
        self.seen = 0
        self.shadowed = 0
        self.agree = 0
        self.lat_new: list[float] = []
        self.lat_old: list[float] = []
        self.score_new: list[float] = []
        self.score_old: list[float] = []
        self.started = time.time()

    def summary(self) -> dict:
        return {"requests": self.seen, "of": self.cfg.requests, "shadowed": self.shadowed,
                "agreement": None if not self.shadowed else self.agree / self.shadowed,
                "previous_version": self.previous.version}

    @staticmethod
    def _score(y: np.ndarray, classifier: bool) -> np.ndarray:
        y = np.asarray(y, np.float64).reshape(len(y), -1)
        return softmax(y).max(axis=1) if classifier else np.linalg.norm(y, axis=1)

    def observe(self, feeds, out: dict, latency_ms: float, output: str, classifier: bool) -> tuple[bool, str] | None:
        """Record one request; returns (passed, detail) once the probation is decided."""
        self.seen += 1
        if self.seen % self.cfg.shadow_every == 0:
            t0 = time.perf_counter()
            try:
                old = self.previous.runtime.run(feeds)[output]
            except Exception:  # the previous model failing says nothing against the new one
                old = None
            if old is not None:
                self.lat_old.append((time.perf_counter() - t0) * 1e3)
                self.lat_new.append(latency_ms)
                new = np.asarray(out[output])
                if classifier:
                    agree = np.argmax(new.reshape(len(new), -1), 1) == np.argmax(old.reshape(len(old), -1), 1)
                else:
                    a, b = new.reshape(len(new), -1), old.reshape(len(old), -1)
                    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
                    agree = cos >= 0.98
                self.shadowed += len(agree)
                self.agree += int(agree.sum())
                self.score_new.extend(self._score(new, classifier))
                self.score_old.extend(self._score(old, classifier))
        if self.seen < self.cfg.requests:
            return None
        return self.verdict()

    def verdict(self) -> tuple[bool, str]:
        if not self.shadowed:
            return True, f"{self.seen} requests without error (the previous model could not be shadowed)"
        agreement = self.agree / self.shadowed
        new_ms, old_ms = float(np.median(self.lat_new)), float(np.median(self.lat_old))
        d, _ = ks_2samp(self.score_new, self.score_old)
        problems = []
        if new_ms > self.cfg.latency_factor * old_ms and new_ms - old_ms >= self.cfg.latency_floor_ms:
            problems.append(f"median latency {new_ms:.2f} ms vs {old_ms:.2f} ms before")
        if agreement < self.min_agreement:
            problems.append(f"agrees with the previous model on {agreement:.1%} of requests")
        less_confident = float(np.median(self.score_new)) < float(np.median(self.score_old))
        if d > self.cfg.max_ks and (self.expected is None or less_confident):
            problems.append(f"score distribution shifted (KS {d:.2f})")
        detail = (f"{self.seen} requests, agreement {agreement:.1%}, latency {new_ms:.2f} vs {old_ms:.2f} ms, "
                  f"score KS {d:.2f}")
        return (not problems), ("; ".join(problems) if problems else detail)
