"""Graph patterns that the native ONNX Runtime library (``runtimes/onnxruntime/``) runs inside ``MatMulLowBit``:
what ``export.lowbit.apply_weight_only(fuse_activations=True)`` folds into the op on ``ai.edgekit`` ONNX Runtime
targets (the TensorRT plugins have none of these epilogues).

- ``gelu_tails``: torch's exact GELU after a low-bit MatMul -> ``activation="Gelu"``.
- ``sibling_groups``: MatMuls reading the same input in the same weight format (Q, K, V) -> one op, ``split``
  outputs.
- ``residual_layernorms``: ``Add(residual)`` -> ``LayerNormalization`` after a low-bit MatMul (a transformer's output
  projections) -> the op's ``skip``/``ln_scale``/``ln_bias`` inputs and ``epsilon``.

Each matcher only fuses what computes the same function: single consumers along the chain, constants where the op
takes constants, and shapes known equal where the op's input has a fixed shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edgekit.kernels.lowbit import MAX_SPLIT

if TYPE_CHECKING:
    from edgekit.compress.wquant import QWeight


def _consumers(g) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in g.node:
        for t in node.input:
            out.setdefault(t, []).append(node)
    return out


def _scalar(name: str, inits: Mapping) -> float | None:
    """The value of a one-element float initializer, else None."""
    from onnx import numpy_helper

    if name not in inits or int(np.prod(inits[name].dims)) != 1 or inits[name].data_type != 1:
        return None
    return float(numpy_helper.to_array(inits[name]).reshape(()))


def gelu_tails(g, outputs_of: Mapping[str, str], inits) -> dict:
    """{MatMul name: (tail nodes, output)} for low-bit MatMuls whose (bias-fused) output ``y`` feeds nothing but the
    exact GELU as torch exports ``nn.GELU()``: ``Div(y, sqrt 2) -> Erf -> Add(1)``, then ``Mul(0.5) -> Mul(y)`` or
    ``Mul(y) -> Mul(0.5)`` (any operand order). Those nodes become the op's ``activation="Gelu"`` epilogue.
    ``outputs_of``: {MatMul name: its output after bias fusion}."""
    consumers = _consumers(g)
    graph_outputs = {o.name for o in g.output}

    def only(t: str, op: str):
        users = consumers.get(t, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and t not in graph_outputs else None

    def other(node, t: str) -> str | None:
        ins = list(node.input)
        return ins[1] if len(ins) == 2 and ins[0] == t else (ins[0] if len(ins) == 2 and ins[1] == t else None)

    def near(name: str | None, value: float) -> bool:
        v = _scalar(name, inits) if name else None
        return v is not None and abs(v - value) <= 1e-6 * abs(value)

    found = {}
    for mm, y in outputs_of.items():
        users = consumers.get(y, [])
        if y in graph_outputs or len(users) != 2:
            continue
        div = next((u for u in users if u.op_type == "Div" and u.input[0] == y and near(u.input[1], 2**0.5)), None)
        erf = div and only(div.output[0], "Erf")
        add = erf and only(erf.output[0], "Add")
        if not add or not near(other(add, erf.output[0]), 1.0):
            continue
        m1 = only(add.output[0], "Mul")
        if m1 is None or (m1 not in users and not near(other(m1, add.output[0]), 0.5)):
            continue
        m2 = only(m1.output[0], "Mul")
        if m2 is None:
            continue
        if m1 in users:  # Mul(y, erf + 1) -> Mul(0.5)
            ok = other(m1, add.output[0]) == y and near(other(m2, m1.output[0]), 0.5)
        else:  # Mul(0.5, erf + 1) -> Mul(y)
            ok = m2 in users and other(m2, m1.output[0]) == y
        if ok:
            found[mm] = ([div, erf, add, m1, m2], m2.output[0])
    return found


def sibling_groups(g, weights: Mapping[str, QWeight], skip) -> list[list[str]]:
    """Groups (2 to ``MAX_SPLIT`` members, in graph order) of low-bit MatMuls that read the same input with the same
    weight format (bits, group, K, zero points or not) and no fused activation (not in ``skip``): a transformer's Q,
    K and V projections. One ``MatMulLowBit`` with ``split`` outputs computes each group: the activations are
    quantized once and the kernel runs one wider GEMM."""
    by_input: dict[tuple, list[str]] = {}
    for node in g.node:
        qw = weights.get(node.name)
        if qw is None or node.op_type != "MatMul" or node.name in skip:
            continue
        by_input.setdefault((node.input[0], qw.bits, qw.group, qw.k, qw.zeros is None), []).append(node.name)
    groups = []
    for names in by_input.values():
        groups += [names[i:i + MAX_SPLIT] for i in range(0, len(names), MAX_SPLIT) if len(names[i:i + MAX_SPLIT]) > 1]
    return groups


def residual_layernorms(model, outputs_of: Mapping[str, str], inits) -> dict:
    """{MatMul name: (Add node, LayerNormalization node, residual, ln_scale, ln_bias or "", epsilon)} for low-bit
    MatMuls whose (bias-fused) output ``y`` feeds only ``Add(y, residual)``, whose output feeds only a
    ``LayerNormalization`` over the last axis with a constant ``[N]`` scale (and bias) and no other output read. The
    residual must be a tensor whose shape is known equal to ``y``'s (ONNX shape inference; a broadcast residual is
    not fused). ``model``: the ModelProto (for shape inference)."""
    import onnx

    g = model.graph
    consumers = _consumers(g)
    graph_outputs = {o.name for o in g.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - no shapes, no fusion
        return {}
    shapes = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)

    def const_vector(name: str, n: int) -> bool:
        return name in inits and inits[name].data_type == 1 and int(np.prod(inits[name].dims)) == n

    found = {}
    for mm, y in outputs_of.items():
        users = consumers.get(y, [])
        if y in graph_outputs or len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
            continue
        add = users[0]
        residual = add.input[1] if add.input[0] == y else add.input[0]
        if residual == y or residual in inits:
            continue
        sy, sr = shapes.get(y), shapes.get(residual)
        if not sy or sy != sr or any(d is None for d in sy):
            continue
        ln_users = consumers.get(add.output[0], [])
        if add.output[0] in graph_outputs or len(ln_users) != 1 or ln_users[0].op_type != "LayerNormalization":
            continue
        ln = ln_users[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ln.attribute}
        n = sy[-1]
        if ln.input[0] != add.output[0] or int(attrs.get("axis", -1)) not in (-1, len(sy) - 1):
            continue
        if not isinstance(n, int):
            continue
        if any(o for o in ln.output[1:]) or not const_vector(ln.input[1], n):
            continue
        beta = ln.input[2] if len(ln.input) > 2 and ln.input[2] else ""
        if beta and not const_vector(beta, n):
            continue
        found[mm] = (add, ln, residual, ln.input[1], beta, float(attrs.get("epsilon", 1e-5)))
    return found
