"""benchmarks/agent.py's timing and goal check, on stand-in functions (no model, no build)."""

from __future__ import annotations

import time

import numpy as np

from tests.bench_scripts import load_benchmark


def _load():
    return load_benchmark("agent")


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_interleaved_walks_the_stream_and_ratios_the_baseline():
    bench = _load()
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(5)]
    seen: dict[str, list[int]] = {"raw": [], "slow": []}

    def raw(f):
        seen["raw"].append(int(f["x"][0, 0]))
        _busy(0.5)

    def slow(f):
        seen["slow"].append(int(f["x"][0, 0]))
        _busy(1.0)

    res = bench.interleaved({"raw": raw, "slow": slow}, feeds, rounds=3, per_round=4, warmup=2,
                            inner={"slow": lambda: 0.5})  # half of slow's call is "inside the model"
    # each walks the same stream in order: 2 warm-up calls, then per round 2 settling calls and 4 timed ones
    assert seen["raw"] == seen["slow"] == [i % 5 for i in range(2 + 3 * (2 + 4))]
    v = res["variants"]
    assert v["raw"]["ratio_median"] == 1.0 and v["raw"]["calls"] == 12
    assert 1.5 < v["slow"]["ratio_median"] < 2.6 and len(v["slow"]["rounds"]) == 3
    assert len(res["foreign_cpu_share"]) == 3
    assert 0.3 < v["slow"]["outside_median_ms"] < 1.0 and 1.5 < v["slow"]["direct_median"] < 2.6
    assert "direct_median" not in v["raw"]


def test_goal_is_on_the_default_agent_same_session_and_direct_overhead():
    bench = _load()

    def result(amortized, median, direct=1.01):
        return {"efficientnet-lite0": {"variants": {"agent": {"direct_mean": direct}},
                                       "paired": {"agent": {"overhead_amortized": amortized,
                                                            "overhead_round_median": median}}}}

    assert bench.check_goal(result(1.02, 1.029)) == []
    assert len(bench.check_goal(result(1.05, 1.01))) == 1
    assert len(bench.check_goal(result(1.02, 1.01, 1.04))) == 1
    assert len(bench.check_goal(result(1.05, 1.30))) == 2
    assert bench.check_goal({"digits-cnn": {}}) == []


class _StandIn:
    """An "agent" whose infer costs ``extra_ms`` on top of its "session" (``model.runtime.run``)."""

    def __init__(self, extra_ms: float) -> None:
        self.extra_ms = extra_ms
        self.calls = {"infer": 0, "run": 0}
        self.model = self
        self.runtime = self

    def run(self, feeds):
        self.calls["run"] += 1
        _busy(0.4)

    def infer(self, feeds):
        self.calls["infer"] += 1
        _busy(0.4 + self.extra_ms)


def test_paired_compares_each_agent_with_its_own_session():
    bench = _load()
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(3)]
    free, costly = _StandIn(0.0), _StandIn(0.2)
    res = bench.paired({"free": free, "costly": costly}, feeds, rounds=20, block=3, settle=1)
    assert free.calls == costly.calls == {"infer": 20 * 4, "run": 20 * 4}
    assert abs(res["free"]["overhead_amortized"] - 1) < 0.1
    lo, hi = res["costly"]["overhead_amortized_ci95"]
    assert 1.3 < res["costly"]["overhead_amortized"] < 1.7 and lo <= res["costly"]["overhead_amortized"] <= hi
    assert 1.3 < res["costly"]["overhead_round_median"] < 1.7
