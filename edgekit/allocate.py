"""Choose an option per layer. This module holds the uniform solver (one precision for every layer the target
supports it on); the per-layer solvers over measured sensitivity and cost plug in beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgekit.errors import ConfigError, UnsupportedOnTarget
from edgekit.inventory import LayerInfo
from edgekit.plan import LayerChoice, Plan
from edgekit.targets import TargetProfile

# precision → the option it asks of every layer
PRECISION_OPTIONS = {"fp32": "fp32", "int8": "w8a8", "int8-dynamic": "w8a8d"}


def uniform_plan(
    layers: Sequence[LayerInfo], profile: TargetProfile, precision: str, *, model_sha256: str,
    activations: dict | None = None,
) -> Plan:
    """Every layer gets ``precision`` where the target supports it for that layer's kind, else stays float."""
    if precision not in PRECISION_OPTIONS:
        raise ConfigError(f"precision {precision!r} has no uniform plan", hint=f"use one of {list(PRECISION_OPTIONS)}")
    option = PRECISION_OPTIONS[precision]
    choices = []
    for layer in layers:
        if option == "fp32":
            choices.append(LayerChoice(layer.name, "fp32", "float32 requested"))
        elif option == "w8a8d" and layer.op_type != "MatMul":
            choices.append(LayerChoice(layer.name, "fp32", "dynamic int8 covers MatMul layers only (ONNX Runtime "
                                                           "rewrites a Gemm before quantizing it)"))
        elif profile.supports(layer.kind, option):
            choices.append(LayerChoice(layer.name, option, f"uniform {precision}"))
        else:
            why = f"{profile.name} does not support {option} for {layer.kind}"
            choices.append(LayerChoice(layer.name, "fp32", why))
    if option != "fp32" and not any(c.option == option for c in choices):
        raise UnsupportedOnTarget(
            f"target {profile.name} supports {option} for none of this model's layers",
            hint="use --precision fp32, or a target whose profile lists int8 for conv/linear",
        )
    return Plan(
        model_sha256=model_sha256, target=profile.name, precision=precision, layers=tuple(choices),
        activations=dict(activations or {}), solver="uniform",
    )


def precision_label(choices) -> str:
    """``fp32`` when nothing is compressed, ``int8`` when everything is int8, ``int4`` when everything is 4-bit
    weight-only, else ``mixed``."""
    options = {c.option for c in choices}
    if options == {"fp32"}:
        return "fp32"
    if options in ({"w8a8"}, {"w8a8d"}):
        return "int8"
    bits = {o[1] for o in options if o.startswith("w") and "g" in o}
    return f"int{bits.pop()}" if len(bits) == 1 and all("g" in o for o in options) else "mixed"


def quant_family(layers: Sequence[LayerInfo], profile: TargetProfile) -> str:
    """Which int8 flavour a model's plans draw from: ``static`` (calibrated uint8 activations, every layer kind; the
    fast path for convolutional networks) when it has convolutions, else ``dynamic`` (activations quantized per
    call: transformers, whose activation outliers break calibrated ranges). ONNX Runtime cannot mix the two in
    one graph here, so a plan uses one."""
    convs = any(layer.kind in ("conv", "depthwise_conv") for layer in layers)
    dynamic_ok = any(layer.op_type == "MatMul" and profile.supports(layer.kind, "w8a8d") for layer in layers)
    return "dynamic" if dynamic_ok and not convs else "static"


def weight_only_options(layer: LayerInfo, profile: TargetProfile) -> list[str]:
    """Group-wise weight-only options the target runs for this layer (``w4g32``, ``w2g64s`` ...)."""
    op = profile.ops.get(layer.kind)  # type: ignore[call-overload]
    if op is None or not any(a in (16, 32) for a in op.activation_bits) or layer.op_type not in WEIGHT_ONLY_OPS:
        return []
    width = int(layer.weight_shape[-1]) if layer.op_type == "Gather" else None
    out = []
    for bits in sorted(op.weight_bits, reverse=True):
        for gran in op.granularities(bits):
            if not gran.startswith("group-"):
                continue
            group = int(gran.removeprefix("group-"))
            if width is not None and width % group:
                continue  # GatherBlockQuantized needs whole groups
            option = f"w{bits}g{group}" + ("s" if op.symmetric_only else "")
            if profile.supports(layer.kind, option):
                out.append(option)
    return out


WEIGHT_ONLY_OPS = ("MatMul", "Gemm", "Gather")


def layer_options(layers: Sequence[LayerInfo], profile: TargetProfile, family: str = "static") -> dict[str, list[str]]:
    """The options the target allows per layer: float always; int8 of the model's family (``w8a8`` static, or
    ``w8a8d`` dynamic on MatMul layers); weight-only low-bit options where the target runs them."""
    out = {}
    for layer in layers:
        opts = ["fp32"]
        if family == "static" and profile.supports(layer.kind, "w8a8"):
            opts.append("w8a8")
            if profile.supports(layer.kind, "w4a8"):
                opts.append("w4a8")
        if family == "dynamic" and layer.op_type == "MatMul" and profile.supports(layer.kind, "w8a8d"):
            opts.append("w8a8d")
        out[layer.name] = opts + weight_only_options(layer, profile)
    return out


def allocated_plan(
    layers: Sequence[LayerInfo], profile: TargetProfile, *, sensitivity, cost, budget, solver: str,
    model_sha256: str, activations: dict | None = None, evaluate=None,
) -> Plan:
    """Solve for the per-layer options that minimise output distortion under ``budget`` (see ``edgekit.solvers``)."""
    from edgekit.solvers import Problem, solve

    params = {layer.name: layer.params for layer in layers}
    problem = Problem.from_tables(sensitivity, cost, params, budget, layers=[layer.name for layer in layers])
    sol = solve(problem, solver, additivity=sensitivity.additivity, evaluate=evaluate)
    choices = tuple(LayerChoice(layer.name, sol.choice[layer.name], sol.reasons[layer.name]) for layer in layers)
    precision = precision_label(choices)
    predicted = {"distortion": sol.distortion, "bytes": sol.bytes, "latency_ms": sol.latency_ms,
                 "avg_bits": sol.avg_bits, "metric": sensitivity.metric}
    return Plan(
        model_sha256=model_sha256, target=profile.name, precision=precision, layers=choices,
        activations=dict(activations or {}), budget={**budget.to_dict(), "predicted": predicted}, solver=sol.solver,
    )


def fastest_plan(layers: Sequence[LayerInfo], profile: TargetProfile, cost, *, model_sha256: str,
                 activations: dict | None = None) -> Plan:
    """Each layer's fastest option by the cost table (for budgets the table says are out of reach)."""
    choices = []
    for layer in layers:
        row = cost.entries[layer.name]
        option = min(row, key=lambda o: (row[o].latency_ms, o != "fp32"))
        choices.append(LayerChoice(layer.name, option, f"{option}: fastest by the cost table "
                                                       f"({row[option].latency_ms:.4g} ms)"))
    return Plan(model_sha256=model_sha256, target=profile.name, precision=precision_label(choices),
                layers=tuple(choices), activations=dict(activations or {}), solver="fastest")


def pareto_sweep(layers: Sequence[LayerInfo], sensitivity, cost, plans: dict[str, Plan], points: int = 12) -> dict:
    """The predicted Pareto front of the tables (least summed distortion for a grid of byte budgets, each solved
    exactly) and where ``plans`` (uniform baselines, the chosen plan) sit: {"front": [...], "plans": {label: ...}},
    each point {"bytes", "latency_ms", "distortion"} from the tables."""
    from edgekit.errors import ConfigError
    from edgekit.solvers import Problem, solve
    from edgekit.tables import Budget

    params = {layer.name: layer.params for layer in layers}
    names = [layer.name for layer in layers]
    base = Problem.from_tables(sensitivity, cost, params, Budget(), layers=names)

    def point(choice: dict[str, str]) -> dict:
        return {"bytes": int(sum(base.bytes[n][choice[n]] for n in names)),
                "latency_ms": round(sum(base.latency[n][choice[n]] for n in names), 5),
                "distortion": float(sum(base.distortion[n][choice[n]] for n in names))}

    lo = sum(min(base.bytes[n].values()) for n in names)
    hi = sum(max(base.bytes[n].values()) for n in names)
    front = []
    for k in range(points):
        budget = lo + (hi - lo) * k / max(points - 1, 1)
        try:
            sol = solve(Problem.from_tables(sensitivity, cost, params, Budget(size_bytes=int(budget)), layers=names),
                        "ilp")
        except (ConfigError, ImportError):
            continue
        front.append(point(sol.choice))
    marked = {}
    for label, plan in plans.items():
        choice = {c.layer: c.option for c in plan.layers}
        if all(n in choice and choice[n] in base.bytes[n] for n in names):
            marked[label] = point(choice)
    return {"front": front, "plans": marked}
