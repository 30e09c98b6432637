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
    """``fp32`` when nothing is compressed, ``int8`` when everything is, else ``mixed``."""
    quantized = sum(c.option != "fp32" for c in choices)
    return "fp32" if quantized == 0 else "int8" if quantized == len(choices) else "mixed"


def layer_options(layers: Sequence[LayerInfo], profile: TargetProfile) -> dict[str, list[str]]:
    """The options the target allows per layer: float always, each compressed option where supported."""
    return {layer.name: ["fp32"] + [o for o in ("w8a8",) if profile.supports(layer.kind, o)] for layer in layers}


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
