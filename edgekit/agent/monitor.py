"""What the agent watches: latency percentiles, per-sample scores, and drift against the bundle's reference sketch.

Drift is a two-sample Kolmogorov–Smirnov test of each score over the last ``window`` samples against the
reference values the build measured on held-out data (``sketch.json``). An alarm turns on after ``on_checks``
consecutive checks below ``p_on`` and off after ``off_checks`` consecutive checks above ``p_off`` (hysteresis: a
borderline stream does not flap). numpy only.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.agent.scores import ks_2samp

SKETCH_FILE = "sketch.json"
SKETCH_SCHEMA = 1


@dataclass
class MonitorConfig:
    latency_window: int = 2048
    window: int = 100  # samples per drift check
    check_every: int = 50
    p_on: float = 1e-3
    p_off: float = 0.05
    on_checks: int = 2
    off_checks: int = 3
    # the requests the monitor watches (scores, input statistics, NaN counts): at most one in `every`, and within
    # `time_share` of the model's run time (edgekit.agent.sampler; None: every request in `every`)
    every: int = 1
    time_share: float | None = 0.003


@dataclass(frozen=True)
class Sketch:
    """The build's reference: per score, sorted reference values (or quantiles), and the prediction histogram."""

    scores: dict[str, list[float]]
    samples: int
    classes: list[float] | None  # share of each predicted class on the reference data
    task: str | None
    feature: str | None = None  # the classifier's input tensor (penultimate features), for LAME

    @classmethod
    def load(cls, path: Path) -> Sketch:
        doc = json.loads(Path(path).read_text())
        if doc.get("schema_version", 0) > SKETCH_SCHEMA:
            raise ValueError(f"{path}: sketch schema {doc.get('schema_version')} is newer than this agent's")
        return cls(scores=doc["scores"], samples=int(doc["samples"]), classes=doc.get("classes"),
                   task=doc.get("task"), feature=doc.get("feature"))

    def median(self, score: str) -> float | None:
        vals = self.scores.get(score)
        return float(np.median(vals)) if vals else None


class Alarm:
    """On/off with hysteresis over a stream of p-values."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg, self.on, self._run = cfg, False, 0
        self.last_p: float | None = None
        self.last_d: float | None = None

    def update(self, d: float, p: float) -> bool:
        self.last_d, self.last_p = d, p
        crossing = p < self.cfg.p_on if not self.on else p > self.cfg.p_off
        self._run = self._run + 1 if crossing else 0
        if self._run >= (self.cfg.on_checks if not self.on else self.cfg.off_checks):
            self.on, self._run = not self.on, 0
        return self.on


class Monitor:
    def __init__(self, sketch: Sketch | None, cfg: MonitorConfig | None = None) -> None:
        self.cfg = cfg or MonitorConfig()
        self.sketch = sketch
        self.latency: deque[float] = deque(maxlen=self.cfg.latency_window)
        self.recent: dict[str, deque[float]] = {}
        self.alarms: dict[str, Alarm] = {}
        self.seen = 0
        self.alarm_changes = 0
        self.drifting = False  # any alarm on (kept as an attribute: the request path reads it)

    def reset(self, sketch: Sketch | None) -> None:
        """A new model: new reference, fresh windows."""
        self.__init__(sketch, self.cfg)

    def observe(self, latency_ms: float, scores: Mapping[str, np.ndarray]) -> None:
        self.latency.append(float(latency_ms))
        self.observe_scores(scores)

    def observe_scores(self, scores: Mapping[str, np.ndarray]) -> None:
        """Per-sample scores of one or more samples (each value an array with one entry per sample)."""
        n = 0
        for name, values in scores.items():
            dq = self.recent.setdefault(name, deque(maxlen=self.cfg.window))
            vals = np.atleast_1d(np.asarray(values, np.float64))
            dq.extend(vals[np.isfinite(vals)].tolist())
            n = max(n, len(vals))  # sampled features (input spread) have fewer values than the others
        before = self.seen
        self.seen += n
        if self.sketch is not None and self.seen // self.cfg.check_every != before // self.cfg.check_every:
            self._check()

    def _check(self) -> None:
        for name, ref in self.sketch.scores.items():
            recent = self.recent.get(name)
            if not ref or recent is None or len(recent) < self.cfg.window:
                continue
            d, p = ks_2samp(np.fromiter(recent, float), np.asarray(ref))
            alarm = self.alarms.setdefault(name, Alarm(self.cfg))
            was = alarm.on
            if alarm.update(d, p) != was:
                self.alarm_changes += 1
        self.drifting = any(a.on for a in self.alarms.values())

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latency:
            return {"p50": None, "p90": None, "p99": None}
        arr = np.fromiter(self.latency, float)
        return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}

    def drift(self) -> dict[str, dict]:
        return {name: {"alarm": a.on, "ks": a.last_d, "p": a.last_p} for name, a in sorted(self.alarms.items())}
