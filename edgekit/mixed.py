"""The allocation sub-pipeline behind ``edgekit build --budget``: quantize once → sensitivity → cost → solve →
build and *measure* → refine.

Per-layer latencies do not add up to a mixed model's latency: every float layer left inside the integer chain
costs layout changes and Quantize/Dequantize around it, which no per-layer timing sees. So a latency budget is
checked on the whole model, measured interleaved with FP32; while it is missed, the measured shortfall is charged
to the float layers in the chain and the plan solved again. Every measured plan is kept (uniform INT8 included):
the least-distortion one that meets the budget wins; if none does, the fastest is kept and the report says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgekit.agent.runtime import OrtRuntime, compare_latency
from edgekit.allocate import allocated_plan, fastest_plan, layer_options, quant_family, uniform_plan
from edgekit.analyze import measure_sensitivity
from edgekit.compress.quant import DYNAMIC_SETTINGS, W8A8Config, quantize_w8a8, quantize_w8a8d
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import ConfigError
from edgekit.export.onnx import describe
from edgekit.iospec import Artifact
from edgekit.plan import LayerChoice, Plan, parse_option, tolerance_class
from edgekit.tables import Budget, CostEntry, CostTable, SensitivityTable
from edgekit.wonly import LowBitQuantizer, WeightOnlyConfig, is_feed_option, measure_feed_sensitivity, weight_only

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 32
# Output distortion for the sensitivity tables: mean squared error of the logits (or outputs) over their mean square,
# for classifiers too. KL of the softmax under-weights argmax flips on low-confidence inputs: on EfficientNet-Lite0
# at --budget size=5MB, the KL-driven plan gave the classifier 2-bit weights (KL 1e-4) and kept 75 % top-1 agreement;
# the logit-MSE-driven plan at the same size kept 95.3 % (benchmarks/RESULTS.md).
SENSITIVITY_METRIC = "mse"
FEED_SENSITIVITY_SAMPLES = 16  # weight-only/dynamic sensitivities: two model runs per layer on these samples
REFINE_ROUNDS = 3
LATENCY_SLACK = 1.05  # measured within 5 % of the latency budget counts as met


@dataclass(frozen=True)
class Measured:
    plan: Plan
    artifact: Artifact
    ratio: float  # measured latency / FP32's, interleaved in the same run
    distortion: float  # predicted (sum of single-layer distortions)


def apply_plan(plan: Plan, fp32: Artifact, calib: Dataset, out: Path, cfg: W8A8Config, ctx: Context,
               quantizer: LowBitQuantizer | None = None, *, edgekit_kernels: bool | None = None,
               keep_qdq: Path | None = None) -> Artifact:
    """The artifact of a plan: the FP32 graph itself; or ORT's static or dynamic int8 quantizer on the plan's int8
    layers (the others excluded), then the weight-only layers rewritten to low-bit kernels (``export.lowbit``):
    ``ai.edgekit`` ops when ``edgekit_kernels`` (default: when the plan's target profile lists the domain). With
    those kernels, linear layers with 2:4 weights and int8 activations become ``ai.edgekit::MatMulSparse24`` on
    dynamically quantized activations (``export.ort_sparse``), static ``w8a8`` ones included, and static ``w8a8``
    depthwise and small-reduction convolutions ``ai.edgekit::QLinearDepthwiseConv`` / ``QLinearConvDirect``
    (``export.ort_qconv``, bit-exact). ``keep_qdq``: where to keep the quantized graph as ONNX Runtime's quantizer
    wrote it, before any of those rewrites (only written when the artifact differs from it; the simulated mixes of
    ``compress.qdq`` read layers in that form)."""
    if not plan.is_quantized:
        return fp32
    out.parent.mkdir(parents=True, exist_ok=True)
    native = edgekit_ops(plan.target) if edgekit_kernels is None else edgekit_kernels
    sparse = _sparse24_int8(plan) if native else set()
    if plan.is_structural:  # prune / factorize / drop the float graph first, then quantize the result
        fp32, plan = structural_step(plan, fp32, calib, out, ctx)
        quantizer = None
        if not plan.is_quantized:
            os.replace(fp32.path, out)
            return describe(out)
    if sparse:  # linear 2:4 int8 layers run as ai.edgekit::MatMulSparse24 (1x1 convs stay dense int8)
        import onnx

        from edgekit.export.ort_sparse import rewritable

        g = onnx.load(str(fp32.path)).graph
        inits = {i.name: i for i in g.initializer}
        sparse = {n.name for n in g.node if n.name in sparse and rewritable(n, inits)}
    wonly = {c.layer: c.option for c in plan.layers if weight_only(c.option)}
    own = set(wonly) | sparse  # layers edgekit writes itself; ONNX Runtime's int8 quantizer leaves them float
    int8 = replace(plan, layers=tuple(LayerChoice(c.layer, "fp32", c.reason) if c.layer in own else c
                                      for c in plan.layers)) if own else plan
    base = Path(fp32.path)
    qconvs = int8.layers_with("w8a8") if native else []  # static int8 convs ai.edgekit runs faster (ort_qconv)
    rewrite = bool(own or qconvs)
    if int8.is_quantized:
        base = out.with_name(out.stem + ".int8.onnx") if rewrite else out
        if int8.layers_with("w8a8d"):
            if int8.layers_with("w8a8"):
                raise ConfigError("a plan cannot mix static (w8a8) and dynamic (w8a8d) int8 layers")
            quantize_w8a8d(fp32.path, base, int8)
        else:
            quantize_w8a8(fp32.path, base, int8, calib, cfg, track=ctx.track)
    if rewrite:
        import onnx

        model = onnx.load(str(base))
        if qconvs:
            from edgekit.export.ort_qconv import apply_qconv

            model, _ = apply_qconv(model, qconvs)
        if sparse:
            from edgekit.export.ort_sparse import apply_sparse24

            model = apply_sparse24(model, sorted(sparse))
        if wonly:
            from edgekit.export.lowbit import apply_weight_only

            if quantizer is None:
                quantizer = plan_quantizer(plan, fp32, calib, ctx, layers=list(wonly))
            weights = {n: quantizer.qweight(n, o) for n, o in wonly.items()}
            # this artifact runs in ONNX Runtime (TensorRT exports rewrite their own copy), whose native library
            # has the fused-activation epilogue
            model = apply_weight_only(model, weights, accuracy_level=quantizer.config.accuracy_level,
                                      edgekit_ops=native, fuse_activations=native)
        onnx.save(model, str(out))
        if base != Path(fp32.path):
            if keep_qdq is not None:
                os.replace(base, keep_qdq)
            else:
                base.unlink(missing_ok=True)
    return describe(out)


def _sparse24_int8(plan: Plan) -> set[str]:
    """The plan's layers with 2:4 weights and int8 activations (``sparse2:4+w8a8``, ``sparse2:4+w8a8d``)."""
    return {c.layer for c in plan.layers
            if (p := parse_option(c.option)).sparsity == "sparse2:4" and p.base in ("w8a8", "w8a8d")}


def edgekit_ops(target: str) -> bool:
    """Whether ``target``'s runtime carries the native ``ai.edgekit`` kernels (its profile lists the domain in
    ``custom_op_domains``): then weight-only layers export as ``ai.edgekit::MatMulLowBit``."""
    from edgekit.targets import load_target

    try:
        return load_target(target).edgekit_kernels
    except ConfigError:  # a plan for a profile this machine does not have: the portable ops
        return False


def structural_step(plan: Plan, fp32: Artifact, calib: Dataset, out: Path, ctx: Context) -> tuple[Artifact, Plan]:
    """The edited float graph (``edgekit.structure``) beside ``out`` and the precision-only plan over its layers."""
    import onnx

    from edgekit.structure import apply_structure

    settings = plan.activations.get("structure", {})
    model, precision_plan, summary = apply_structure(Path(fp32.path), plan, calib,
                                                     recover_steps=int(settings.get("recover_steps", 0)),
                                                     importance=settings.get("importance", "activations"))
    if any(parse_option(c.option).eora for c in plan.layers):  # the errors of the edited graph's low-bit weights
        from edgekit.fsutil import sha256_bytes
        from edgekit.structure import add_eora

        kept = tuple(c for c in plan.layers if parse_option(c.option).base != "drop")
        model, summary["eora"] = add_eora(model, replace(plan, layers=kept), calib, ctx,
                                          model_sha256=sha256_bytes(model.SerializeToString()))
    log.info("structure: %s", summary)
    from edgekit.fsutil import atomic_write_text

    atomic_write_text(structure_summary_path(out), json.dumps(summary, indent=1) + "\n")
    path = structure_model_path(out)
    onnx.save(model, str(path))
    edited = describe(path)
    return edited, replace(precision_plan, model_sha256=edited.sha256)


def structure_summary_path(artifact: Path) -> Path:
    """Where ``apply_plan`` records what the structural half of a plan did to the graph (for the report)."""
    return Path(artifact).with_name(Path(artifact).stem + ".structure.json")


def structure_model_path(artifact: Path) -> Path:
    """Where ``apply_plan`` keeps a structural plan's edited *float* graph, the one it then quantized (a plan with no
    quantized layer has none: its artifact is that graph)."""
    return Path(artifact).with_name(Path(artifact).stem + ".structure.onnx")


def plan_quantizer(plan: Plan, fp32: Artifact, calib: Dataset, ctx: Context, *, layers: list[str]) -> LowBitQuantizer:
    """The weight-only quantizer a plan records (``activations['weight_only']``) for its ``layers``."""
    import onnx

    from edgekit.inventory import layer_inventory

    model = onnx.load(str(fp32.path))
    infos = [layer for layer in layer_inventory(model) if layer.name in set(layers)]
    config = WeightOnlyConfig.from_dict(plan.activations.get("weight_only"))
    return LowBitQuantizer(model, infos, calib, config, model_sha256=plan.model_sha256, ctx=ctx)


def allocate(*, budget: Budget, solver: str, profile, model, fp32: Artifact, layers, calib: Dataset, work: Path,
             cfg: W8A8Config, ctx: Context) -> tuple[Plan, dict]:
    """Solve for the plan with the least output distortion that meets ``budget``; returns it and the analysis (tables,
    measured rounds, and the artifact already built for it)."""
    from edgekit.cost import HardwareTable, cost_table, layer_geometry

    t = _tables(profile, model, fp32, layers, calib, work, cfg, ctx)
    hardware = HardwareTable.for_profile(profile)
    cost = cost_table(layers, profile, t.options, hardware=hardware,
                      geometry=layer_geometry(fp32.path), bias_correction=cfg.bias_correction)
    solve_budget, notes = _solver_budget(budget, cost, t.uniform, t.uniform_artifact, fp32, calib)
    settings = _settings(t)
    build = t.build
    try:
        plan = allocated_plan(layers, profile, sensitivity=t.sens, cost=cost, budget=solve_budget, solver=solver,
                              model_sha256=model.sha256, activations=settings, evaluate=t.evaluate)
    except ConfigError as exc:
        if notes.get("other_bytes"):
            exc.message += (f" (of the size budget, {notes['other_bytes']} B go to what no layer choice changes: "
                            "the graph, activation scales, norms)")
        if notes.get("latency_ms") is None or solve_budget.size_bytes is not None or budget.avg_bits is not None:
            raise
        log.warning("%s by the cost table; measuring the fastest plans instead", exc.message)
        plan = fastest_plan(layers, profile, cost, model_sha256=model.sha256, activations=settings)
    analysis = {"sensitivity": t.sens.to_dict(), "hardware_table": profile.hardware_table if hardware else None,
                "family": t.family, **notes, "latency_rounds": [], "applied": None}
    uniform_measured = Measured(t.uniform, t.uniform_artifact, 0.0, _distortion(t.uniform, t.sens))
    if notes.get("latency_ms") is not None:
        plan, cost, analysis["latency_rounds"], analysis["applied"] = _refine_for_latency(
            plan, cost, uniform_measured, notes, t.sens, solve_budget, solver=solver, profile=profile, model=model,
            fp32=fp32, layers=layers, calib=calib, work=work, build=build, settings=settings)
    elif plan.is_quantized:
        plan, analysis["latency_rounds"], analysis["applied"] = _no_regression(
            plan, uniform_measured, t.sens, cost, solve_budget, solver=solver, profile=profile, model=model,
            layers=layers, fp32=fp32, calib=calib, work=work, build=build, settings=settings, evaluate=t.evaluate)
    analysis["cost"] = cost.to_dict()
    analysis["pareto"] = _pareto(layers, profile, model, t, cost, plan)
    plan = replace(plan, budget={**plan.budget, **budget.to_dict(), **{k: v for k, v in notes.items() if v}})
    return plan, analysis


@dataclass
class _Tables:
    family: str
    options: dict
    uniform: Plan
    uniform_artifact: Artifact
    sens: SensitivityTable
    quantizer: LowBitQuantizer | None
    build: object  # (plan, path) -> Artifact
    evaluate: object  # measured scorer for evo, or None
    cfg: W8A8Config


def _pareto(layers, profile, model, t: _Tables, cost: CostTable, plan: Plan) -> dict:
    """The tables' predicted front with FP32, uniform int8, uniform 4-bit (where layers take it) and the plan marked."""
    from edgekit.allocate import pareto_sweep

    plans = {"FP32": uniform_plan(layers, profile, "fp32", model_sha256=model.sha256), "uniform int8": t.uniform}
    four = tuple(LayerChoice(c.layer, "w4g32" if "w4g32" in t.options[c.layer] else c.option) for c in t.uniform.layers)
    if any(c.option == "w4g32" for c in four):
        plans["uniform 4-bit g32 (int8 elsewhere)"] = replace(t.uniform, layers=four)
    plans["chosen"] = plan
    try:
        return pareto_sweep(layers, t.sens, cost, plans)
    except ConfigError as exc:  # the front is for the report only
        log.warning("no Pareto front for the report: %s", exc.message)
        return {}


def _settings(t: _Tables) -> dict:
    base = t.cfg.to_dict() if t.family == "static" else dict(DYNAMIC_SETTINGS)
    if t.quantizer is not None:
        base = {**base, "weight_only": t.quantizer.config.to_dict()}
    return base


def _tables(profile, model, fp32, layers, calib, work, cfg, ctx, *, weight_only: bool = True) -> _Tables:
    """The option space of this model on this target, the uniform int8 baseline (quantized once), and the
    sensitivity table: static int8 measured through simulated QDQ models, weight-only and dynamic int8 options by
    feeding their weights (``edgekit.wsim``); both as output distortion against FP32 on the same samples."""
    import onnx

    family = quant_family(layers, profile)
    options = layer_options(layers, profile, family)
    if not weight_only:  # int8 of the family only
        options = {n: [o for o in opts if o in ("fp32", "w8a8", "w8a8d")] for n, opts in options.items()}
    metric = SENSITIVITY_METRIC
    sample = calib.take(SENSITIVITY_SAMPLES)
    feed_sample = calib.take(FEED_SENSITIVITY_SAMPLES)
    feed_layers = [layer for layer in layers if any(is_feed_option(o) for o in options[layer.name])]
    quantizer = None
    if feed_layers:
        quantizer = LowBitQuantizer(onnx.load(str(fp32.path)), feed_layers, calib, WeightOnlyConfig(),
                                    model_sha256=model.sha256, ctx=ctx,
                                    dynamic=[n for n, o in options.items() if "w8a8d" in o])

    def build(plan: Plan, path: Path) -> Artifact:
        return apply_plan(plan, fp32, calib, path, cfg, ctx, quantizer)

    def build_with_source(plan: Plan, path: Path) -> tuple[Artifact, Path]:
        """The plan's artifact and the QDQ graph the simulated mixes read (the artifact itself unless the target's
        ai.edgekit ops replaced some of its layers)."""
        source = path.with_name(path.stem + ".qdq.onnx")
        source.unlink(missing_ok=True)
        art = apply_plan(plan, fp32, calib, path, cfg, ctx, quantizer, keep_qdq=source)
        return art, source if source.exists() else Path(art.path)

    precision = "int8" if family == "static" else "int8-dynamic"
    settings = cfg.to_dict() if family == "static" else dict(DYNAMIC_SETTINGS)
    uniform = uniform_plan(layers, profile, precision, model_sha256=model.sha256, activations=settings)
    log.info("quantizing every supported layer to %s once (the baseline and the source of every simulated mix)",
             precision)
    q_full, q_source = build_with_source(uniform, work / "uniform-int8.onnx")
    tables = []
    if family == "static":
        static_opts = {n: [o for o in opts if o in ("fp32", "w8a8", "w4a8")] for n, opts in options.items()}
        extra = {}
        if any("w4a8" in o for o in static_opts.values()):  # every layer that takes it at 4 bits, quantized once
            four = tuple(LayerChoice(c.layer, "w4a8") if "w4a8" in options[c.layer] else c for c in uniform.layers)
            extra["w4a8"] = build_with_source(replace(uniform, layers=four), work / "uniform-w4a8.onnx")[1]
        tables.append(measure_sensitivity(fp32.path, q_source, layers, sample, metric=metric,
                                          model_sha256=model.sha256, quantizer=cfg.to_dict(), ctx=ctx,
                                          options=static_opts, extra=extra))
    if quantizer is not None:
        tables.append(measure_feed_sensitivity(quantizer, options, feed_sample, metric=metric, ctx=ctx,
                                               model_sha256=model.sha256))
    values = {layer.name: {"fp32": 0.0} for layer in layers}
    for table in tables:
        for name, row in table.values.items():
            values[name].update(row)
    sens = SensitivityTable(model_sha256=model.sha256, data_sha256=sample.sha256(), metric=metric, values=values,
                            additivity=tables[0].additivity if tables else {})
    evaluate = None
    if quantizer is not None and family == "dynamic":  # every option is feedable: whole plans are measurable
        from edgekit.wonly import measured_scorer

        evaluate = measured_scorer(quantizer, feed_sample, metric)
    return _Tables(family, options, uniform, q_full, sens, quantizer, build, evaluate, cfg)


def _quantize_once(profile, model, fp32, layers, calib, work, cfg, ctx):
    """Uniform int8 of the model's family (static, or dynamic for transformers) and the sensitivity table: the
    max-drop search walks from it back towards FP32."""
    t = _tables(profile, model, fp32, layers, calib, work, cfg, ctx, weight_only=False)
    return t.uniform, t.uniform_artifact, t.options, t.sens


def _solver_budget(budget: Budget, cost: CostTable, uniform: Plan, q_full: Artifact, fp32: Artifact, calib: Dataset):
    """The budget the solver sees. Size: the whole artifact minus the bytes outside the weighted layers (graph,
    activation scales), which no per-layer choice changes. Latency: as a fraction of FP32 measured now, applied to
    the cost table's FP32 layer sum; the table may have been measured under another load, and the unweighted ops
    (Add, pooling) speed up with their neighbours, so ratios carry over where absolute milliseconds do not."""
    notes: dict = {"other_bytes": 0, "latency_ms": None, "fp32_ms": None}
    size = budget.size_bytes
    if size is not None:
        # q_full is the uniform plan's artifact: what its layers weigh by the table, the rest is graph and scales
        weights = sum(cost.entries[c.layer][c.option].bytes for c in uniform.layers if c.layer in cost.entries)
        notes["other_bytes"] = max(0, q_full.size - weights)
        size -= notes["other_bytes"]
        if size <= 0:
            raise ConfigError(f"size budget {budget.size_bytes} B is below the {notes['other_bytes']} B the model "
                              "needs besides its weights")
    bits = budget.avg_bits
    if bits is not None:  # over every float weight of the model: what the layers do not cover stays float32
        bits, notes["avg_bits_layers"] = _layer_bits(bits, fp32, cost, uniform)
    latency = None
    layers = [c.layer for c in uniform.layers]
    if budget.latency_ms is not None or budget.latency_ratio is not None:
        feeds = {k: v[:1] for k, v in calib.inputs.items()}
        whole = compare_latency({"fp32": OrtRuntime(fp32.path)}, feeds, rounds=3, per_round=20)["fp32"].median_ms
        target = budget.latency_ms if budget.latency_ms is not None else budget.latency_ratio * whole
        layers_ms = sum(cost.entries[name]["fp32"].latency_ms for name in layers if name in cost.entries)
        notes.update(fp32_ms=round(whole, 4), latency_ms=round(target, 4))
        latency = target / whole * layers_ms
        log.info("latency budget %.3f ms = %.2fx FP32 (which measures %.3f ms now); solving for %.3f ms of the "
                 "cost table's %.3f ms of layers", target, target / whole, whole, latency, layers_ms)
    return Budget(size_bytes=size, latency_ms=latency, avg_bits=bits), notes


def _layer_bits(bits: float, fp32: Artifact, cost: CostTable, uniform: Plan) -> tuple[float, float]:
    """An average-bits budget counts every float weight of the model (biases and norms outside the weighted layers
    included, at their 32 bits); the solver sees the equivalent budget over the layers' parameters alone."""
    import onnx

    model = onnx.load(str(fp32.path), load_external_data=False)
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    fp32_bytes = {name: row["fp32"].bytes for name, row in cost.entries.items() if "fp32" in row}
    layer_params = sum(b // 4 for b in fp32_bytes.values())
    outside = max(total - layer_params, 0)
    if layer_params <= 0:
        return bits, bits
    layer_bits = (bits * total - 32 * outside) / layer_params
    if layer_bits <= 0:
        raise ConfigError(f"avg-bits={bits:g} cannot be met: the {outside} float weights outside the weighted layers "
                          "alone exceed it")
    log.info("avg-bits %.3f over all %d float weights = %.3f over the %d in weighted layers", bits, total, layer_bits,
             layer_params)
    return layer_bits, round(layer_bits, 4)


NO_REGRESSION_SLACK = 1.05  # measurement noise allowed before a plan counts as slower than FP32


def _fits(plan: Plan, cost: CostTable, budget: Budget, layers) -> bool:
    """Whether ``plan`` meets the size and bit parts of ``budget`` by the cost table's exact bytes."""
    total = sum(cost.entries[c.layer][c.option].bytes for c in plan.layers if c.layer in cost.entries)
    params = sum(layer.params for layer in layers)
    return not ((budget.size_bytes is not None and total > budget.size_bytes)
                or (budget.avg_bits is not None and 8 * total / max(params, 1) > budget.avg_bits))


def _no_regression(plan, uniform: Measured, sens, cost, solve_budget, *, solver, profile, model, layers, fp32, calib,
                   work, build, settings, evaluate):
    """Size/bit budgets say nothing of latency, but a compressed model slower than FP32 is never the answer: measure
    the plan beside FP32 and uniform INT8. If the plan is slower than FP32: ship uniform INT8 when it meets the
    budget too and is not slower; else solve again with the cost table's FP32 latency as a cap (the table knows
    which low-bit kernels are slow here) and keep the faster of the two."""
    feeds = {k: v[:1] for k, v in calib.inputs.items()}
    artifact = build(plan, work / "solved" / "model.onnx")
    stats = compare_latency({"fp32": OrtRuntime(fp32.path), "plan": OrtRuntime(artifact.path),
                             "uniform": OrtRuntime(uniform.artifact.path)}, feeds, rounds=3, per_round=15)
    ratio = stats["plan"].median_ms / stats["fp32"].median_ms
    uniform_ratio = stats["uniform"].median_ms / stats["fp32"].median_ms
    record = {"round": 0, "measured_ratio_to_fp32": round(ratio, 4), "uniform_int8_ratio": round(uniform_ratio, 4),
              "check": "no regression vs FP32"}
    log.info("solved plan measures %.2fx FP32, uniform INT8 %.2fx", ratio, uniform_ratio)
    if ratio <= NO_REGRESSION_SLACK:
        return plan, [record], (plan.layers, artifact)
    uniform_ok = uniform_ratio < ratio and uniform_ratio <= NO_REGRESSION_SLACK
    if uniform_ok and _fits(uniform.plan, cost, solve_budget, layers):
        log.warning("the solved plan measures %.2fx FP32 (slower); shipping uniform INT8 (%.2fx) instead, which "
                    "also meets the budget", ratio, uniform_ratio)
        record["kept"] = "uniform int8"
        reason = f"uniform INT8: the solved plan measured {ratio:.2f}x FP32, slower; this one {uniform_ratio:.2f}x"
        uniform_plan_ = replace(uniform.plan, solver=f"{plan.solver}→no-regression",
                                notes=(*uniform.plan.notes, reason))
        return uniform_plan_, [record], (uniform_plan_.layers, uniform.artifact)
    fp32_ms = sum(row["fp32"].latency_ms for row in cost.entries.values() if "fp32" in row)
    capped = replace(solve_budget, latency_ms=fp32_ms / max(ratio, 1.0) * 0.95)
    try:
        again = allocated_plan(layers, profile, sensitivity=sens, cost=cost, budget=capped, solver=solver,
                               model_sha256=model.sha256, activations=settings, evaluate=evaluate)
    except ConfigError as exc:
        log.warning("the solved plan measures %.2fx FP32 and no plan within the budget is faster by the cost "
                    "table (%s)", ratio, exc.message)
        return plan, [record], (plan.layers, artifact)
    second = build(again, work / "solved-capped" / "model.onnx")
    stats = compare_latency({"fp32": OrtRuntime(fp32.path), "plan": OrtRuntime(second.path)}, feeds, rounds=3,
                            per_round=15)
    ratio2 = stats["plan"].median_ms / stats["fp32"].median_ms
    records = [record, {"round": 1, "measured_ratio_to_fp32": round(ratio2, 4),
                        "check": "re-solved with the FP32 latency as a cap"}]
    log.info("re-solved under a latency cap: %.2fx FP32 (was %.2fx)", ratio2, ratio)
    if ratio2 < ratio:
        return again, records, (again.layers, second)
    log.warning("the solved plan measures %.2fx FP32 and no compressed plan within the budget measured faster", ratio)
    return plan, records, (plan.layers, artifact)


def _distortion(plan: Plan, sens) -> float:
    return sum(sens.values[c.layer].get(c.option, 0.0) for c in plan.layers)


def _refine_for_latency(plan, cost, uniform: Measured, notes, sens, solve_budget, *, solver, profile, model, fp32,
                        layers, calib, work, build, settings):
    feeds = {k: v[:1] for k, v in calib.inputs.items()}
    base = OrtRuntime(fp32.path)
    measured: list[Measured] = []
    rounds: list[dict] = []
    penalty = 0.0
    for k in range(REFINE_ROUNDS):
        artifact = build(plan, work / f"refine{k}" / "model.onnx")
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
                                  model_sha256=model.sha256, activations=settings)
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

    option = {c.layer: c.option for c in uniform.layers}
    quantized = [c.layer for c in uniform.layers if c.option != "fp32"]
    by_name = {layer.name: layer for layer in layers}

    def harm(name: str) -> float:  # distortion per byte saved by quantizing this layer
        saved = layer_bytes(by_name[name], "fp32") - layer_bytes(by_name[name], option[name])
        return sens.values[name][option[name]] / max(saved, 1)

    order = sorted(quantized, key=harm, reverse=True)
    tried: dict[int, tuple[Plan, Artifact, float, bool]] = {}

    def plan_for(k: int) -> Plan:
        back = set(order[:k])
        choices = tuple(
            LayerChoice(c.layer, "fp32", f"fp32: among the {k} layers with the most distortion per byte saved, kept "
                                         f"float to stay within a verified drop of {max_drop:.2%}")
            if c.layer in back else
            (LayerChoice(c.layer, c.option, f"{c.option}: quantized; the verified drop stays within {max_drop:.2%}")
             if c.option != "fp32" else c)
            for c in uniform.layers)
        return replace(uniform, layers=choices, precision=precision_label(choices), solver="max-drop",
                       budget={"max_drop": max_drop})

    def evaluate(k: int) -> float:
        plan = plan_for(k)
        artifact = q_full if k == 0 else apply_plan(plan, fp32, calib, work / f"drop{k}" / "model.onnx", cfg, ctx)
        tol_class = tolerance_class(plan)
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
