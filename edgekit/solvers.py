"""Per-layer option allocation under a budget: minimise the summed single-layer distortion (the additive model)
subject to total bytes, total latency and average weight bits.

- ``solve_ilp``: exact 0/1 program (scipy's HiGHS ``milp``), every constraint at once.
- ``solve_dp``: multiple-choice knapsack by dynamic programming over one discretised resource (costs rounded *up*,
  so a DP-feasible answer is truly feasible); a second constraint is handled by Lagrangian relaxation. Exact for a
  single integer bytes budget whose spare capacity fits ``resolution`` steps; otherwise approximate.
- ``solve_evo``: EvoPress-style search from a feasible start, selecting by a measured ``evaluate`` (or the sum).
- ``brute_force``: exhaustive, for tests and tiny problems.

Every solver checks its answer against the budget exactly before returning it, and raises ``ConfigError`` when no
assignment meets the budget. No torch here: numpy, and scipy imported inside ``solve_ilp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgekit.errors import ConfigError
from edgekit.tables import Budget, CostTable, SensitivityTable

_FLOAT_NAMES = ("fp32", "fp16", "bf16", "float")


@dataclass(frozen=True)
class Problem:
    layers: tuple[str, ...]
    options: dict[str, tuple[str, ...]]  # allowed options per layer (present in both tables)
    distortion: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    latency: dict[str, dict[str, float]]
    params: dict[str, int]  # weight elements per layer (for the average-bits budget)
    budget: Budget
    metric: str = "distortion"

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError("a problem needs at least one layer, each named once")
        for l in self.layers:
            if not self.options.get(l):
                raise ConfigError(f"layer {l!r} has no allowed option")
            for o in self.options[l]:
                try:
                    vals = (float(self.distortion[l][o]), float(self.bytes[l][o]), float(self.latency[l][o]))
                except KeyError as exc:
                    raise ConfigError(f"layer {l!r} option {o!r} lacks distortion, bytes or latency") from exc
                if not all(map(math.isfinite, vals)) or vals[1] < 0 or not vals[1].is_integer():
                    raise ConfigError(f"layer {l!r} option {o!r}: values must be finite, bytes a whole number: {vals}")
        if self.budget.avg_bits is not None and self.total_params() <= 0:
            raise ConfigError("an avg-bits budget needs the layers' parameter counts", hint="pass params={layer: n}")

    def total_params(self) -> int:
        return sum(int(self.params.get(l, 0)) for l in self.layers)

    @classmethod
    def from_tables(cls, sens: SensitivityTable, cost: CostTable, params: dict[str, int], budget: Budget,
                    layers: Sequence[str] | None = None) -> Problem:
        """Options present in both tables only; ``layers`` default to the sensitivity table's, in its order."""
        names = tuple(layers) if layers is not None else tuple(sens.layers())
        opts, dist, size, lat = {}, {}, {}, {}
        for l in names:
            s, c = sens.values.get(l, {}), cost.entries.get(l, {})
            common = tuple(o for o in s if o in c)
            if not common:
                raise ConfigError(f"layer {l!r} has no option in both the sensitivity and the cost table",
                                  hint=f"sensitivity has {sorted(s)}, cost has {sorted(c)}")
            opts[l] = common
            dist[l] = {o: float(s[o]) for o in common}
            size[l] = {o: int(c[o].bytes) for o in common}
            lat[l] = {o: float(c[o].latency_ms) for o in common}
        return cls(names, opts, dist, size, lat, {l: int(params.get(l, 0)) for l in names}, budget, sens.metric)


@dataclass(frozen=True)
class Solution:
    choice: dict[str, str]
    distortion: float  # additive model: sum of the chosen single-layer distortions
    bytes: int
    latency_ms: float
    avg_bits: float
    solver: str
    reasons: dict[str, str] = field(default_factory=dict)
    measured: float | None = None  # evo with an ``evaluate`` callback: its value for ``choice``

    def satisfies(self, budget: Budget, params: dict[str, int]) -> bool:
        total = sum(int(params.get(l, 0)) for l in self.choice)
        return not ((budget.size_bytes is not None and self.bytes > budget.size_bytes)
                    or (budget.latency_ms is not None and self.latency_ms > budget.latency_ms)
                    or (budget.avg_bits is not None and (total <= 0 or 8 * self.bytes / total > budget.avg_bits)))


# -- shared helpers -------------------------------------------------------------------------------------------
def _key(p: Problem, l: str, o: str) -> tuple:
    """Per-layer option order: least distortion, then faster, then smaller, then name (deterministic ties)."""
    return (p.distortion[l][o], p.latency[l][o], p.bytes[l][o], o)


def _sorted_options(p: Problem, l: str) -> list[str]:
    return sorted(p.options[l], key=lambda o: _key(p, l, o))


def _totals(p: Problem, choice: dict[str, str]) -> tuple[float, int, float]:
    return (math.fsum(p.distortion[l][choice[l]] for l in p.layers), sum(p.bytes[l][choice[l]] for l in p.layers),
            math.fsum(p.latency[l][choice[l]] for l in p.layers))


def _byte_bound(p: Problem) -> int | None:
    """Size and avg-bits budgets as one bound on total bytes: the largest B with 8·B/Σparams <= avg_bits."""
    bounds = [] if p.budget.size_bytes is None else [math.floor(p.budget.size_bytes)]
    if p.budget.avg_bits is not None:
        total = p.total_params()
        b = max(math.floor(p.budget.avg_bits * total / 8), -1)
        while 8 * (b + 1) / total <= p.budget.avg_bits:
            b += 1
        while b >= 0 and 8 * b / total > p.budget.avg_bits:
            b -= 1
        bounds.append(b)
    return min(bounds) if bounds else None


def _feasible(p: Problem, choice: dict[str, str]) -> bool:
    _, b, t = _totals(p, choice)
    bb, lb = _byte_bound(p), p.budget.latency_ms
    return (bb is None or b <= bb) and (lb is None or t <= lb)


def _budget_text(b: Budget) -> str:
    parts = [f"size<={b.size_bytes}B" if b.size_bytes is not None else "",
             f"latency<={b.latency_ms:g}ms" if b.latency_ms is not None else "",
             f"avg-bits<={b.avg_bits:g}" if b.avg_bits is not None else ""]
    return ", ".join(x for x in parts if x) or "no budget"


def _infeasible(p: Problem, joint: bool = False) -> ConfigError:
    min_b = sum(min(p.bytes[l].values()) for l in p.layers)
    min_t = math.fsum(min(p.latency[l].values()) for l in p.layers)
    parts = []
    if p.budget.size_bytes is not None or p.budget.avg_bits is not None:
        bits = f" = {8 * min_b / p.total_params():.3g} avg bits" if p.total_params() > 0 else ""
        parts.append(f"the smallest possible is {min_b} B{bits}")
    if p.budget.latency_ms is not None:
        parts.append(f"the fastest possible is {min_t:.4g} ms")
    lead = (f"no assignment meets {_budget_text(p.budget)} at once; " if joint
            else f"{_budget_text(p.budget)} for the weighted layers, but ")
    return ConfigError(f"budget infeasible: {lead}{'; '.join(parts)}",
                       hint="relax the budget, or allow smaller/faster options for more layers")


def _check_bounds(p: Problem) -> None:
    """Raise unless each constraint alone can be met (joint infeasibility is the solvers' to find)."""
    bb, lb = _byte_bound(p), p.budget.latency_ms
    if (bb is not None and sum(min(p.bytes[l].values()) for l in p.layers) > bb) or \
            (lb is not None and math.fsum(min(p.latency[l].values()) for l in p.layers) > lb):
        raise _infeasible(p)


def _float_option(p: Problem, l: str) -> str:
    return next((n for n in _FLOAT_NAMES if n in p.options[l]),
                min(p.options[l], key=lambda o: (p.distortion[l][o], -p.bytes[l][o], o)))


def _fmt_bytes(n: float) -> str:
    return next((f"{n / s:.3g} {u}" for u, s in (("MB", 1e6), ("KB", 1e3)) if abs(n) >= s), f"{n:.0f} B")


def _delta(dt: float, db: float) -> str:
    """'saves 0.41 ms and 12 KB' / 'saves 12 KB but is 0.05 ms slower' for a latency and a bytes difference."""
    gains = [x for x, ok in ((f"{dt:.3g} ms", dt > 0), (_fmt_bytes(db), db > 0)) if ok]
    losses = [x for x, ok in ((f"{-dt:.3g} ms slower", dt < 0), (f"{_fmt_bytes(-db)} larger", db < 0)) if ok]
    if not gains:
        return f"is {' and '.join(losses)}" if losses else "costs the same"
    return f"saves {' and '.join(gains)}" + (f" but is {' and '.join(losses)}" if losses else "")


def _reasons(p: Problem, choice: dict[str, str]) -> dict[str, str]:
    """Per layer: what the chosen option saves and costs against float, the neighbouring trade-offs, and options
    that are slower than float on this layer."""
    out, btxt, m = {}, _budget_text(p.budget), p.metric
    res = [r for r, on in (("bytes", _byte_bound(p) is not None), ("ms", p.budget.latency_ms is not None)) if on]
    for l in p.layers:
        c, f = choice[l], _float_option(p, l)
        d, b, t = p.distortion[l], p.bytes[l], p.latency[l]
        cost = {"bytes": b, "ms": t}

        def cheaper(o: str, ref: str, cost=cost) -> bool:
            return any(cost[r][o] < cost[r][ref] for r in res)

        def trade(o: str, ref: str, d=d, b=b, t=t) -> str:
            return f"{_delta(t[ref] - t[o], b[ref] - b[o])} vs {ref} for {d[o] - d[ref]:+.3g} {m}"

        order = _sorted_options(p, l)
        slower = [f"{o} is slower here (+{t[o] - t[f]:.3g} ms)" for o in order if t[o] > t[f] and o != c]
        if p.budget.is_empty():
            text = f"{c}: lowest {m} (no budget set)"
        elif c == f:
            alts = [o for o in order if o != f and cheaper(o, f)]
            what = " or ".join({"bytes": "smaller", "ms": "faster"}[r] for r in res)
            text = (f"{c}: kept float, the budget is met at lower {m} elsewhere ({alts[0]} {trade(alts[0], f)})"
                    if alts else f"{c}: no option is {what} than float here")
        else:
            text = f"{c}: {trade(c, f)} (best trade-off under {btxt})"
            r = res[0]
            per = {o: (d[o] - d[f]) / (cost[r][f] - cost[r][o]) for o in order if o != f and cost[r][o] < cost[r][f]}
            if len(per) > 1 and min(per, key=lambda o: (per[o], o)) == c:
                text += f"; lowest {m} per {'byte' if r == 'bytes' else 'ms'} saved"
            if up := [o for o in order if d[o] < d[c] and o != f]:
                text += f"; {up[-1]} {trade(up[-1], c)}"
            if down := [o for o in order if d[o] > d[c] and cheaper(o, c) and not any(cost[r][o] > cost[r][c]
                                                                                       for r in res)]:
                text += f"; {down[0]} {trade(down[0], c)}"
        if slower:
            text += "; " + ", ".join(slower) + (f": kept {f}" if c == f else "")
        out[l] = text
    return out


def _solution(p: Problem, choice: dict[str, str], solver: str, measured: float | None = None) -> Solution:
    choice = {l: choice[l] for l in p.layers}
    d, b, t = _totals(p, choice)
    total = p.total_params()
    sol = Solution(choice, d, b, t, 8 * b / total if total > 0 else 0.0, solver, _reasons(p, choice), measured)
    if not sol.satisfies(p.budget, p.params):  # the last line of defence: never hand out a violating plan
        raise AssertionError(f"{solver} produced a solution violating {_budget_text(p.budget)}")
    return sol


def _min_choice(p: Problem) -> dict[str, str]:
    return {l: _sorted_options(p, l)[0] for l in p.layers}


# -- brute force ----------------------------------------------------------------------------------------------
def brute_force(p: Problem, *, limit: int = 1_000_000) -> Solution:
    """Exhaustive search (ties → less latency, then fewer bytes). Refuses more than ``limit`` combinations."""
    opts = [_sorted_options(p, l) for l in p.layers]
    if math.prod(map(len, opts)) > limit:
        raise ConfigError(f"brute force refuses {math.prod(map(len, opts))} combinations (limit {limit})")
    _check_bounds(p)
    D, B, T = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1)
    for l, os_ in zip(p.layers, opts):
        D = (D[:, None] + np.array([p.distortion[l][o] for o in os_])[None]).ravel()
        B = (B[:, None] + np.array([p.bytes[l][o] for o in os_], dtype=np.int64)[None]).ravel()
        T = (T[:, None] + np.array([p.latency[l][o] for o in os_])[None]).ravel()
    ok = np.ones(D.shape, dtype=bool)
    if (bb := _byte_bound(p)) is not None:
        ok &= B <= bb
    if p.budget.latency_ms is not None:
        ok &= T <= p.budget.latency_ms * (1 + 1e-12)  # candidates only; each is checked exactly below
    idx = np.flatnonzero(ok)
    for i in idx[np.lexsort((idx, B[idx], T[idx], D[idx]))]:
        digits = np.unravel_index(i, [len(o) for o in opts])
        choice = {l: os_[k] for l, os_, k in zip(p.layers, opts, digits)}
        if _feasible(p, choice):
            return _solution(p, choice, "brute")
    raise _infeasible(p, joint=True)


# -- dynamic programming --------------------------------------------------------------------------------------
def _dp_once(p: Problem, opts: list[list[str]], weights: list[np.ndarray], cap: tuple[int, int],
             objs: list[np.ndarray]) -> dict[str, str] | None:
    """Min Σ obj subject to Σ weight <= j (integer weights; each layer has a 0-weight option), for j from cap[1] down
    to cap[0]: the first answer that is exactly feasible. Σ weight <= cap[0] guarantees feasibility; the extra room
    up to cap[1] wins back what rounding up lost."""
    top = cap[1]
    best = np.zeros(top + 1)
    args = np.zeros((len(opts), top + 1), dtype=np.int16)
    for i, (w, v) in enumerate(zip(weights, objs)):
        cand = np.full((len(w), top + 1), np.inf)
        for k in range(len(w)):
            if w[k] <= top:
                cand[k, w[k]:] = best[: top + 1 - w[k]] + v[k]
        args[i] = np.argmin(cand, axis=0)  # first minimum: options are in _key order, so ties are deterministic
        best = cand[args[i], np.arange(top + 1)]
    for start in range(top, cap[0] - 1, -1):
        choice, j = {}, start
        for i in range(len(opts) - 1, -1, -1):
            k = int(args[i, j])
            choice[p.layers[i]] = opts[i][k]
            j -= int(weights[i][k])
        if _feasible(p, choice):
            return choice
    return None


def _weights(costs: list[np.ndarray], bound: float, resolution: int, integer: bool) -> tuple[list, tuple[int, int]]:
    """Discretise costs (reduced by each layer's minimum) rounding UP, so Σ weights <= cap implies Σ cost <= bound."""
    red = [c - c.min() for c in costs]
    spare = bound - sum(c.min() for c in costs)
    if integer:
        red, spare = [r.astype(np.int64) for r in red], int(spare)
        g = math.gcd(*[int(x) for r in red for x in r]) or 1
        if spare // g <= resolution:  # exact
            return [r // g for r in red], (spare // g, spare // g)
        return [-((-r * resolution) // spare) for r in red], (resolution, resolution + len(red))
    if spare <= 0:
        return [np.where(r > 0, 1, 0) for r in red], (0, 0)
    return [np.ceil(r * (resolution / spare)).astype(np.int64) for r in red], (resolution, resolution + len(red))


def _polish(p: Problem, choice: dict[str, str]) -> dict[str, str]:
    """Single-layer moves to lower distortion while staying exactly feasible, until none helps."""
    improved = True
    while improved:
        improved = False
        for l in p.layers:
            for o in _sorted_options(p, l):
                if _key(p, l, o) >= _key(p, l, choice[l]):
                    break
                if _feasible(p, trial := {**choice, l: o}):
                    choice, improved = trial, True
                    break
    return choice


def solve_dp(p: Problem, *, resolution: int = 2000) -> Solution:
    """Multiple-choice knapsack DP over bytes (size/avg-bits) or latency; the other one by Lagrangian bisection."""
    if p.budget.is_empty():
        return _solution(p, _min_choice(p), "dp")
    _check_bounds(p)
    opts = [_sorted_options(p, l) for l in p.layers]
    dist = [np.array([p.distortion[l][o] for o in os_]) for l, os_ in zip(p.layers, opts)]
    cost = {"bytes": [np.array([p.bytes[l][o] for o in os_], dtype=np.int64) for l, os_ in zip(p.layers, opts)],
            "latency": [np.array([p.latency[l][o] for o in os_]) for l, os_ in zip(p.layers, opts)]}
    bound = {"bytes": _byte_bound(p), "latency": p.budget.latency_ms}
    active = [r for r in ("bytes", "latency") if bound[r] is not None]
    found: list[dict[str, str]] = []
    for primary in active:  # with both constraints, try each as the DP axis and keep the better answer
        weights, cap = _weights(cost[primary], bound[primary], resolution, primary == "bytes")
        other = [r for r in active if r != primary]
        sec = [c - c.min() for c in cost[other[0]]] if other else None

        def run(lam: float, weights=weights, cap=cap, sec=sec) -> dict[str, str] | None:
            objs = dist if sec is None or lam == 0 else [d + lam * s for d, s in zip(dist, sec)]
            return _dp_once(p, opts, weights, cap, objs)

        if first := run(0.0):
            found.append(first)
            continue
        steps = [x for s in sec for x in np.diff(np.unique(s))]
        hi = 2 * (sum(float(np.ptp(d)) for d in dist) + 1e-12) / (min(steps) if steps else 1.0)
        if not (top := run(hi)):
            continue
        found.append(top)
        lo_log, hi_log = math.log(hi) - 40, math.log(hi)  # bisection on log λ for the smallest feasible multiplier
        for _ in range(40):
            mid = (lo_log + hi_log) / 2
            if c := run(math.exp(mid)):
                found.append(c)
                hi_log = mid
            else:
                lo_log = mid
    if not found:  # the Lagrangian missed (or the budget is jointly infeasible): the exact solver decides
        return replace(solve_ilp(p), solver="dp→ilp")
    best = min((_polish(p, c) for c in found), key=lambda c: (_totals(p, c)[0], _totals(p, c)[2], _totals(p, c)[1]))
    return _solution(p, best, "dp")


# -- integer linear program -----------------------------------------------------------------------------------
def solve_ilp(p: Problem, *, time_limit: float = 30.0) -> Solution:
    """Binary x[l,o], one-hot per layer, one row per budget; HiGHS via scipy.optimize.milp (relative gap 0)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as exc:
        raise ConfigError("solver 'ilp' needs scipy", hint="install scipy, or use solver='dp'") from exc
    if p.budget.is_empty():
        return _solution(p, _min_choice(p), "ilp")
    _check_bounds(p)
    opts = [_sorted_options(p, l) for l in p.layers]
    cols = [(l, o) for l, os_ in zip(p.layers, opts) for o in os_]
    n, where = len(cols), {lo: j for j, lo in enumerate(cols)}
    # shift each layer by its minimum and scale so that HiGHS's absolute gap (1e-6) is negligible
    base = {l: min(p.distortion[l].values()) for l in p.layers}
    c = np.array([p.distortion[l][o] - base[l] for l, o in cols])
    c = c * (1e6 / c.sum()) if c.sum() > 0 else c
    onehot = np.zeros((len(p.layers), n))
    for j, (l, _) in enumerate(cols):
        onehot[p.layers.index(l), j] = 1
    rows = [LinearConstraint(onehot, 1, 1)]
    if (bb := _byte_bound(p)) is not None:
        rows.append(LinearConstraint(np.array([[p.bytes[l][o] for l, o in cols]], dtype=float), -np.inf, bb))
    if p.budget.latency_ms is not None:
        rows.append(LinearConstraint(np.array([[p.latency[l][o] for l, o in cols]]), -np.inf, p.budget.latency_ms))
    for _ in range(20):
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=rows,
                   options={"time_limit": time_limit, "mip_rel_gap": 0.0})
        if res.x is None:
            if res.status == 2:
                raise _infeasible(p, joint=True)
            raise ConfigError(f"ilp solver found no solution: {res.message}", hint="try solver='dp'")
        x = np.asarray(res.x)
        choice = {l: max(os_, key=lambda o: x[where[l, o]]) for l, os_ in zip(p.layers, opts)}
        if _feasible(p, choice):
            return _solution(p, choice, "ilp" if res.status == 0 else "ilp(time limit)")
        # within HiGHS's tolerance but not exactly feasible: forbid this very assignment and solve again
        cut = np.array([[1.0 if choice[l] == o else 0.0 for l, o in cols]])
        rows.append(LinearConstraint(cut, -np.inf, len(p.layers) - 1))
    raise ConfigError("ilp could not find an exactly feasible solution", hint="try solver='dp'")


# -- evolutionary search --------------------------------------------------------------------------------------
def solve_evo(p: Problem, *, evaluate: Callable[[dict[str, str]], float] | None = None, generations: int = 200,
              population: int = 32, seed: int = 0, start: Solution | dict[str, str] | None = None) -> Solution:
    """EvoPress-style: from a feasible start, mutate (switch a layer, repair by making another cheaper), keep the
    best few by ``evaluate(choice)`` (a measured end-to-end distortion) or, without it, by the additive sum.
    Only feasible assignments are ever evaluated; the result is never worse than the start by that score."""
    start = start if start is not None else _exact(p)
    first = dict(start.choice if isinstance(start, Solution) else start)
    if set(first) != set(p.layers) or any(first[l] not in p.options[l] for l in p.layers) or not _feasible(p, first):
        raise ConfigError("evo needs a feasible start assignment over the problem's layers and options")
    rng = np.random.default_rng(seed)
    opts = [_sorted_options(p, l) for l in p.layers]
    bb, lb = _byte_bound(p), p.budget.latency_ms
    scores: dict[tuple[str, ...], float] = {}

    def score(key: tuple[str, ...]) -> float:
        if key not in scores:
            ch = dict(zip(p.layers, key))
            scores[key] = float(evaluate(ch)) if evaluate is not None else _totals(p, ch)[0]
        return scores[key]

    def violated(key: tuple[str, ...]) -> list[str]:
        _, b, t = _totals(p, dict(zip(p.layers, key)))
        return [r for r, bad in (("bytes", bb is not None and b > bb), ("latency", lb is not None and t > lb)) if bad]

    def mutate(parent: tuple[str, ...]) -> tuple[str, ...] | None:
        child = list(parent)
        for _ in range(1 + int(rng.integers(2))):
            i = int(rng.integers(len(child)))
            others = [o for o in opts[i] if o != child[i]]
            if others:
                child[i] = others[int(rng.integers(len(others)))]
        for _ in range(2 * len(child)):  # repair: move some layer to an option cheaper in a violated resource
            bad = violated(tuple(child))
            if not bad:
                return tuple(child) if tuple(child) != parent else None
            table = p.bytes if bad[int(rng.integers(len(bad)))] == "bytes" else p.latency
            movable = [(i, o) for i, l in enumerate(p.layers) for o in opts[i] if table[l][o] < table[l][child[i]]]
            if not movable:
                return None
            i, o = movable[int(rng.integers(len(movable)))]
            child[i] = o
        return None

    start_key = tuple(first[l] for l in p.layers)
    parents = [start_key]
    keep = max(1, min(4, population // 4))
    score(start_key)
    for _ in range(generations):
        kids = [mutate(parents[int(rng.integers(len(parents)))]) for _ in range(population)]
        pool = dict.fromkeys(parents + [k for k in kids if k])  # ordered and deduplicated: evaluation order is fixed
        parents = sorted(pool, key=lambda k: (score(k), k != start_key, k))[:keep]
    best = parents[0]
    return _solution(p, dict(zip(p.layers, best)), "evo", scores[best] if evaluate is not None else None)


# -- front door -----------------------------------------------------------------------------------------------
def _exact(p: Problem) -> Solution:
    """ilp when scipy is installed, else dp."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return solve_dp(p)
    return solve_ilp(p)


def solve(p: Problem, solver: str = "auto", *, additivity: dict | None = None,
          evaluate: Callable[[dict[str, str]], float] | None = None) -> Solution:
    """``auto``: ilp when scipy is there (else dp); then, when the additive model is poor (pearson < 0.9) and an
    ``evaluate`` callback is given, evo seeded with that answer. ``Solution.solver`` records the path taken."""
    named = {"dp": solve_dp, "ilp": solve_ilp, "brute": brute_force, "evo": lambda q: solve_evo(q, evaluate=evaluate)}
    if solver in named:
        return named[solver](p)
    if solver != "auto":
        raise ConfigError(f"unknown solver {solver!r}", hint="solvers: auto, dp, ilp, evo, brute")
    base = _exact(p)
    name = f"auto→{base.solver}"
    r = (additivity or {}).get("pearson")
    if evaluate is not None and r is not None and math.isfinite(float(r)) and float(r) < 0.9:
        evo = solve_evo(p, evaluate=evaluate, start=base)
        return replace(evo, solver=f"{name}→evo (additivity pearson {float(r):.2f} < 0.9)")
    return replace(base, solver=name)


__all__ = ["Problem", "Solution", "brute_force", "solve", "solve_dp", "solve_evo", "solve_ilp"]
