"""benchmarks/joint_space.py: the front and per-budget comparisons (which decide the issue's goal), and one quick run
on the digits CNN through the real allocator, builds and interleaved timing."""

from __future__ import annotations

import json

import pytest

from tests.bench_scripts import load_benchmark


def _load():
    return load_benchmark("joint_space")


def test_front_keeps_the_best_fidelity_at_each_cost():
    bench = _load()
    assert bench.front([(0.5, 0.9), (0.4, 0.8), (0.6, 0.85), (0.7, 0.95)]) == [(0.4, 0.8), (0.5, 0.9), (0.7, 0.95)]
    assert bench.best_at([(0.4, 0.8), (0.5, 0.9)], 0.45) == 0.8 and bench.best_at([(0.4, 0.8)], 0.3) is None


def test_compare_fronts_finds_where_the_joint_space_is_worse_and_better():
    bench = _load()
    bits = [(0.5, 0.90), (0.7, 0.95)]
    same = bench.compare_fronts(bits, bits, xtol=0.0)
    assert same["at_least_as_good"] and not same["strictly_better_somewhere"]
    better = bench.compare_fronts(bits, [(0.4, 0.9), (0.7, 0.97)], xtol=0.0)
    assert better["at_least_as_good"] and better["strictly_better_somewhere"]
    worse = bench.compare_fronts(bits, [(0.5, 0.80), (0.7, 0.97)], xtol=0.0)
    assert not worse["at_least_as_good"] and worse["joint_worse_at"][0]["x"] == 0.5
    within = bench.compare_fronts(bits, [(0.52, 0.90), (0.7, 0.95)], xtol=0.05)  # 4 % slower: timing noise
    assert within["at_least_as_good"]


def test_fidelity_differences_within_sampling_noise_are_ties():
    """One flipped sample of 128 is no evidence either way (paired test, as the allocator's); twenty are."""
    bench = _load()
    n = 128
    samples = {"b": [1.0] * n, "one": [1.0] * (n - 1) + [0.0], "twenty": [1.0] * (n - 20) + [0.0] * 20}
    bits = [(0.5, 1.0, "b")]
    one = [(0.5, 1 - 1 / n, "one")]
    assert bench.compare_fronts(bits, one, xtol=0.0, samples=samples)["at_least_as_good"]
    assert not bench.compare_fronts(bits, one, xtol=0.0)["at_least_as_good"]  # the strict comparison
    twenty = bench.compare_fronts(bits, [(0.5, 1 - 20 / n, "twenty")], xtol=0.0, samples=samples)
    assert not twenty["at_least_as_good"] and twenty["joint_worse_at"] == [{"x": 0.5, "bits": 1.0, "joint": 0.8438,
                                                                          "name": "b"}]
    up = bench.compare_fronts(one, bits, xtol=0.0, samples=samples)  # nor is one sample a strict improvement
    assert up["at_least_as_good"] and not up["strictly_better_somewhere"]
    assert bench.compare_fronts(one, bits, xtol=0.0)["strictly_better_somewhere"]
    # a point without per-sample values is compared strictly
    assert not bench.compare_fronts(bits, [(0.5, 1 - 1 / n, "unknown")], xtol=0.0, samples=samples)["at_least_as_good"]


def _rec(space, budget, size, lat, top1):
    return {"notes": {"space": space, "budget": budget}, "size_bytes": size, "top1_agreement": top1,
            "latency_paired": {"ratio_vs_fp32": lat}}


def test_compare_budgets_judges_each_budget_as_measured():
    bench = _load()
    results = {"fp32": {"size_bytes": 1000},
               "b1": _rec("bits", "size=300B", 290, 0.9, 0.95), "j1": _rec("joint", "size=300B", 280, 0.8, 0.96),
               "b2": _rec("bits", "latency=0.5x", 500, 0.6, 0.9), "j2": _rec("joint", "latency=0.5x", 400, 0.51, 0.8),
               "b3": _rec("bits", "size=100B", 150, 0.9, 0.9), "j3": _rec("joint", "size=100B", 99, 0.9, 0.7)}
    cmp = bench.compare_budgets(results, True)
    # more faithful; meets a latency (within 5 %) and a size that the bits-only plans miss
    assert cmp["joint_better_at"] == ["size=300B", "latency=0.5x", "size=100B"]
    assert cmp["joint_worse_at"] == [] and cmp["at_least_as_good"] and cmp["strictly_better_somewhere"]
    results["j1"] = _rec("joint", "size=300B", 310, 0.8, 0.99)  # over the budget the bits plan meets
    assert bench.compare_budgets(results, True)["joint_worse_at"] == ["size=300B"]
    # 0.94 against 0.95 on 100 samples: one flipped sample is worse strictly, a tie beyond noise
    results["j1"] = _rec("joint", "size=300B", 280, 0.8, 0.94)
    samples = {"b1": [1.0] * 95 + [0.0] * 5, "j1": [1.0] * 94 + [0.0] * 6}
    assert bench.compare_budgets(results, True)["joint_worse_at"] == ["size=300B"]
    noisy = bench.compare_budgets(results, True, samples=samples)
    assert noisy["joint_worse_at"] == [] and "size=300B" not in noisy["joint_better_at"]
    samples["j1"] = [1.0] * 75 + [0.0] * 25  # twenty more misses: worse beyond noise
    results["j1"] = _rec("joint", "size=300B", 280, 0.8, 0.75)
    assert bench.compare_budgets(results, True, samples=samples)["joint_worse_at"] == ["size=300B"]


def test_a_bits_point_the_joint_size_front_misses_on_the_grid_is_asked_again_at_its_exact_size():
    """The joint plan for size=300B weighs 290 B and the bits-only one 250 B: no joint point at 250 B on the grid,
    so the allocator is asked for size=250B; a point the joint front covers asks nothing, nor does a budget asked
    before. Follow-up plans count in the fronts, not in the grid-only ones."""
    bench = _load()

    def rec(space, budget, size, top1, **notes):
        return {"notes": {"space": space, "budget": budget, **notes}, "size_bytes": size,
                "size_ratio_vs_fp32": size / 1000, "top1_agreement": top1}

    results = {"fp32": {"name": "fp32", "size_bytes": 1000, "size_ratio_vs_fp32": 1.0, "top1_agreement": 1.0},
               "bits a": rec("bits", "size=300B", 250, 0.99), "joint a": rec("joint", "size=300B", 290, 1.0),
               "bits b": rec("bits", "size=500B", 480, 1.0), "joint b": rec("joint", "size=500B", 470, 1.0)}
    assert bench.follow_up_specs(results, True, {}, ["size=300B", "size=500B"]) == ["size=250B"]
    assert bench.follow_up_specs(results, True, {}, ["size=250B"]) == []
    results["joint c"] = rec("joint", "size=250B", 250, 0.995, follow_up=True)
    assert bench.follow_up_specs(results, True, {}, []) == []
    pts = bench.front_points(results, True)
    grid = bench.front_points(results, True, grid_only=True)
    assert (0.25, 0.995, "joint c") in pts["joint"]["size"] and (0.25, 0.995, "joint c") not in grid["joint"]["size"]
    assert (1.0, 1.0, "fp32") in pts["bits"]["size"] and (1.0, 1.0, "fp32") in pts["joint"]["size"]  # an anchor
    assert bench.compare_fronts(pts["bits"]["size"], pts["joint"]["size"], xtol=0.0)["at_least_as_good"]
    assert not bench.compare_fronts(grid["bits"]["size"], grid["joint"]["size"], xtol=0.0)["at_least_as_good"]


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["cpu-x86", "cpu-x86-edgekit"])
def test_quick_run_on_digits(tmp_path, capsys, target):
    bench = _load()
    out = tmp_path / "joint.json"
    bench.main(["--model", "digits", "--quick", "--rounds", "2", "--per-round", "5", "--json", str(out), "--svg",
                str(tmp_path / "plot"), "--target", target])
    res = json.loads(out.read_text())["results"]["digits"]
    assert res["target"] == target
    spaces = {rec["notes"].get("space") for rec in res["variants"].values() if rec.get("notes")}
    assert {"bits", "joint"} <= spaces
    assert res["by_budget"]["budgets"] and set(res["fronts"]) == {"latency", "size"}
    assert "strict" in res["by_budget"] and all("strict" in f and "grid_only" in f for f in res["fronts"].values())
    assert isinstance(res["follow_up_budgets"], list)
    assert "uniform int8" in res["variants"]  # an anchor of both fronts
    for rec in res["variants"].values():  # per-sample agreement for the paired comparisons
        if rec.get("notes", {}).get("space"):
            assert len(rec["per_sample"]) == 360 and abs(sum(rec["per_sample"]) / 360 - rec["top1_agreement"]) < 1e-9
    timed = {n: r["latency_paired"] for n, r in res["variants"].items() if "latency_paired" in r}
    assert timed and all(t["blocks"] == 2 for t in timed.values())
    for t in timed.values():  # identical files are timed once: one ratio for all of them
        assert all(timed[other]["ratio_vs_fp32"] == t["ratio_vs_fp32"] for other in t["same_file_as"])
    assert (tmp_path / "plot_digits_size.svg").read_text().startswith("<svg")
    assert "## digits" in capsys.readouterr().out


def test_issue_verdicts_report_every_pruning_check():
    bench = _load()

    def rec(ratio, verified):
        return {"latency_paired": {"ratio_vs_fp32": ratio},
                "notes": {"pruned_layers": 3, "verified": verified, "verification": "PASS" if verified else "FAIL"}}

    results = {"uniform int8": {"latency_paired": {"ratio_vs_fp32": 0.5}},
               "pruned fp32 for 1.3x": rec(0.8, False), "pruned int8 for 1.3x": rec(0.25, False),
               "pruned fp32 channels+blocks for 1.3x": rec(0.75, True)}
    checks = bench._issue_verdicts(results)
    assert checks["prune_fp32_speedup"] == 1.25 and checks["prune_int8_speedup_vs_uniform_int8"] == 2.0
    assert checks["prune_fp32 channels+blocks_speedup"] == 1.333
    assert checks["prune_fp32 channels+blocks_verified"] is True and checks["prune_fp32_verified"] is False
    assert [label for label, *_ in bench.PRUNING_CHECKS] == ["fp32", "int8", "fp32 channels+blocks"]
    assert bench.PRUNING_CHECKS[2][3] == {"prune", "drop"}
