"""benchmarks/structure_probe.py: its arithmetic (the EfficientNet run is the benchmark's)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench_scripts import load_benchmark


def test_top1_optimism_and_drop_parsing():
    bench = load_benchmark("structure_probe")
    ref = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    out = np.array([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.4, 0.0]])
    assert bench.top1(ref, out) == 0.75
    rows = {"drop a": {"held_out": {"mse": 0.01}, "evaluation": {"mse": 0.05}},
            "g@8": {"held_out": {"mse": 0.0}, "evaluation": {"mse": 0.002}}}
    assert bench.optimism(rows) == {"drop a": 5.0, "g@8": 2e6}
    assert bench.parse_drops("14+4, 10,,") == [["14", "4"], ["10"]]
    with pytest.raises(SystemExit, match="block numbers"):
        bench.parse_drops("14+x")


def test_spearman_matches_the_textbook_values_with_ties():
    bench = load_benchmark("structure_probe")
    assert bench.ranks([3.0, 1.0, 2.0, 1.0]).tolist() == [3.0, 0.5, 2.0, 0.5]
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) without ties: d = (0, -2, 1, 1, 0) -> 1 - 6 * 6 / 120 = 0.7
    assert bench.spearman([1, 2, 3, 4, 5], [1, 4, 2, 3, 5]) == pytest.approx(0.7)
    assert bench.spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_pair_scores_are_the_allocators_distortions_and_top1():
    from edgekit.analyze import distortion

    bench = load_benchmark("structure_probe")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 10))
    out = ref + rng.normal(scale=0.5, size=(8, 10))
    got = bench.pair_scores(ref, out)
    assert got["mse"] == pytest.approx(distortion(ref, out, "mse"), abs=1e-5)
    assert got["kl"] == pytest.approx(distortion(ref, out, "kl"), abs=1e-5) and got["kl"] > 0
    assert got["top1"] == bench.top1(ref, out)
    assert bench.pair_scores(ref, ref) == {"mse": 0.0, "kl": 0.0, "top1": 1.0}
