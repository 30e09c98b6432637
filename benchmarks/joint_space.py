"""The joint option space (bits × channel pruning × low rank × removal) against the bits-only space, in one run.

    .venv/bin/python benchmarks/joint_space.py --model all --json benchmarks/results/joint_space.json \
        --svg benchmarks/results/joint_space

For each model (the digits CNN on sklearn digits, EfficientNet-Lite0 on the built-in real photos, MiniLM on real
sentences) both spaces are solved by one ``edgekit.joint.JointAllocator`` under the same grid of latency budgets
(fractions of FP32, measured) and size budgets (fractions of the FP32 file): each allocation solves the bits-only
space first and reports its plan (``analysis["bits_only"]``) beside the joint plan, so both spaces use the same
tables and the same timings. Every artifact is then evaluated on the same held-out samples
(``benchmarks.measure.evaluate``) and timed at batch 1 in pairs with FP32, interleaved across variants, identical
files once (``paired_latency``). The Pareto fronts (fidelity vs measured latency, and vs size) of the two spaces, each
drawn from the plans it returned plus FP32 and uniform INT8 (``ANCHORS``: in both spaces), are compared, and so
are the two plans made under each budget: at every budget the joint plan must meet the budget whenever the bits-only
plan does, at no lower fidelity (within the measurement tolerance), and somewhere it must do strictly better (meet a
budget the bits-only space cannot, or be more faithful).

Fidelity is measured on a finite evaluation set (128 crops for EfficientNet-Lite0: one crop is 0.8 points of top-1),
so two plans differ in fidelity only when they differ beyond sampling noise: by more than ``FID_TOL`` *and* by more
than ``selection.Z`` standard errors of the paired per-sample difference on the same samples (the test the allocator
uses to depart from the bits-only plan). The strict comparison (``FID_TOL`` alone) is reported beside it.

For EfficientNet-Lite0 the allocator also measures on 16 BatchNorm-statistics samples (``datafree.probe_samples``),
as ``edgekit build --space joint`` does for a PyTorch model with BatchNorm. EfficientNet-Lite0 adds the issue's two
fixed checks: structured pruning alone asked for a 1.3× speed-up (channel pruning at FP32 and at INT8, and channel
pruning with block removal at FP32, each against the unpruned model of the same precision in the same timing), and
``latency=0.4x`` in the joint space against ONNX Runtime's uniform INT8 (``quantize_static``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import peers as P  # noqa: E402

log = logging.getLogger("joint_space")

LATENCY = {"digits": [0.5, 0.7], "efficientnet": [0.35, 0.4, 0.45, 0.55, 0.7], "minilm": [0.3, 0.4, 0.5, 0.7]}
SIZE = {"digits": [0.1, 0.15, 0.2, 0.25, 0.3, 0.4], "efficientnet": [0.12, 0.18, 0.25], "minilm": [0.1, 0.15, 0.2, 0.3]}
EVAL = {"digits": 360, "efficientnet": 128, "minilm": 64}
LAT_TOL = 0.05  # measured latency ratios within 5 % count as equal (same-run noise)
FID_TOL = 0.005  # fidelity within half a point counts as equal (and, with per-sample values, within sampling noise)
SPEEDUP = 1.3
BLOCKS_LABEL = "fp32 channels+blocks"
# (label, precision, options per layer, structural kinds): channel pruning alone at FP32 and at INT8, and channel
# pruning with block removal (depth pruning) at FP32
PRUNING_CHECKS = (("fp32", "fp32", ["fp32"], frozenset({"prune"})), ("int8", "int8", ["w8a8"], frozenset({"prune"})),
                  (BLOCKS_LABEL, "fp32", ["fp32"], frozenset({"prune", "drop"})))
# plans in both spaces that every allocation starts from: FP32 and the allocator's uniform INT8 plan. They belong to
# both fronts; without them a space's front holds uniform INT8 only if some budget of the grid happens to return it
# (the bits-only space returns it for latency budgets it misses, where the joint space meets them by pruning)
ANCHORS = ("fp32", "uniform int8")


def prepare(name: str, work: Path, ctx):
    from edgekit.fsutil import sha256_file
    from edgekit.inventory import layer_inventory

    if name == "minilm":
        from benchmarks.allocation import prepare as alloc_prepare

        prep, model, layers = alloc_prepare("minilm", work, ctx)
        return prep, model, layers
    if name == "efficientnet":
        prep = P.prepare_efficientnet(work, EVAL[name], ctx)
    else:
        from edgekit.data import load_data
        from edgekit.export.onnx import export_onnx
        from edgekit.model import load_model

        m = load_model("builtin:digits-cnn", ctx=ctx)
        fp32 = export_onnx(m, work / "digits-fp32.onnx")
        calib = load_data(m.default_calib, m.inputs, m.preprocessing, role="calibration", limit=128, seed=ctx.seed)
        evald = load_data(m.default_eval, m.inputs, m.preprocessing, role="evaluation", limit=EVAL[name],
                          seed=ctx.seed)
        prep = P.Prepared(fp32.path, calib, evald, True, "digits CNN (builtin:digits-cnn), sklearn digits")
    model = SimpleNamespace(sha256=sha256_file(prep.fp32_path), task="classification", probe=None)
    if name == "efficientnet":  # BatchNorm-statistics samples beside the held-out calibration crops, as a build makes
        from edgekit.datafree import probe_samples
        from edgekit.model import load_model

        m = load_model("builtin:efficientnet-lite0", ctx=ctx)
        model.probe = probe_samples(m.module, m.inputs, seed=ctx.seed)
    return prep, model, layer_inventory(prep.fp32_path)


def allocators(prep, model, layers, work: Path, ctx, target: str = "cpu-x86", importance: str = "activations"):
    """The joint allocator (its tables, and the bits-only space it solves first) and the common arguments."""
    from edgekit.compress.quant import W8A8Config
    from edgekit.export.onnx import describe
    from edgekit.joint import JointAllocator
    from edgekit.targets import load_target

    profile = load_target(target)
    fp32 = describe(prep.fp32_path)
    common = {"profile": profile, "model": model, "fp32": fp32, "layers": layers, "calib": prep.calib,
              "cfg": W8A8Config(), "ctx": ctx, "probe": getattr(model, "probe", None), "importance": importance}
    t0 = time.perf_counter()
    joint = JointAllocator(**common, work=work / "joint", structure=True)
    for space, sp in (("bits", joint.bits_space), ("joint", joint.space)):
        log.info("%s space: %d options over %d rows", space, sum(len(r) for r in sp.rows.values()), len(sp.rows))
    log.info("tables and spaces in %.0f s", time.perf_counter() - t0)
    return {"joint": joint}, common


def budget_specs(name: str, fp32_size: int) -> list[str]:
    """The grid of budgets for one model: latency fractions of FP32, then sizes in bytes."""
    return [f"latency={x}x" for x in LATENCY[name]] + [f"size={int(x * fp32_size)}B" for x in SIZE[name]]


def plan_rows(allocs: dict, specs: list[str], *, follow_up: bool = False) -> list:
    """Per budget, two rows from one allocation: the bits-only space's plan (``analysis["bits_only"]``: the same
    tables, solver, rounds and measurements, restricted to precision options) and the joint space's kept plan. One
    allocation for both means both spaces judge every plan by the same timings, so they cannot disagree about
    whether the same plan met a budget. ``follow_up`` marks budgets added after the grid (``follow_up_specs``)."""
    from edgekit.plan import parse_option
    from edgekit.tables import parse_budget

    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        try:
            tag = spec.replace("=", "-").replace(".", "_")
            plan, analysis = allocs["joint"].allocate(parse_budget([spec]), tag=tag)
        except Exception as exc:  # noqa: BLE001 - an infeasible budget is a result, not a crash
            log.warning("%s: %s", spec, exc)
            continue
        make_s = round(time.perf_counter() - t0, 1)
        bits = analysis["bits_only"]
        kept = {"joint": (plan, analysis["applied"][1], analysis["kept_because"])}
        if bits is not None:
            kept["bits"] = (bits["plan"], bits["artifact"], bits["kept_because"])
        else:
            log.warning("bits %s: out of the bits-only space's reach", spec)
        for space, (p, art, why) in kept.items():
            kinds: dict[str, int] = {}
            for c in p.layers:
                k = parse_option(c.option).kind
                kinds[k] = kinds.get(k, 0) + 1
            rows.append(P.Peer(f"{space} {spec}", Path(art.path), art.size,
                               {"space": space, "budget": spec, "kinds": kinds, "kept_because": why,
                                "rounds": [r for r in analysis["latency_rounds"]
                                           if space == "joint" or r["space"] == "bits"],
                                "options": {c.layer: c.option for c in p.layers}, "make_s": make_s,
                                # FP32's latency when the allocator timed its rounds: this host runs FP32 at about
                                # 5 or 8 ms by the minute, and INT8's ratio to it moves with that (0.47x / 0.40x)
                                "allocation_fp32_ms": p.budget.get("fp32_ms"), "follow_up": follow_up}))
    return rows


def per_sample(results: dict) -> dict:
    """Each evaluated variant's per-sample fidelities, by name (for the paired noise test)."""
    return {n: rec["per_sample"] for n, rec in results.items() if "per_sample" in rec}


def front_points(results: dict, classification: bool, *, grid_only: bool = False) -> dict:
    """Each space's points (cost, fidelity, variant name) on both axes: the plans it returned, and ``ANCHORS`` in
    both. ``grid_only`` leaves out the follow-up budgets' plans."""
    pts: dict = {"bits": {"latency": [], "size": []}, "joint": {"latency": [], "size": []}}
    for vname, rec in results.items():
        y = _metric(rec, classification)
        lat = latency_ratio(rec)
        notes = rec.get("notes", {})
        if grid_only and notes.get("follow_up"):
            continue
        for space in pts if vname in ANCHORS else [notes.get("space")]:
            if space not in pts or y is None:
                continue
            if lat is not None:
                pts[space]["latency"].append((lat, y, vname))
            pts[space]["size"].append((rec["size_ratio_vs_fp32"], y, vname))
    return pts


def follow_up_specs(results: dict, classification: bool, samples: dict, asked: list[str]) -> list[str]:
    """Size budgets at the exact bytes of every bits-only plan the joint front misses on the grid.

    A front drawn from a grid of budgets has points only where each space's plans happened to land: the bits-only
    plan for ``size=0.2x`` may weigh 0.185x while the joint plan for it uses 0.197x (more faithful, within the same
    budget), and then no joint point sits at 0.185x although the joint space contains that bits-only plan. So where
    the joint front misses a bits point, the same allocator is asked for that point's size, and the comparison uses
    what it returns (both spaces, like any budget: ``by_budget`` compares them too). A miss that remains is a miss.
    Sizes are exact, so only the size axis is followed up (latency points already compare within ``LAT_TOL``)."""
    pts = front_points(results, classification)
    cmp = compare_fronts(pts["bits"]["size"], pts["joint"]["size"], xtol=0.0, samples=samples)
    specs = []
    for w in cmp["joint_worse_at"]:
        if w.get("name") not in results:
            continue
        spec = f"size={results[w['name']]['size_bytes']}B"
        if spec not in asked and spec not in specs:
            specs.append(spec)
    return specs


def front(points: list[tuple]) -> list[tuple]:
    """Pareto front (minimise x, maximise y), sorted by x; points are ``(x, y)`` or ``(x, y, name)``."""
    best: list[tuple] = []
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or p[1] > best[-1][1]:
            best.append(tuple(p))
    return best


def best_point(fr: list[tuple], x: float) -> tuple | None:
    """The most faithful point of a front at cost ≤ x."""
    pts = [p for p in fr if p[0] <= x]
    return max(pts, key=lambda p: p[1]) if pts else None


def best_at(fr: list[tuple], x: float) -> float | None:
    """The best fidelity a front reaches at cost ≤ x."""
    p = best_point(fr, x)
    return None if p is None else p[1]


def beyond_noise(hi: str | None, lo: str | None, samples: dict | None) -> bool:
    """Whether variant ``hi`` is more faithful than ``lo`` beyond sampling noise: their per-sample fidelities (the same
    evaluation samples, ``samples`` by variant name) differ by more than ``selection.Z`` standard errors of the paired
    difference. Without per-sample values for both, any difference counts."""
    from edgekit.selection import significantly_better

    if samples is None or hi not in samples or lo not in samples:
        return True
    return significantly_better(1.0 - np.asarray(samples[hi]), 1.0 - np.asarray(samples[lo]))


def _name(point: tuple) -> str | None:
    return point[2] if len(point) > 2 else None


def compare_fronts(bits: list[tuple], joint: list[tuple], *, xtol: float, ytol: float = FID_TOL,
                   samples: dict | None = None) -> dict:
    """Whether the joint front is at least as good as the bits front at every bits point (a joint point with cost
    within ``xtol`` and fidelity within ``ytol``, or not lower beyond sampling noise when ``samples`` holds the points'
    per-sample fidelities) and strictly better somewhere (a joint point that no bits point reaches: fidelity higher by
    more than ``ytol`` and beyond noise at no more cost, or below the cheapest bits cost)."""
    fb, fj = front(bits), front(joint)

    def row(x, key, y, other, y_other):
        return {"x": round(x, 4), key: round(y, 4), other: None if y_other is None else round(y_other, 4)}

    worse = []
    for p in fb:
        q = best_point(fj, p[0] * (1 + xtol))
        if q is None or (q[1] < p[1] - ytol and beyond_noise(_name(p), _name(q), samples)):
            worse.append({**row(p[0], "bits", p[1], "joint", None if q is None else q[1]), "name": _name(p)})
    better = []
    for p in fj:
        q = best_point(fb, p[0])
        if q is None or (p[1] > q[1] + ytol and beyond_noise(_name(p), _name(q), samples)):
            better.append(row(p[0], "joint", p[1], "bits", None if q is None else q[1]))
    return {"bits_front": fb, "joint_front": fj, "joint_worse_at": worse, "joint_better_at": better,
            "at_least_as_good": not worse, "strictly_better_somewhere": bool(better)}


def compare_budgets(results: dict, classification: bool, *, ytol: float = FID_TOL, samples: dict | None = None) -> dict:
    """Per budget, the bits-only and the joint plan as measured: the budget met (latency within LAT_TOL of the
    asked fraction of FP32, size exactly) and the fidelity. The joint space is at least as good at a budget when its
    plan meets the budget whenever the bits-only plan does, with fidelity no more than ``ytol`` lower (or not lower
    beyond sampling noise, with ``samples``: ``beyond_noise``); it is better where it meets a budget the bits-only
    plan misses, or is more faithful by more than ``ytol`` and beyond noise."""
    by_budget: dict[str, dict] = {}
    fsize = results["fp32"]["size_bytes"]
    for name, rec in results.items():
        notes = rec.get("notes", {})
        if notes.get("space") not in ("bits", "joint"):
            continue
        spec = notes["budget"]
        key, _, value = spec.partition("=")
        lat = latency_ratio(rec)
        if key == "latency":
            met = lat is not None and lat <= float(value.rstrip("x")) * (1 + LAT_TOL)
        else:
            met = rec["size_bytes"] <= int(value.rstrip("B"))
        by_budget.setdefault(spec, {})[notes["space"]] = {
            "met": bool(met), "fidelity": _metric(rec, classification), "latency_ratio": lat,
            "size_ratio": round(rec["size_bytes"] / fsize, 4), "name": name}
    rows, worse, better = [], [], []
    for spec, sides in by_budget.items():
        b, j = sides.get("bits"), sides.get("joint")
        row = {"budget": spec, "bits": b, "joint": j}
        if j is None:
            continue
        yj, yb = j["fidelity"] or 0.0, (b or {}).get("fidelity") or 0.0
        if b is not None and b["met"] and (not j["met"] or (yj < yb - ytol and beyond_noise(b["name"], j["name"],
                                                                                              samples))):
            worse.append(spec)
        if j["met"] and (b is None or not b["met"] or (yj > yb + ytol and beyond_noise(j["name"], b["name"],
                                                                                       samples))):
            better.append(spec)
        rows.append(row)
    return {"budgets": rows, "joint_worse_at": worse, "joint_better_at": better,
            "at_least_as_good": not worse, "strictly_better_somewhere": bool(better)}


def _verdicts(cmp: dict) -> dict:
    return {k: cmp[k] for k in ("at_least_as_good", "strictly_better_somewhere", "joint_worse_at", "joint_better_at")}


def paired_latency(results: dict, rows: list, fp32_path: Path, feeds, *, rounds: int, per_round: int) -> None:
    """Each variant's latency as a fraction of FP32, timed in pairs and interleaved: in every one of ``rounds``
    rounds, each distinct artifact runs one block of ``per_round`` calls next to a block of FP32 (the order
    alternating), and a variant's ratio is the median of its blocks' ratios. Pairs cancel the drift of the FP32/INT8
    speed ratio on these shared cores (2x over minutes); interleaving spreads every variant over the same minutes, so
    the drift left does not favour the variants timed first. Identical files (the two spaces often keep the same
    plan) are timed once and share the result."""
    import statistics

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.fsutil import sha256_file

    fp32 = OrtRuntime(fp32_path)
    names: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for p in rows:
        rec = results.get(p.name)
        if rec is None or not p.ok or "error" in rec.get("notes", {}):
            continue
        digest = sha256_file(p.path)
        names.setdefault(digest, []).append(p.name)
        paths.setdefault(digest, Path(p.path))
    runtimes = {d: OrtRuntime(path) for d, path in paths.items()}
    for rt in runtimes.values():
        for _ in range(5):
            rt.run(feeds)
            fp32.run(feeds)

    def block(runtime) -> float:
        times = []
        for _ in range(per_round):
            t0 = time.perf_counter()
            runtime.run(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    ratios: dict[str, list[float]] = {d: [] for d in runtimes}
    a_ms: dict[str, list[float]] = {d: [] for d in runtimes}
    b_ms: dict[str, list[float]] = {d: [] for d in runtimes}
    for r in range(rounds):
        for i, (d, rt) in enumerate(runtimes.items()):
            if (r + i) % 2:
                a, b = block(rt), block(fp32)
            else:
                b, a = block(fp32), block(rt)
            a_ms[d].append(a)
            b_ms[d].append(b)
            ratios[d].append(a / b)
    for d, group in names.items():
        for name in group:
            results[name]["latency_paired"] = {
                "ratio_vs_fp32": round(statistics.median(ratios[d]), 4),
                "ratio_p25": round(float(np.percentile(ratios[d], 25)), 4),
                "ratio_p75": round(float(np.percentile(ratios[d], 75)), 4),
                "median_ms": round(statistics.median(a_ms[d]), 4),
                "fp32_median_ms": round(statistics.median(b_ms[d]), 4), "blocks": rounds,
                "calls_per_block": per_round, "same_file_as": [n for n in group if n != name]}


def latency_ratio(rec: dict) -> float | None:
    """Latency as a fraction of FP32 (``paired_latency``; 1.0 for FP32 itself)."""
    if rec.get("name") == "fp32":
        return 1.0
    return (rec.get("latency_paired") or {}).get("ratio_vs_fp32")


def _metric(rec: dict, classification: bool) -> float | None:
    return rec.get("top1_agreement") if classification else rec.get("mean_cosine")


def run_model(name: str, work: Path, ctx, *, rounds: int, per_round: int, target: str = "cpu-x86",
              importance: str = "activations") -> dict:
    from benchmarks.measure import evaluate

    t0 = time.perf_counter()
    prep, model, layers = prepare(name, work, ctx)
    allocs, common = allocators(prep, model, layers, work, ctx, target, importance)
    fp32_size = Path(prep.fp32_path).stat().st_size
    specs = budget_specs(name, fp32_size)
    rows = plan_rows(allocs, specs) + [uniform_row(allocs, prep, common, work, ctx)]
    extra = _issue_checks(name, prep, model, layers, allocs, common, work, ctx) if name == "efficientnet" else []
    eval_feeds = prep.evaluation.feeds()
    results = evaluate(rows + extra, prep.fp32_path, eval_feeds, classification=prep.classification, per_sample=True)
    samples = per_sample(results)
    follow = follow_up_specs(results, prep.classification, samples, specs)
    if follow:
        log.info("%s: the joint size front misses bits-only points on the grid; follow-up budgets %s", name, follow)
        more = plan_rows(allocs, follow, follow_up=True)
        results.update(evaluate(more, prep.fp32_path, eval_feeds, classification=prep.classification,
                                per_sample=True))
        rows += more
        samples = per_sample(results)
    paired_latency(results, rows + extra, prep.fp32_path, eval_feeds[0], rounds=rounds, per_round=per_round)
    # each space's plans, and in both fronts the two plans both spaces contain and start from (ANCHORS)
    pts = front_points(results, prep.classification)
    grid = front_points(results, prep.classification, grid_only=True)
    fronts = {}
    for axis in ("latency", "size"):
        xtol = LAT_TOL if axis == "latency" else 0.0
        fronts[axis] = compare_fronts(pts["bits"][axis], pts["joint"][axis], xtol=xtol, samples=samples)
        fronts[axis]["strict"] = _verdicts(compare_fronts(pts["bits"][axis], pts["joint"][axis], xtol=xtol))
        fronts[axis]["grid_only"] = _verdicts(compare_fronts(grid["bits"][axis], grid["joint"][axis], xtol=xtol,
                                                             samples=samples))
    out = {"model": name, "target": target, "channel_importance": importance, "description": prep.description,
           "classification": prep.classification, "variants": results,
           "seconds": round(time.perf_counter() - t0, 1), "fronts": fronts, "follow_up_budgets": follow}
    out["by_budget"] = compare_budgets(results, prep.classification, samples=samples)
    out["by_budget"]["strict"] = _verdicts(compare_budgets(results, prep.classification))
    if name == "efficientnet":
        out["checks"] = _issue_verdicts(results)
    return out


def uniform_row(allocs, prep, common, work: Path, ctx):
    """The allocator's uniform INT8 plan as a row (``uniform int8``): every allocation of both spaces starts from it."""
    from edgekit.mixed import apply_plan

    t = allocs["joint"].t
    art = apply_plan(t.uniform, common["fp32"], prep.calib, work / "uniform-int8.onnx", common["cfg"], ctx,
                     t.quantizer)
    return P.Peer("uniform int8", Path(art.path), art.size, {"tool": "edgekit uniform"})


def _issue_checks(name, prep, model, layers, allocs, common, work: Path, ctx) -> list:
    """Structured pruning alone for 1.3x at FP32 and at INT8, ORT's quantize_static, and the joint space at
    latency=0.4x (already among the rows, as is uniform INT8)."""
    from edgekit.joint import JointAllocator
    from edgekit.plan import tolerance_class
    from edgekit.tables import parse_budget
    from edgekit.verify import run_artifact, verify_artifact

    rows = []
    t = allocs["joint"].t
    reference = run_artifact(common["fp32"], prep.evaluation, ctx)
    rows += [p for p in P.build_peers(prep.fp32_path, prep.calib.feeds(), work / "peers", family="cnn",
                                      only=["ort-static"])]
    for label, precision, opts, kinds in PRUNING_CHECKS:
        options = {layer.name: opts for layer in layers}
        # the allocators share what was timed: uniform INT8's pooled ratio sets the INT8 budget and judges it
        shared = allocs["joint"].measured
        alloc = JointAllocator(**common, work=work / f"prune-{label}", structure=kinds, options=options,
                               measurements=shared)
        base = 1.0 if precision == "fp32" else _int8_ratio(common, t, prep, shared)
        spec = f"latency={base / SPEEDUP:.4f}x"
        plan, analysis = alloc.allocate(parse_budget([spec]), tag=f"prune{label}")
        art = analysis["applied"][1]
        tol = tolerance_class(plan)
        report = verify_artifact(art, prep.evaluation, reference, tolerances=common["profile"].tolerance_for(tol),
                                 tolerance_class=tol, classification=prep.classification, ctx=ctx)
        # the allocator may keep the unpruned plan when it meets the budget as measured (a noisy base ratio can make
        # the budget loose enough): say how many layers the kept plan prunes
        pruned = sum(1 for c in plan.layers if "+ch" in c.option or c.option == "drop")
        rows.append(P.Peer(f"pruned {label} for {SPEEDUP}x", Path(art.path), art.size,
                           {"budget": spec, "pruned_layers": pruned, "structure": sorted(kinds),
                            "options": {c.layer: c.option for c in plan.layers},
                            "rounds": analysis["latency_rounds"], "verification": report.summary(),
                            "top1_by_source": report.outputs[0].top1_by_group if report.outputs else None,
                            "verified": report.passed, "tolerance_class": tol}))
    return rows


def _int8_ratio(common, t, prep, shared) -> float:
    """Uniform INT8's latency as a fraction of FP32: the median of the allocations' timings (timed now if none)."""
    from edgekit.agent.runtime import OrtRuntime, compare_latency
    from edgekit.selection import plan_key

    key = plan_key(t.uniform)
    if shared.ratio(key) is None:
        feeds = {k: v[:1] for k, v in prep.calib.inputs.items()}
        stats = compare_latency({"fp32": OrtRuntime(common["fp32"].path), "plan": OrtRuntime(t.uniform_artifact.path)},
                                feeds, rounds=10, per_round=10)
        shared.add_ratio(key, stats["plan"].median_ms / stats["fp32"].median_ms)
    return shared.ratio(key)


def _issue_verdicts(results: dict) -> dict:
    def ratio(name):
        return latency_ratio(results.get(name, {}))

    checks = {}
    fp = ratio("pruned fp32 for 1.3x")
    i8, u8 = ratio("pruned int8 for 1.3x"), ratio("uniform int8")
    if fp:
        checks["prune_fp32_speedup"] = round(1 / fp, 3)
    if i8 and u8:
        checks["prune_int8_speedup_vs_uniform_int8"] = round(u8 / i8, 3)
    both = ratio(f"pruned {BLOCKS_LABEL} for {SPEEDUP}x")
    if both:
        checks[f"prune_{BLOCKS_LABEL}_speedup"] = round(1 / both, 3)
    for label, *_ in PRUNING_CHECKS:
        notes = results.get(f"pruned {label} for {SPEEDUP}x", {}).get("notes", {})
        if "pruned_layers" in notes:
            checks[f"prune_{label}_pruned_layers"] = notes["pruned_layers"]
        if "verified" in notes:
            checks[f"prune_{label}_verified"] = notes["verified"]
            checks[f"prune_{label}_verification"] = notes["verification"]
    joint = results.get("joint latency=0.4x", {})
    ort = results.get("ort-static", {})
    if ratio("joint latency=0.4x") is not None:
        checks["joint_0.4x_measured_ratio"] = ratio("joint latency=0.4x")
        checks["joint_0.4x_within_15pct"] = ratio("joint latency=0.4x") <= 0.4 * 1.15
    if joint.get("top1_agreement") is not None and ort.get("top1_agreement") is not None:
        checks["joint_0.4x_top1"] = joint["top1_agreement"]
        checks["ort_int8_top1"] = ort["top1_agreement"]
        checks["joint_0.4x_top1_within_5pts"] = joint["top1_agreement"] >= ort["top1_agreement"] - 0.05
    return checks


def plots(res: dict, prefix: str) -> list[Path]:
    from edgekit.svgplot import scatter_svg

    written = []
    for axis, key, xlabel in (("latency", "latency_paired", "latency x FP32 (batch 1, paired with FP32)"),
                              ("size", None, "size x FP32")):
        series = {"bits-only space": [], "joint space": [], "references": []}
        for vname, rec in res["variants"].items():
            y = _metric(rec, res["classification"])
            x = latency_ratio(rec) if key else rec.get("size_ratio_vs_fp32")
            if y is None or x is None or vname == "fp32":
                continue
            space = rec.get("notes", {}).get("space")
            group = {"bits": "bits-only space", "joint": "joint space"}.get(space, "references")
            series[group].append((x, y, vname.split(" ", 1)[-1] if space else vname))
        svg = scatter_svg([{"name": g, "points": pts, "marker": m} for (g, pts), m in
                           zip(series.items(), ("square", "circle", "triangle"), strict=True) if pts],
                          title=f"{res['model']}: {'top-1 agreement' if res['classification'] else 'cosine'} vs "
                                f"{axis}", x_label=xlabel,
                          y_label="top-1 agreement with FP32" if res["classification"] else "mean cosine to FP32")
        path = Path(f"{prefix}_{res['model']}_{axis}.svg")
        path.write_text(svg)
        written.append(path)
    return written


def summary(res: dict) -> str:
    lines = [f"## {res['model']} ({res['seconds']:.0f} s)"]
    cmp = res["by_budget"]
    strict = cmp.get("strict", cmp)
    lines.append(f"- per budget: joint at least as good at every budget: {cmp['at_least_as_good']} (worse at "
                 f"{cmp['joint_worse_at']}); strictly better at {cmp['joint_better_at']}; strict (no noise test): "
                 f"{strict['at_least_as_good']}, worse at {strict['joint_worse_at']}")
    for axis, cmp in res["fronts"].items():
        strict = cmp.get("strict", cmp)
        lines.append(f"- {axis}: joint at least as good everywhere: {cmp['at_least_as_good']}; strictly better "
                     f"somewhere: {cmp['strictly_better_somewhere']} (better at {cmp['joint_better_at'][:4]}; worse "
                     f"at {cmp['joint_worse_at'][:4]}); strict (no noise test): {strict['at_least_as_good']}, "
                     f"worse at {strict['joint_worse_at'][:4]}"
                     + (f"; on the grid alone: {cmp['grid_only']['at_least_as_good']}" if "grid_only" in cmp else ""))
    if res.get("follow_up_budgets"):
        lines.append(f"- follow-up budgets (bits-only points the joint size front missed on the grid): "
                     f"{res['follow_up_budgets']}")
    for k, v in res.get("checks", {}).items():
        lines.append(f"- {k}: {v}")
    for vname, rec in res["variants"].items():
        lat = latency_ratio(rec)
        y = _metric(rec, res["classification"])
        kinds = rec.get("notes", {}).get("kinds", "")
        lines.append(f"  {vname:32s} size {rec.get('size_ratio_vs_fp32', 0):.3f}x  latency "
                     f"{'-' if lat is None else f'{lat:.3f}x'}  fidelity {'-' if y is None else f'{y:.4f}'}  {kinds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", choices=["all", "digits", "efficientnet", "minilm"])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--svg", help="write PREFIX_<model>_latency.svg and PREFIX_<model>_size.svg")
    ap.add_argument("--rounds", type=int, default=30, help="paired blocks per variant")
    ap.add_argument("--per-round", type=int, default=4, help="calls per block")
    ap.add_argument("--quick", action="store_true", help="one latency and one size budget per model (for tests)")
    ap.add_argument("--target", default="cpu-x86", choices=["cpu-x86", "cpu-x86-edgekit"],
                    help="profile the plans are made for: cpu-x86-edgekit runs int8 depthwise convs, the stem and "
                         "weight-only layers in edgekit's native ONNX Runtime kernels (default: plain ONNX Runtime)")
    ap.add_argument("--importance", default="activations", choices=["activations", "batchnorm"],
                    help="how channel pruning ranks channels (edgekit build --channel-importance)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgekit.context import Context

    if args.quick:
        for table in (LATENCY, SIZE):
            for k in table:
                table[k] = table[k][-1:]
    ctx = Context(progress=False)
    names = ["digits", "efficientnet", "minilm"] if args.model == "all" else [args.model]
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-joint-bench-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir(parents=True)
            results[name] = run_model(name, work, ctx, rounds=args.rounds, per_round=args.per_round,
                                      target=args.target, importance=args.importance)
            print(summary(results[name]), flush=True)
            if args.svg:
                for p in plots(results[name], args.svg):
                    print(f"wrote {p}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["benchmarks/joint_space.py", *(argv or sys.argv[1:])]),
                                         "environment": P.environment(), "results": results}, indent=1,
                                        default=str) + "\n")
        print(f"wrote {args.json}")
    ok = all(r["by_budget"]["at_least_as_good"] and r["by_budget"]["strictly_better_somewhere"]
             for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
