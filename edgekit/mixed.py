"""The allocation sub-pipeline behind ``edgekit build --budget``: quantize once → sensitivity → cost → solve →
build and *measure* → refine.

Per-layer latencies do not add up to a mixed model's latency: every float layer left inside the integer chain
costs layout changes and Quantize/Dequantize around it, which no per-layer timing sees. So a latency budget is
checked on the whole model, measured interleaved with FP32; while it is missed, the measured shortfall is charged
to the float layers in the chain and the plan solved again. Every measured plan is kept (uniform INT8 included):
the least-distortion one that meets the budget wins; if none does, the fastest is kept and the report says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from edgekit.agent.runtime import OrtRuntime, compare_latency
from edgekit.allocate import allocated_plan, fastest_plan, layer_options, uniform_plan
from edgekit.analyze import measure_sensitivity
from edgekit.compress.quant import W8A8Config, quantize_w8a8, quantize_w8a8d
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import ConfigError
from edgekit.export.onnx import describe
from edgekit.iospec import Artifact
from edgekit.plan import Plan
from edgekit.tables import Budget, CostEntry, CostTable

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 32
REFINE_ROUNDS = 3
LATENCY_SLACK = 1.05  # measured within 5 % of the latency budget counts as met


@dataclass(frozen=True)
class Measured:
    plan: Plan
    artifact: Artifact
    ratio: float  # measured latency / FP32's, interleaved in the same run
    distortion: float  # predicted (sum of single-layer distortions)


def apply_plan(plan: Plan, fp32: Artifact, calib: Dataset, out: Path, cfg: W8A8Config, ctx: Context) -> Artifact:
    """The artifact of a plan: the FP32 graph itself, or ORT's quantizer with the plan's float layers excluded."""
    if not plan.is_quantized:
        return fp32
    out.parent.mkdir(parents=True, exist_ok=True)
    if plan.layers_with("w8a8d"):
        if plan.layers_with("w8a8"):
            raise ConfigError("a plan cannot mix static (w8a8) and dynamic (w8a8d) int8 layers yet")
        quantize_w8a8d(fp32.path, out, plan)
    else:
        quantize_w8a8(fp32.path, out, plan, calib, cfg, track=ctx.track)
    return describe(out)


def allocate(*, budget: Budget, solver: str, profile, model, fp32: Artifact, layers, calib: Dataset, work: Path,
             cfg: W8A8Config, ctx: Context) -> tuple[Plan, dict]:
    """Solve for the plan with the least output distortion that meets ``budget``; returns it and the analysis (tables,
    measured rounds, and the artifact already built for it)."""
    from edgekit.cost import HardwareTable, cost_table, layer_geometry

    uniform, q_full, options, sens = _quantize_once(profile, model, fp32, layers, calib, work, cfg, ctx)
    hardware = HardwareTable.for_profile(profile)
    cost = cost_table(layers, profile, options, hardware=hardware,
                      geometry=layer_geometry(fp32.path), bias_correction=cfg.bias_correction)
    solve_budget, notes = _solver_budget(budget, cost, layers, q_full, fp32, calib)
    try:
        plan = allocated_plan(layers, profile, sensitivity=sens, cost=cost, budget=solve_budget, solver=solver,
                              model_sha256=model.sha256, activations=cfg.to_dict())
    except ConfigError as exc:
        if notes.get("latency_ms") is None or solve_budget.size_bytes is not None or budget.avg_bits is not None:
            raise
        log.warning("%s by the cost table; measuring the fastest plans instead", exc.message)
        plan = fastest_plan(layers, profile, cost, model_sha256=model.sha256, activations=cfg.to_dict())
    analysis = {"sensitivity": sens.to_dict(), "hardware_table": profile.hardware_table if hardware else None,
                **notes, "latency_rounds": [], "applied": None}
    uniform_measured = Measured(uniform, q_full, 0.0, _distortion(uniform, sens))
    if notes.get("latency_ms") is not None:
        plan, cost, analysis["latency_rounds"], analysis["applied"] = _refine_for_latency(
            plan, cost, uniform_measured, notes, sens, solve_budget, solver=solver, profile=profile, model=model,
            fp32=fp32, layers=layers, calib=calib, work=work, cfg=cfg, ctx=ctx)
    elif plan.is_quantized:
        plan, analysis["latency_rounds"], analysis["applied"] = _no_regression(
            plan, uniform_measured, sens, fp32=fp32, calib=calib, work=work, cfg=cfg, ctx=ctx)
    analysis["cost"] = cost.to_dict()
    plan = replace(plan, budget={**plan.budget, **budget.to_dict(), **{k: v for k, v in notes.items() if v}})
    return plan, analysis


def _quantize_once(profile, model, fp32, layers, calib, work, cfg, ctx):
    """Uniform INT8 (quantized once: the source of every simulated mix) and the sensitivity table measured from it."""
    uniform = uniform_plan(layers, profile, "int8", model_sha256=model.sha256, activations=cfg.to_dict())
    log.info("quantizing every supported layer once (the source of every simulated mix)")
    q_full = apply_plan(uniform, fp32, calib, work / "uniform-int8.onnx", cfg, ctx)
    metric = "kl" if model.task == "classification" else "mse"
    options = layer_options(layers, profile)
    sens = measure_sensitivity(fp32.path, q_full.path, layers, calib.take(SENSITIVITY_SAMPLES), metric=metric,
                               model_sha256=model.sha256, quantizer=cfg.to_dict(), ctx=ctx, options=options)
    return uniform, q_full, options, sens


def _solver_budget(budget: Budget, cost: CostTable, layers, q_full: Artifact, fp32: Artifact, calib: Dataset):
    """The budget the solver sees. Size: the whole artifact minus the bytes outside the weighted layers (graph,
    activation scales), which no per-layer choice changes. Latency: as a fraction of FP32 measured now, applied to
    the cost table's FP32 layer sum; the table may have been measured under another load, and the unweighted ops
    (Add, pooling) speed up with their neighbours, so ratios carry over where absolute milliseconds do not."""
    notes: dict = {"other_bytes": 0, "latency_ms": None, "fp32_ms": None}
    size = budget.size_bytes
    if size is not None:
        weights = sum(min(e.bytes for e in cost.entries[layer.name].values()) for layer in layers)
        notes["other_bytes"] = max(0, q_full.size - weights)
        size -= notes["other_bytes"]
        if size <= 0:
            raise ConfigError(f"size budget {budget.size_bytes} B is below the {notes['other_bytes']} B the model "
                              "needs besides its weights")
    latency = None
    if budget.latency_ms is not None or budget.latency_ratio is not None:
        feeds = {k: v[:1] for k, v in calib.inputs.items()}
        whole = compare_latency({"fp32": OrtRuntime(fp32.path)}, feeds, rounds=3, per_round=20)["fp32"].median_ms
        target = budget.latency_ms if budget.latency_ms is not None else budget.latency_ratio * whole
        layers_ms = sum(cost.entries[layer.name]["fp32"].latency_ms for layer in layers)
        notes.update(fp32_ms=round(whole, 4), latency_ms=round(target, 4))
        latency = target / whole * layers_ms
        log.info("latency budget %.3f ms = %.2fx FP32 (which measures %.3f ms now); solving for %.3f ms of the "
                 "cost table's %.3f ms of layers", target, target / whole, whole, latency, layers_ms)
    return Budget(size_bytes=size, latency_ms=latency, avg_bits=budget.avg_bits), notes


NO_REGRESSION_SLACK = 1.05  # measurement noise allowed before a plan counts as slower than FP32


def _no_regression(plan, uniform: Measured, sens, *, fp32, calib, work, cfg, ctx):
    """Size/bit budgets say nothing of latency, but a compressed model slower than FP32 is never the answer: measure
    the plan beside FP32 and uniform INT8 (which meets any size or bit budget the plan meets); if the plan is slower
    than FP32 and uniform INT8 is not, ship uniform INT8."""
    artifact = apply_plan(plan, fp32, calib, work / "solved" / "model.onnx", cfg, ctx)
    feeds = {k: v[:1] for k, v in calib.inputs.items()}
    stats = compare_latency({"fp32": OrtRuntime(fp32.path), "plan": OrtRuntime(artifact.path),
                             "uniform": OrtRuntime(uniform.artifact.path)}, feeds, rounds=3, per_round=15)
    ratio = stats["plan"].median_ms / stats["fp32"].median_ms
    uniform_ratio = stats["uniform"].median_ms / stats["fp32"].median_ms
    record = {"round": 0, "measured_ratio_to_fp32": round(ratio, 4), "uniform_int8_ratio": round(uniform_ratio, 4),
              "check": "no regression vs FP32"}
    log.info("solved plan measures %.2fx FP32, uniform INT8 %.2fx", ratio, uniform_ratio)
    if ratio > NO_REGRESSION_SLACK and uniform_ratio < ratio and uniform_ratio <= NO_REGRESSION_SLACK:
        log.warning("the solved plan measures %.2fx FP32 (slower); shipping uniform INT8 (%.2fx) instead, which "
                    "also meets the budget", ratio, uniform_ratio)
        record["kept"] = "uniform int8"
        reason = f"uniform INT8: the solved plan measured {ratio:.2f}x FP32, slower; this one {uniform_ratio:.2f}x"
        uniform_plan_ = replace(uniform.plan, solver=f"{plan.solver}→no-regression",
                                notes=(*uniform.plan.notes, reason))
        return uniform_plan_, [record], (uniform_plan_.layers, uniform.artifact)
    if ratio > NO_REGRESSION_SLACK:
        log.warning("the solved plan measures %.2fx FP32 and no compressed plan is faster here", ratio)
    return plan, [record], (plan.layers, artifact)


def _distortion(plan: Plan, sens) -> float:
    return sum(sens.values[c.layer].get(c.option, 0.0) for c in plan.layers)


def _refine_for_latency(plan, cost, uniform: Measured, notes, sens, solve_budget, *, solver, profile, model, fp32,
                        layers, calib, work, cfg, ctx):
    feeds = {k: v[:1] for k, v in calib.inputs.items()}
    base = OrtRuntime(fp32.path)
    measured: list[Measured] = []
    rounds: list[dict] = []
    penalty = 0.0
    for k in range(REFINE_ROUNDS):
        artifact = apply_plan(plan, fp32, calib, work / f"refine{k}" / "model.onnx", cfg, ctx)
        runtimes = {"fp32": base, "plan": OrtRuntime(artifact.path)}
        if k == 0:
            runtimes["uniform"] = OrtRuntime(uniform.artifact.path)
        stats = compare_latency(runtimes, feeds, rounds=3, per_round=15)
        ratio = stats["plan"].median_ms / stats["fp32"].median_ms
        target = notes["latency_ms"] / notes["fp32_ms"]
        if k == 0:
            uniform = replace(uniform, ratio=stats["uniform"].median_ms / stats["fp32"].median_ms)
            measured.append(uniform)
        measured.append(Measured(plan, artifact, ratio, _distortion(plan, sens)))
        islands = [c.layer for c in plan.layers if c.option == "fp32" and len(cost.entries[c.layer]) > 1]
        rounds.append({"round": k, "measured_ratio_to_fp32": round(ratio, 4), "budget_ratio": round(target, 4),
                       "uniform_int8_ratio": round(uniform.ratio, 4), "float_layers_in_chain": len(islands),
                       "island_penalty_ms": round(penalty, 5)})
        log.info("allocation round %d: plan measures %.2fx FP32 (uniform INT8 %.2fx) against a budget of %.2fx; "
                 "%d float layers in the integer chain", k, ratio, uniform.ratio, target, len(islands))
        if ratio <= target * LATENCY_SLACK or not islands:
            break
        predicted = sum(cost.entries[c.layer][c.option].latency_ms for c in plan.layers)
        measured_layers = ratio * sum(cost.entries[c.layer]["fp32"].latency_ms for c in plan.layers)
        penalty += max(0.0, (measured_layers - predicted) / len(islands))
        cost = CostTable(target=cost.target, entries={
            name: {o: (CostEntry(e.bytes, e.latency_ms + penalty, f"{e.source}+island{penalty:.3f}ms")
                       if o == "fp32" and len(row) > 1 else e) for o, e in row.items()}
            for name, row in cost.entries.items()})
        try:
            plan = allocated_plan(layers, profile, sensitivity=sens, cost=cost, budget=solve_budget, solver=solver,
                                  model_sha256=model.sha256, activations=cfg.to_dict())
        except ConfigError:
            log.info("charging float islands %.3f ms each makes the budget infeasible for the solver", penalty)
            break
    target = notes["latency_ms"] / notes["fp32_ms"]
    meeting = [m for m in measured if m.ratio <= target * LATENCY_SLACK and m.ratio <= 1.0]
    if meeting:
        best = min(meeting, key=lambda m: m.distortion)
    else:
        best = min(measured, key=lambda m: m.ratio)
        log.warning("no plan met the latency budget of %.2fx FP32 as measured; keeping the fastest found (%.2fx)",
                    target, best.ratio)
        rounds.append({"budget_met": False, "kept_ratio": round(best.ratio, 4)})
    if best.plan is uniform.plan:
        log.info("uniform INT8 is the best measured plan for this budget")
    return best.plan, cost, rounds, (best.plan.layers, best.artifact)


def verified_drop(report) -> float:
    """The quality lost, as verified on held-out data: accuracy drop when labels exist, else 1 − top-1 agreement
    for classifiers, else 1 − cosine (rounded to 1e-6, so float round-off of an unchanged model counts as 0)."""
    if report.accuracy_drop is not None:
        return round(max(0.0, report.accuracy_drop), 6)
    if not report.outputs:
        return 1.0
    out = report.outputs[0]
    return round(max(0.0, 1.0 - (out.top1_agreement if out.top1_agreement is not None else out.cosine)), 6)


def search_max_drop(*, max_drop: float, profile, model, fp32: Artifact, layers, calib: Dataset, evald: Dataset,
                    reference, work: Path, cfg: W8A8Config, ctx: Context) -> tuple[Plan, dict]:
    """The most compressed plan on the path uniform INT8 → FP32 whose verified drop is within ``max_drop``.

    Layers go back to float in order of output distortion per byte saved (the worst trade first); the number kept
    float is found by bisection, each step a real build verified on the held-out data.
    """
    from edgekit.allocate import precision_label
    from edgekit.plan import LayerChoice
    from edgekit.verify import verify_artifact

    uniform, q_full, _, sens = _quantize_once(profile, model, fp32, layers, calib, work, cfg, ctx)
    from edgekit.cost import layer_bytes

    quantized = [c.layer for c in uniform.layers if c.option == "w8a8"]
    by_name = {layer.name: layer for layer in layers}

    def harm(name: str) -> float:  # distortion per byte saved by quantizing this layer
        saved = layer_bytes(by_name[name], "fp32") - layer_bytes(by_name[name], "w8a8")
        return sens.values[name]["w8a8"] / max(saved, 1)

    order = sorted(quantized, key=harm, reverse=True)
    tried: dict[int, tuple[Plan, Artifact, float, bool]] = {}

    def plan_for(k: int) -> Plan:
        back = set(order[:k])
        choices = tuple(
            LayerChoice(c.layer, "fp32", f"fp32: among the {k} layers with the most distortion per byte saved, kept "
                                         f"float to stay within a verified drop of {max_drop:.2%}")
            if c.layer in back else
            (LayerChoice(c.layer, c.option, f"w8a8: quantized; the verified drop stays within {max_drop:.2%}")
             if c.option == "w8a8" else c)
            for c in uniform.layers)
        return replace(uniform, layers=choices, precision=precision_label(choices), solver="max-drop",
                       budget={"max_drop": max_drop})

    def evaluate(k: int) -> float:
        plan = plan_for(k)
        artifact = q_full if k == 0 else apply_plan(plan, fp32, calib, work / f"drop{k}" / "model.onnx", cfg, ctx)
        tol_class = "int8" if plan.is_quantized else "fp32"
        report = verify_artifact(artifact, evald, reference, tolerances=profile.tolerance_for(tol_class),
                                 tolerance_class=tol_class, classification=model.task == "classification", ctx=ctx)
        drop = verified_drop(report)
        ok = report.passed and drop <= max_drop
        tried[k] = (plan, artifact, drop, ok)
        log.info("max-drop search: %d of %d layers back to float -> verified drop %.2f%%%s", k, len(order),
                 100 * drop, "" if report.passed else " (fails the target's tolerances)")
        return ok

    lo, hi = 0, len(order)  # hi: everything float (checked below, not assumed)
    if evaluate(0):
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if mid == 0:
            lo = 1
            continue
        if evaluate(mid):
            hi = mid
        else:
            lo = mid + 1
    if hi not in tried:
        evaluate(hi)
    plan, artifact, drop, ok = tried[hi]
    if not ok:
        raise ConfigError(f"no plan meets --max-drop {max_drop:.2%}: even {hi} of {len(order)} layers in float "
                          f"lose {drop:.2%} on the held-out data", hint="allow a larger drop")
    analysis = {"sensitivity": sens.to_dict(), "cost": {"target": profile.name, "entries": {}}, "hardware_table": None,
                "latency_rounds": [{"max_drop": max_drop, "float_layers": hi, "verified_drop": round(drop, 5),
                                    "tried": {str(k): round(v[2], 5) for k, v in sorted(tried.items())}}],
                "applied": (plan.layers, artifact)}
    return plan, analysis
