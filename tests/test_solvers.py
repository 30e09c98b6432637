"""The per-layer allocation solvers against brute force on random small problems, and their budget guarantees."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from edgekit.errors import ConfigError
from edgekit.solvers import Problem, Solution, brute_force, solve, solve_dp, solve_evo, solve_ilp
from edgekit.tables import Budget, CostEntry, CostTable, SensitivityTable

OPTIONS = ("fp32", "w8a8", "w4g128", "w2")
REL = 1e-9


def random_problem(rng: np.random.Generator, *, n_layers: int | None = None, kinds: str | None = None,
                   slack: float | None = None, n_options: int | None = None) -> Problem:
    """2–7 layers, 2–4 options (fp32 always first), random distortion/bytes/latency, and a random budget over the
    constraints named in ``kinds`` (a subset of "sla": size, latency, avg-bits), sometimes infeasible."""
    n = n_layers or int(rng.integers(2, 8))
    layers = tuple(f"l{i}" for i in range(n))
    opts, dist, size, lat, params = {}, {}, {}, {}, {}
    for l in layers:
        k = n_options or int(rng.integers(2, 5))
        os_ = OPTIONS[:k]
        params[l] = int(rng.integers(10, 200))
        opts[l] = os_
        dist[l] = {o: 0.0 if o == "fp32" else float(rng.exponential(1.0)) for o in os_}
        size[l] = {o: 4 * params[l] if o == "fp32" else int(rng.integers(1, 4 * params[l])) for o in os_}
        base = float(rng.uniform(0.1, 2.0))
        lat[l] = {o: base if o == "fp32" else base * float(rng.uniform(0.3, 1.3)) for o in os_}
    p = Problem(layers, opts, dist, size, lat, params, Budget())
    kinds = kinds if kinds is not None else "".join(c for c in "sla" if rng.random() < 0.6)
    lo_b, hi_b = sum(min(size[l].values()) for l in layers), sum(max(size[l].values()) for l in layers)
    lo_t, hi_t = sum(min(lat[l].values()) for l in layers), sum(max(lat[l].values()) for l in layers)

    def frac() -> float:
        return float(rng.uniform(-0.1, 1.0)) if slack is None else slack

    total = sum(params.values())
    budget = Budget(
        size_bytes=int(lo_b + frac() * (hi_b - lo_b)) if "s" in kinds else None,
        latency_ms=lo_t + frac() * (hi_t - lo_t) if "l" in kinds else None,
        avg_bits=8 * (lo_b + frac() * (hi_b - lo_b)) / total if "a" in kinds else None,
    )
    return replace(p, budget=budget)


def optimum(p: Problem) -> Solution | None:
    try:
        return brute_force(p)
    except ConfigError:
        return None


def assert_ok(sol: Solution, p: Problem) -> None:
    assert sol.satisfies(p.budget, p.params), (sol, p.budget)
    assert set(sol.choice) == set(p.layers) and all(sol.choice[l] in p.options[l] for l in p.layers)
    assert sol.reasons.keys() == set(p.layers) and all(sol.reasons[l].startswith(sol.choice[l]) for l in p.layers)
    # the reported totals are the totals of the choice
    assert sol.bytes == sum(p.bytes[l][o] for l, o in sol.choice.items())
    assert math.isclose(sol.distortion, sum(p.distortion[l][o] for l, o in sol.choice.items()), rel_tol=1e-12)


def feasible(p: Problem, choice: dict[str, str]) -> bool:
    b = sum(p.bytes[l][o] for l, o in choice.items())
    sol = Solution(choice, 0.0, b, math.fsum(p.latency[l][o] for l, o in choice.items()), 0.0, "", {})
    return sol.satisfies(p.budget, p.params)


def close(a: float, b: float) -> bool:
    return a <= b * (1 + REL) + 1e-12 and b <= a * (1 + REL) + 1e-12


def test_brute_force_by_hand():
    p = Problem(("a", "b"), {"a": ("fp32", "w8a8"), "b": ("fp32", "w8a8")},
                {"a": {"fp32": 0.0, "w8a8": 0.1}, "b": {"fp32": 0.0, "w8a8": 0.3}},
                {"a": {"fp32": 400, "w8a8": 100}, "b": {"fp32": 400, "w8a8": 100}},
                {"a": {"fp32": 1.0, "w8a8": 0.5}, "b": {"fp32": 1.0, "w8a8": 0.5}},
                {"a": 100, "b": 100}, Budget(size_bytes=500))
    sol = brute_force(p)
    assert sol.choice == {"a": "w8a8", "b": "fp32"} and sol.bytes == 500 and sol.distortion == pytest.approx(0.1)
    assert sol.avg_bits == pytest.approx(20.0) and sol.latency_ms == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="budget infeasible: size<=199B for the weighted layers, but the smallest "
                                          "possible is 200 B"):
        brute_force(replace(p, budget=Budget(size_bytes=199)))


@pytest.mark.parametrize("seed", range(150))
def test_ilp_equals_brute_force(seed):
    p = random_problem(np.random.default_rng(seed))
    best = optimum(p)
    if best is None:
        with pytest.raises(ConfigError, match="budget infeasible"):
            solve_ilp(p)
        return
    sol = solve_ilp(p)
    assert_ok(sol, p)
    assert close(sol.distortion, best.distortion), (sol.choice, best.choice)


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("kind", ["s", "a"])
def test_dp_exact_on_a_single_bytes_budget(seed, kind):
    p = random_problem(np.random.default_rng(seed), kinds=kind)
    best = optimum(p)
    if best is None:
        with pytest.raises(ConfigError, match="budget infeasible"):
            solve_dp(p)
        return
    spare = p.total_params() * 4  # an upper bound of the spare byte capacity: resolution this fine is exact
    sol = solve_dp(p, resolution=spare)
    assert_ok(sol, p)
    assert close(sol.distortion, best.distortion)
    assert sol.solver == "dp"


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("kind", ["l", "s"])
def test_dp_coarse_single_budget_within_discretisation_bound(seed, kind):
    """Costs are rounded up to steps of spare/resolution, at most one step per layer: the DP answer is feasible and
    at least as good as the true optimum under the budget tightened by n_layers steps."""
    p = random_problem(np.random.default_rng(seed), kinds=kind)
    best = optimum(p)
    resolution = 50  # coarse on purpose, so that the bound is exercised
    if best is None:
        with pytest.raises(ConfigError, match="budget infeasible"):
            solve_dp(p, resolution=resolution)
        return
    sol = solve_dp(p, resolution=resolution)
    assert_ok(sol, p)
    assert sol.distortion >= best.distortion * (1 - REL) - 1e-12
    if kind == "l":
        spare = p.budget.latency_ms - sum(min(p.latency[l].values()) for l in p.layers)
        tighter = Budget(latency_ms=p.budget.latency_ms - len(p.layers) * spare / resolution)
    else:
        spare = p.budget.size_bytes - sum(min(p.bytes[l].values()) for l in p.layers)
        tighter = Budget(size_bytes=math.floor(p.budget.size_bytes - len(p.layers) * spare / resolution))
    tight = optimum(replace(p, budget=tighter))
    if tight is not None:
        assert sol.distortion <= tight.distortion * (1 + REL) + 1e-12
    # and at the default resolution it is within 1% of the optimum on these problems
    assert solve_dp(p).distortion <= best.distortion * 1.01 + 1e-12


@pytest.mark.parametrize("seed", range(100))
def test_dp_multi_constraint_feasible(seed):
    p = random_problem(np.random.default_rng(seed), kinds="sla" if seed % 2 else "la")
    best = optimum(p)
    if best is None:
        with pytest.raises(ConfigError, match="budget infeasible"):
            solve_dp(p)
        return
    sol = solve_dp(p)
    assert_ok(sol, p)
    assert sol.distortion >= best.distortion * (1 - REL) - 1e-12


def test_multi_constraint_where_the_size_answer_is_too_slow():
    # w4g128 is the smallest but slow (dequantisation); w8a8 is fast. Under size alone w4g128 wins on distortion.
    layers = ("a", "b", "c")
    opts = {l: ("fp32", "w8a8", "w4g128") for l in layers}
    dist = {l: {"fp32": 0.0, "w8a8": 0.05, "w4g128": 0.02} for l in layers}
    size = {l: {"fp32": 4000, "w8a8": 1000, "w4g128": 600} for l in layers}
    lat = {l: {"fp32": 1.0, "w8a8": 0.4, "w4g128": 1.5} for l in layers}
    params = {l: 1000 for l in layers}
    size_only = Problem(layers, opts, dist, size, lat, params, Budget(size_bytes=3200))
    naive = solve_dp(size_only)
    assert set(naive.choice.values()) == {"w4g128"} and naive.latency_ms > 2.0
    budget = Budget(size_bytes=3200, latency_ms=2.0, avg_bits=8.0)  # avg-bits 8 = 3000 bytes
    p = replace(size_only, budget=budget)
    for solver in (solve_dp, solve_ilp, solve_evo, brute_force):
        sol = solver(p)
        assert_ok(sol, p)
        assert sol.latency_ms <= 2.0 and sol.bytes <= 3000 and sol.avg_bits <= 8.0
        assert sol.choice == {l: "w8a8" for l in layers}
    with pytest.raises(ConfigError, match="budget infeasible: no assignment meets"):
        solve_dp(replace(p, budget=replace(budget, avg_bits=7.9)))


@pytest.mark.parametrize("seed", range(40))
def test_evo_never_worse_than_its_seed_and_feasible(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, kinds="sl")
    if optimum(p) is None:
        with pytest.raises(ConfigError, match="budget infeasible"):
            solve_evo(p, generations=5)
        return
    # a deliberately poor start: the smallest assignment (the ilp answer where that is not feasible)
    start = {l: min(p.options[l], key=lambda o: (p.bytes[l][o], p.latency[l][o])) for l in p.layers}
    if not feasible(p, start):
        start = solve_ilp(p).choice
    start_d = sum(p.distortion[l][start[l]] for l in p.layers)
    sol = solve_evo(p, generations=30, population=16, seed=seed, start=start)
    assert_ok(sol, p)
    assert sol.distortion <= start_d + 1e-12

    # with a measured, non-additive evaluate: only feasible choices are evaluated, and the result is no worse
    seen = []

    def evaluate(choice):
        assert feasible(p, choice)
        seen.append(choice)
        additive = sum(p.distortion[l][o] for l, o in choice.items())
        return additive + 0.5 * sum(o != "fp32" for o in choice.values()) ** 1.5 / len(choice)

    seeded = solve_ilp(p)
    evo = solve_evo(p, evaluate=evaluate, generations=20, population=8, seed=seed, start=seeded)
    assert_ok(evo, p)
    assert evo.measured == pytest.approx(evaluate(evo.choice)) and evo.measured <= evaluate(seeded.choice) + 1e-12
    assert seen


def test_evo_improves_a_poor_start():
    p = random_problem(np.random.default_rng(3), n_layers=6, kinds="s", slack=0.7)
    start = {l: min(p.options[l], key=lambda o: p.bytes[l][o]) for l in p.layers}
    sol = solve_evo(p, generations=100, population=16, start=start)
    assert sol.distortion < sum(p.distortion[l][start[l]] for l in p.layers)
    assert sol.distortion <= brute_force(p).distortion * 1.05


def test_evo_rejects_an_infeasible_start():
    p = random_problem(np.random.default_rng(0), n_layers=3, kinds="s", slack=0.0)
    with pytest.raises(ConfigError, match="feasible start"):
        solve_evo(p, start={l: "fp32" for l in p.layers})


@pytest.mark.parametrize("seed", range(30))
def test_every_solver_raises_on_an_infeasible_budget(seed):
    p = random_problem(np.random.default_rng(seed), kinds="sla", slack=0.5)
    lo_b = sum(min(p.bytes[l].values()) for l in p.layers)
    lo_t = math.fsum(min(p.latency[l].values()) for l in p.layers)
    for budget, pattern in ((Budget(size_bytes=lo_b - 1), "smallest possible is"),
                            (Budget(latency_ms=lo_t * 0.999), "fastest possible is"),
                            (Budget(avg_bits=8 * (lo_b - 1) / p.total_params()), "avg bits")):
        q = replace(p, budget=budget)
        for solver in (solve_dp, solve_ilp, solve_evo, brute_force, solve):
            with pytest.raises(ConfigError, match=f"budget infeasible.*{pattern}"):
                solver(q)


def test_jointly_infeasible_budget():
    # each constraint alone can be met (size by w4, latency by w8a8), both together cannot
    opts = {"a": ("fp32", "w8a8", "w4g128")}
    p = Problem(("a",), opts, {"a": {"fp32": 0.0, "w8a8": 0.1, "w4g128": 0.2}},
                {"a": {"fp32": 400, "w8a8": 100, "w4g128": 50}}, {"a": {"fp32": 1.0, "w8a8": 0.5, "w4g128": 2.0}},
                {"a": 100}, Budget(size_bytes=60, latency_ms=0.6))
    for solver in (solve_dp, solve_ilp, solve_evo, brute_force):
        with pytest.raises(ConfigError, match="budget infeasible: no assignment meets"):
            solver(p)


def _slow_int8_problem(budget: Budget) -> Problem:
    layers = ("conv", "dw", "fc")
    opts = {l: ("fp32", "w8a8") for l in layers}
    dist = {"conv": {"fp32": 0.0, "w8a8": 0.01}, "dw": {"fp32": 0.0, "w8a8": 0.02}, "fc": {"fp32": 0.0, "w8a8": 0.03}}
    size = {l: {"fp32": 4000, "w8a8": 1000} for l in layers}
    lat = {"conv": {"fp32": 1.0, "w8a8": 0.4}, "dw": {"fp32": 0.5, "w8a8": 0.55}, "fc": {"fp32": 1.0, "w8a8": 0.6}}
    return Problem(layers, opts, dist, size, lat, {l: 1000 for l in layers}, budget, "kl")


@pytest.mark.parametrize("latency", [2.5, 2.2, 1.6, 1.55])
def test_a_slower_and_worse_option_is_never_chosen_for_latency(latency):
    p = _slow_int8_problem(Budget(latency_ms=latency))
    for solver in (solve_dp, solve_ilp, solve_evo, solve):
        sol = solver(p)
        assert_ok(sol, p)
        assert sol.choice["dw"] == "fp32"
        assert "slower" in sol.reasons["dw"] and "w8a8" in sol.reasons["dw"]
        assert "kl" in sol.reasons["conv"]
    sol = solve_ilp(_slow_int8_problem(Budget(latency_ms=1.6)))
    assert sol.choice == {"conv": "w8a8", "dw": "fp32", "fc": "w8a8"}
    assert sol.reasons["conv"].startswith("w8a8: saves 0.6 ms and 3 KB vs fp32 for +0.01 kl")
    assert sol.reasons["dw"].startswith("fp32:") and "w8a8 is slower here (+0.05 ms): kept fp32" in sol.reasons["dw"]


def test_reasons_explain_the_trade_off():
    layers = ("a", "b")
    opts = {l: ("fp32", "w8a8", "w4g128") for l in layers}
    dist = {"a": {"fp32": 0.0, "w8a8": 0.01, "w4g128": 0.05}, "b": {"fp32": 0.0, "w8a8": 0.02, "w4g128": 0.2}}
    size = {l: {"fp32": 4000, "w8a8": 1000, "w4g128": 500} for l in layers}
    lat = {l: {"fp32": 1.0, "w8a8": 0.5, "w4g128": 0.9} for l in layers}
    p = Problem(layers, opts, dist, size, lat, {l: 1000 for l in layers}, Budget(size_bytes=1600), "kl")
    sol = solve_ilp(p)
    assert sol.choice == {"a": "w4g128", "b": "w8a8"}
    assert sol.reasons["a"] == ("w4g128: saves 0.1 ms and 3.5 KB vs fp32 for +0.05 kl (best trade-off under "
                                "size<=1600B); w8a8 saves 0.4 ms but is 500 B larger vs w4g128 for -0.04 kl")
    assert sol.reasons["b"].startswith("w8a8: saves 0.5 ms and 3 KB vs fp32 for +0.02 kl")
    assert "lowest kl per byte saved; w4g128 saves 500 B but is 0.4 ms slower vs w8a8 for +0.18 kl" in sol.reasons["b"]


def test_empty_budget_gives_the_min_distortion_assignment_with_cheap_ties():
    p = random_problem(np.random.default_rng(7), n_layers=6, kinds="")
    # a tie on layer l0: w8a8 as accurate as fp32 and faster → the tie goes to the faster option
    dist = {**p.distortion, "l0": {**p.distortion["l0"], "w8a8": 0.0}}
    lat = {**p.latency, "l0": {**p.latency["l0"], "w8a8": p.latency["l0"]["fp32"] / 2}}
    p = replace(p, distortion=dist, latency=lat)
    for solver in (solve_dp, solve_ilp, solve_evo, brute_force, solve):
        sol = solver(p)
        assert sol.choice == {"l0": "w8a8", **{l: "fp32" for l in p.layers[1:]}}
        assert sol.distortion == 0.0 and "no budget" in sol.reasons["l1"]


def test_from_tables_drops_options_missing_from_either_table():
    sens = SensitivityTable("m" * 64, "d" * 64, "kl", {"a": {"fp32": 0.0, "w8a8": 0.1, "w4g128": 0.3},
                                                       "b": {"fp32": 0.0, "w8a8": 0.2}})
    e = CostEntry
    cost = CostTable("cpu-x86", {"a": {"fp32": e(400, 1.0, "roofline"), "w8a8": e(100, 0.5, "roofline")},
                                 "b": {"fp32": e(800, 2.0, "roofline"), "w8a8": e(200, 0.7, "measured:x"),
                                       "w2": e(50, 0.6, "roofline")}})
    p = Problem.from_tables(sens, cost, {"a": 100, "b": 200}, Budget(size_bytes=500))
    assert p.layers == ("a", "b") and p.options == {"a": ("fp32", "w8a8"), "b": ("fp32", "w8a8")}
    assert p.bytes["b"]["w8a8"] == 200 and p.latency["a"]["w8a8"] == 0.5 and p.metric == "kl"
    sol = solve(p)
    assert sol.choice == {"a": "w8a8", "b": "w8a8"} and sol.solver == "auto→ilp"
    assert Problem.from_tables(sens, cost, {}, Budget(), layers=["b"]).layers == ("b",)
    bad = CostTable("cpu-x86", {**cost.entries, "a": {"w2": e(50, 0.2, "roofline")}})
    with pytest.raises(ConfigError, match="layer 'a' has no option in both"):
        Problem.from_tables(sens, bad, {"a": 100, "b": 200}, Budget())
    with pytest.raises(ConfigError, match="avg-bits budget needs"):
        Problem.from_tables(sens, cost, {}, Budget(avg_bits=4))


@pytest.mark.parametrize("seed", range(5))
def test_deterministic(seed):
    p = random_problem(np.random.default_rng(seed), n_layers=6, kinds="sl", slack=0.6)
    for run in (solve_dp, solve_ilp, lambda q: solve_evo(q, generations=20, seed=3), brute_force):
        assert run(p) == run(p)
    # a mutated copy of the same problem gives the same answer too
    assert solve_ilp(replace(p, options=dict(p.options))) == solve_ilp(p)


def test_auto_switches_to_evo_when_the_additive_model_is_poor():
    p = random_problem(np.random.default_rng(1), n_layers=5, kinds="s", slack=0.5)

    def evaluate(choice):
        return sum(p.distortion[l][o] for l, o in choice.items())

    assert solve(p, additivity={"pearson": 0.97}, evaluate=evaluate).solver == "auto→ilp"
    assert solve(p, additivity={"pearson": 0.5}).solver == "auto→ilp"  # nothing to measure with
    sol = solve(p, additivity={"pearson": 0.5}, evaluate=evaluate)
    assert sol.solver.startswith("auto→ilp→evo") and "0.50" in sol.solver
    assert sol.measured is not None and sol.measured <= solve_ilp(p).distortion + 1e-12
    with pytest.raises(ConfigError, match="unknown solver"):
        solve(p, "greedy")


def test_brute_force_refuses_huge_problems():
    p = random_problem(np.random.default_rng(0), n_layers=7, kinds="s")
    with pytest.raises(ConfigError, match="refuses"):
        brute_force(p, limit=10)


def test_satisfies_checks_every_constraint():
    sol = Solution({"a": "w8a8"}, 0.1, 1000, 2.0, 8.0, "x", {})
    assert sol.satisfies(Budget(size_bytes=1000, latency_ms=2.0, avg_bits=8.0), {"a": 1000})
    assert not sol.satisfies(Budget(size_bytes=999), {"a": 1000})
    assert not sol.satisfies(Budget(latency_ms=1.99), {"a": 1000})
    assert not sol.satisfies(Budget(avg_bits=7.9), {"a": 1000})


@pytest.mark.parametrize("kinds", ["s", "l", "sla"])
def test_sixty_layers_solve_fast(kinds):
    p = random_problem(np.random.default_rng(42), n_layers=60, kinds=kinds, slack=0.4, n_options=4)
    sols = {}
    for solver in (solve_dp, solve_ilp):
        t0 = time.perf_counter()
        sols[solver] = sol = solver(p)
        assert time.perf_counter() - t0 < 10.0
        assert_ok(sol, p)
    exact = sols[solve_ilp].distortion
    assert exact * (1 - REL) - 1e-12 <= sols[solve_dp].distortion <= exact * (1.01 if len(kinds) == 1 else 1.05)
