"""edgekit.selection: a joint plan replaces the bits-only plan only on significant evidence, and a plan is measured
once."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.analyze import distortion, sample_distortions
from edgekit.plan import LayerChoice, Plan
from edgekit.selection import Measurements, choose, plan_key, significantly_better


def test_sample_distortions_average_to_the_distortion():
    rng = np.random.default_rng(0)
    ref, out = rng.normal(size=(12, 10)), rng.normal(size=(12, 10))
    for metric in ("kl", "mse"):
        per = sample_distortions(ref, out, metric)
        assert per.shape == (12,) and np.all(per >= 0)
        assert np.isclose(per.mean(), distortion(ref, out, metric), rtol=1e-12)
    same = sample_distortions(ref, ref, "kl")
    assert np.allclose(same, 0.0, atol=1e-12)


def test_significance_needs_a_consistent_paired_win():
    base = np.linspace(0.1, 0.3, 16)
    assert significantly_better(base - 0.05, base)  # lower on every sample by the same amount: SE 0
    assert not significantly_better(base, base)
    assert not significantly_better(base + 0.01, base)
    noisy = base + np.resize([0.2, -0.2], 16) - 0.01  # lower on average, but within its noise
    assert noisy.mean() < base.mean() and not significantly_better(noisy, base)
    assert not significantly_better(np.array([0.0]), np.array([1.0]))  # one sample proves nothing
    with pytest.raises(ValueError):
        significantly_better(np.zeros(3), np.zeros(4))


def _cand(samples, simple, name):
    return {"samples": np.asarray(samples, float), "simple": simple, "name": name}


def test_choose_keeps_the_simple_plan_unless_the_joint_one_is_clearly_better():
    base = np.linspace(0.1, 0.3, 16)
    bits = [_cand(base, True, "bits"), _cand(base + 0.1, True, "uniform")]
    slightly = _cand(base + np.resize([0.1, -0.1], 16) - 0.02, False, "joint")  # lower mean, within the noise
    kept, why = choose([*bits, slightly])
    assert kept["name"] == "bits" and "not lower" in why
    clearly = _cand(base * 0.5, False, "joint")
    kept, why = choose([*bits, clearly])
    assert kept["name"] == "joint" and "standard errors" in why
    kept, why = choose([_cand(base + 1, False, "j1"), _cand(base, False, "j2")])  # nothing simple met
    assert kept["name"] == "j2" and "only plans of the joint space" in why
    kept, _ = choose(bits)
    assert kept["name"] == "bits"
    with pytest.raises(ValueError):
        choose([])


def test_plan_key_ignores_reasons():
    a = Plan("sha", "cpu-x86", "mixed", (LayerChoice("l1", "w8a8", "because"), LayerChoice("l2", "fp32")))
    b = Plan("sha", "cpu-x86", "mixed", (LayerChoice("l1", "w8a8", "other"), LayerChoice("l2", "fp32", "x")))
    c = Plan("sha", "cpu-x86", "mixed", (LayerChoice("l1", "w8a8"), LayerChoice("l2", "w8a8")))
    assert plan_key(a) == plan_key(b) != plan_key(c)
    m = Measurements()
    assert m.ratio(plan_key(a)) is None and m.wants_ratio(plan_key(a))
    for r in (0.5, 0.9, 0.4):
        m.add_ratio(plan_key(a), r)
    assert m.ratio(plan_key(b)) == 0.5 and m.ratio(plan_key(c)) is None  # the median of the timings so far


def test_measurements_pool_a_bounded_number_of_timings():
    from edgekit.selection import MAX_RATIO_SAMPLES

    m = Measurements()
    key = (("l1", "w8a8"),)
    for i in range(MAX_RATIO_SAMPLES):
        assert m.wants_ratio(key)
        m.add_ratio(key, 0.3 + 0.1 * i)
    assert not m.wants_ratio(key)
    assert np.isclose(m.ratio(key), np.median([0.3 + 0.1 * i for i in range(MAX_RATIO_SAMPLES)]))
