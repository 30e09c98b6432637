"""Choosing among plans that met a budget as measured, and remembering what was measured.

An allocator ends with a few plans that met the budget in its measurement (uniform INT8, the rounds of the bits-only
space, the rounds of the joint space), each scored on the same held-out calibration samples. Picking the lowest mean
distortion among them treats noise as signal twice over:

- the held-out samples are few (16 on the built-in photos), so two plans' means differ by chance;
- a structural plan's score is optimistic: its pruned layers were refit on other crops *of the same pictures*, so it
  generalizes across crops, not to new pictures (``benchmarks/RESULTS.md``, issue 6).

So ``choose`` keeps the best *simple* plan (precision only, from the bits-only rounds or uniform INT8) unless a
*complex* one (any plan of the joint space's own rounds) beats it on the same samples by more than ``Z`` standard
errors of the paired difference. The joint space then changes a plan only where the evidence says it is better, or
where nothing simple meets the budget: the joint space's result is the bits-only result wherever that one suffices.

``Measurements`` keeps latency ratios and per-sample distortions by plan options: a plan that several budgets arrive
at is scored once, and its timings are pooled (the median of one per allocation, up to ``MAX_RATIO_SAMPLES``), so the
run's drift does not let one lucky timing decide every budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Z = 2.0  # standard errors of the paired per-sample difference a complex plan must win by
MAX_RATIO_SAMPLES = 5  # timings of one plan pooled (one per allocation that reaches it)


def plan_key(plan) -> tuple[tuple[str, str], ...]:
    """A plan's identity for measurements: its (layer, option) pairs (reasons and notes aside)."""
    return tuple((c.layer, c.option) for c in plan.layers)


@dataclass
class Measurements:
    """Measured latency ratios (plan / FP32, a few samples each, taken by separate allocations so they spread over
    the run) and per-sample distortions (deterministic: scored once), by ``plan_key``. On shared cores one timing of
    a plan drifts by up to 1.8x between minutes (uniform INT8 EfficientNet-Lite0 measured 0.34-0.62x FP32 within one
    run), so a plan's ratio is the median of up to ``MAX_RATIO_SAMPLES`` timings."""

    ratios: dict[tuple, list[float]] = field(default_factory=dict)
    samples: dict[tuple, np.ndarray] = field(default_factory=dict)

    def ratio(self, key: tuple) -> float | None:
        """The median of a plan's timings, None if it was never timed."""
        got = self.ratios.get(key)
        return float(np.median(got)) if got else None

    def wants_ratio(self, key: tuple) -> bool:
        return len(self.ratios.get(key, ())) < MAX_RATIO_SAMPLES

    def add_ratio(self, key: tuple, ratio: float) -> None:
        self.ratios.setdefault(key, []).append(float(ratio))


def significantly_better(a: np.ndarray, b: np.ndarray, z: float = Z) -> bool:
    """Whether per-sample distortions ``a`` are lower than ``b`` (the same samples, in the same order) by more than
    ``z`` standard errors of the mean paired difference. Fewer than two samples prove nothing."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} and {b.shape}")
    d = b - a
    if d.size < 2:
        return False
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return float(d.mean()) > z * se and float(d.mean()) > 0.0


def choose(candidates: list[dict], z: float = Z) -> tuple[dict, str]:
    """The kept candidate among those that met the budget, and why. Each candidate has ``samples`` (per-sample
    distortions on the shared held-out samples) and ``simple`` (bool). The simple one of least mean distortion,
    unless the complex one of least mean distortion is ``significantly_better``; a complex one when none is simple."""
    if not candidates:
        raise ValueError("choose needs at least one candidate")

    def mean(x: dict) -> float:
        return float(np.mean(x["samples"]))

    simple = [x for x in candidates if x["simple"]]
    complex_ = [x for x in candidates if not x["simple"]]
    if not simple:
        return min(complex_, key=mean), "only plans of the joint space met the budget"
    best = min(simple, key=mean)
    if not complex_:
        return best, "least measured distortion"
    rival = min(complex_, key=mean)
    if significantly_better(rival["samples"], best["samples"], z):
        return rival, f"joint plan better than the bits-only plan by more than {z:g} standard errors"
    return best, (f"bits-only plan kept: the joint plan's distortion ({mean(rival):.4g} against {mean(best):.4g}) "
                  f"is not lower by {z:g} standard errors on {len(best['samples'])} held-out samples")
