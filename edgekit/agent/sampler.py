"""Which requests run an optional per-request task (the input's spread statistics, the upload selection).

Such a task costs little on a small input and a lot on a large one: right after a model run the input and numpy's
code are out of the caches, and one pass of numpy over a 224x224 image costs 70-180 µs there (measured,
``benchmarks/RESULTS.md``), which is 3-7 % of EfficientNet-Lite0's run. A ``Sampler`` runs the task on a random
share of the requests, at most one in ``every``, and no more often than keeps its measured cost within
``time_share`` of the model's run time (``None``: no time limit). The cost is the median of the task's recent
timings, so one slow first call (imports, cold code) does not starve it. Random, seeded: periodic streams are not
aliased, and runs are reproducible.
"""

from __future__ import annotations

import random
import statistics
from collections import deque

FLOOR = 1 / 64  # the task still runs on at least this share of the requests (small models: the KS windows fill)


class Sampler:
    def __init__(self, every: int, time_share: float | None, seed: int = 0) -> None:
        self.max_p = 1.0 / max(1, int(every))
        self.p = self.max_p
        self.time_share = time_share
        self.floor = min(FLOOR, self.max_p)
        self._rng = random.Random(seed)
        self._costs: deque[float] = deque(maxlen=16)
        self._latencies: deque[float] = deque(maxlen=16)
        self.runs = 0

    def due(self) -> bool:
        """Whether this request runs the task."""
        return self.p >= 1.0 or self._rng.random() < self.p

    def ran(self, cost_s: float, latency_s: float) -> None:
        """The task ran, taking ``cost_s``, on a request whose model run took ``latency_s``."""
        self.runs += 1
        if self.time_share is None:
            return
        self._costs.append(cost_s)
        self._latencies.append(latency_s)
        cost = statistics.median(self._costs)
        latency = statistics.median(self._latencies)
        self.p = max(self.floor, min(self.max_p, self.time_share * latency / max(cost, 1e-9)))
