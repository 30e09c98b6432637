"""The TensorRT plugin form of the ``ai.edgekit`` ops: names, versions, fields, and the ONNX rewrite that the
TensorRT ONNX parser maps to edgekit's plugins (``runtimes/tensorrt/``). Single source of truth for the plugin
identity: ``runtimes/tensorrt/edgekit_trt_core.h`` repeats it and ``tests/test_trt_plugins.py`` checks that they agree.

How the parser finds a plugin (``../shared/design/TENSORRT.md`` §1, rules 1-4): the key is (``op_type``, STRING
attribute ``plugin_version``, STRING attribute ``plugin_namespace``); a built-in importer for the ``op_type`` wins
over plugins in TensorRT <= 10.14 whatever the domain, so the op types are names no ONNX op has. The node's
attributes named in the creator's ``getFieldNames()`` become ``PluginField``s (INT -> ``kINT32``, FLOAT ->
``kFLOAT32``); node inputs become plugin inputs in order, initializers as constants. UINT8 initializers are converted
to INT32 and UINT8 intermediates are illegal, so packed bytes enter as INT8.

``to_tensorrt_nodes(model)`` rewrites every ``ai.edgekit`` node:

- ``MatMulLowBit`` -> ``EdgekitMatMulLowBit``: fields ``K``, ``N``, ``bits``, ``group_size``; ``accuracy_level``
  (0 or 4) is dropped: the plugin always computes in fp32 (level 0), which is within level 4's error bound.
  ``B_packed`` and ``zero_points`` (uint8 initializers) become INT8 initializers holding the same bytes
  (``uint8_array.view(int8)``: value ``v >= 128`` reads as ``v - 256``; the CUDA kernel reads bytes, so nothing
  changes). ``scales`` must be float32. A ``bias`` (the optional 5th input) is split into a following ONNX ``Add``
  node (``Y = plugin(...) + bias``; TensorRT fuses the elementwise add itself), so the plugin keeps 3-4 inputs.
- ``MatMulSparse24`` -> ``EdgekitMatMulSparse24``, the float variant only (3 inputs): ``values`` (a float
  initializer) becomes float16, the precision of the CUDA kernel (round to nearest even); ``indices`` becomes INT8
  (same bytes). The int8 variants are refused: TensorRT has no UINT8 activations, and its own INT8 2:4 sparsity
  (Q/DQ + ``SPARSE_WEIGHTS``, TENSORRT.md §4) is the way to run them.
- ``AttentionInt8`` -> ``EdgekitAttentionInt8``: fields ``q_block``, ``k_block``, ``smooth_q`` and ``sm_scale``, all
  written (``sm_scale`` defaults to ``1/sqrt(64)``: the plugin supports head dim 64 only and says so at build time).

Every rewritten node keeps its name, inputs (renamed where an initializer was converted) and outputs, its domain
``ai.edgekit`` and gains ``plugin_version = "1"`` and ``plugin_namespace = "ai.edgekit"``. Anything outside this
(unknown attributes, values that do not fit int32, non-initializer packed weights, ``ai.edgekit`` nodes inside
control-flow subgraphs) raises ``TensorRTPluginError`` naming the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgekit.errors import ExportError
from edgekit.kernels import attention, lowbit, sparse24

DOMAIN = "ai.edgekit"
PLUGIN_NAMESPACE = "ai.edgekit"
PLUGIN_VERSION = "1"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class TensorRTPluginError(ExportError):
    """An ``ai.edgekit`` node has no TensorRT plugin form (attribute, input or variant unsupported)."""


@dataclass(frozen=True)
class PluginSpec:
    op_type: str  # the ai.edgekit op
    plugin_name: str  # TensorRT plugin name = op_type of the rewritten node
    fields: tuple[tuple[str, str], ...]  # (name, "INT" | "FLOAT") in the creator's getFieldNames() order


PLUGINS: dict[str, PluginSpec] = {
    spec.op_type: spec
    for spec in (
        PluginSpec(
            lowbit.OP_TYPE, "EdgekitMatMulLowBit", (("K", "INT"), ("N", "INT"), ("bits", "INT"), ("group_size", "INT"))
        ),
        PluginSpec(sparse24.OP_TYPE, "EdgekitMatMulSparse24", (("K", "INT"), ("N", "INT"))),
        PluginSpec(
            attention.OP_TYPE,
            "EdgekitAttentionInt8",
            (("q_block", "INT"), ("k_block", "INT"), ("smooth_q", "INT"), ("sm_scale", "FLOAT")),
        ),
    )
}
BY_PLUGIN_NAME = {spec.plugin_name: spec for spec in PLUGINS.values()}
ATTENTION_HEAD_DIM = 64  # the CUDA kernel's (attention.KERNEL_HEAD_DIM)


@dataclass(frozen=True)
class PluginField:
    """One ``nvinfer1::PluginField`` as the ONNX parser builds it from a node attribute."""

    name: str
    type: str  # "kINT32", "kFLOAT32" or "kCHAR"
    data: np.ndarray  # int32 / float32 values, or uint8 bytes (kCHAR, with the trailing NUL)
    length: int


# ---------------------------------------------------------------------------------------------------------------


def _err(node, message: str, hint: str | None = None) -> TensorRTPluginError:
    return TensorRTPluginError(f"{node.domain}::{node.op_type} node {node.name or '(unnamed)'!r}: {message}", hint=hint)


def _attrs(node) -> dict:
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        if a.type not in (AttributeProto.INT, AttributeProto.FLOAT):
            raise _err(node, f"attribute {a.name!r} has type {AttributeProto.AttributeType.Name(a.type)}; "
                       "the plugin's fields are INT or FLOAT")
        out[a.name] = (AttributeProto.AttributeType.Name(a.type), helper.get_attribute_value(a))
    return out


def _fields(node, spec: PluginSpec, attrs: dict, optional: dict, dropped: dict) -> dict:
    """The plugin fields from the node's attributes: every spec field required unless in ``optional`` (its default),
    ``dropped`` names attributes accepted and not passed on (name -> allowed values)."""
    known = {name for name, _ in spec.fields} | set(dropped)
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise _err(node, f"attribute(s) {unknown} have no TensorRT plugin field; the plugin takes "
                   f"{[n for n, _ in spec.fields]}")
    for name, allowed in dropped.items():
        if name in attrs and (attrs[name][0] != "INT" or attrs[name][1] not in allowed):
            raise _err(node, f"{name}={attrs[name][1]!r} is not supported by the TensorRT plugin (allowed: {allowed})")
    out = {}
    for name, kind in spec.fields:
        if name not in attrs:
            if name not in optional:
                raise _err(node, f"required attribute {name!r} is missing")
            out[name] = optional[name]
            continue
        got_kind, value = attrs[name]
        if got_kind != kind:
            raise _err(node, f"attribute {name!r} must be {kind}, got {got_kind}")
        if kind == "INT" and not INT32_MIN <= value <= INT32_MAX:
            raise _err(node, f"attribute {name}={value} does not fit int32 (TensorRT reads INT attributes as int32)")
        if kind == "FLOAT" and not math.isfinite(value):
            raise _err(node, f"attribute {name}={value} must be finite")
        out[name] = value
    return out


class _Graph:
    """Initializer lookup and conversion with unique names; a converted initializer is shared by its users."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.names = set(self.inits) | {n for node in graph.node for n in (*node.input, *node.output)}
        self.names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
        self.converted: dict[tuple[str, str], str] = {}

    def array(self, node, name: str, what: str) -> np.ndarray:
        from onnx import numpy_helper

        if name not in self.inits:
            raise _err(node, f"{what} {name!r} must be a graph initializer (TensorRT plugins take packed weights as "
                       "constants; a computed UINT8 tensor is illegal in TensorRT)")
        return numpy_helper.to_array(self.inits[name])

    def replace(self, name: str, tag: str, array: np.ndarray) -> str:
        """The name of a new initializer holding ``array`` (once per (name, tag))."""
        from onnx import numpy_helper

        key = (name, tag)
        if key not in self.converted:
            new, i = f"{name}_{tag}", 1
            while new in self.names:
                new, i = f"{name}_{tag}{i}", i + 1
            self.names.add(new)
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), new))
            self.converted[key] = new
        return self.converted[key]

    def as_int8(self, node, name: str, what: str, shape: tuple[int, int]) -> str:
        arr = self.array(node, name, what)
        if arr.dtype not in (np.uint8, np.int8):
            raise _err(node, f"{what} {name!r} must be uint8 (or int8) bytes, got {arr.dtype}")
        if arr.shape != shape:
            raise _err(node, f"{what} {name!r} must have shape {list(shape)}, got {list(arr.shape)}")
        return name if arr.dtype == np.int8 else self.replace(name, "int8", arr.view(np.int8))

    def fresh(self, name: str) -> str:
        """A tensor name not yet in the graph, based on ``name``."""
        new, i = name, 1
        while new in self.names:
            new, i = f"{name}{i}", i + 1
        self.names.add(new)
        return new

    def drop_unused(self) -> None:
        used = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
        _collect_subgraph_inputs(self.graph, used)
        keep = [t for t in self.graph.initializer if t.name in used]
        gone = {t.name for t in self.graph.initializer} - {t.name for t in keep}
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        inputs = [v for v in self.graph.input if v.name not in gone]
        del self.graph.input[:]
        self.graph.input.extend(inputs)


def _subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _collect_subgraph_inputs(graph, used: set) -> None:
    for node in graph.node:
        for g in _subgraphs(node):
            used.update(n for sub in g.node for n in sub.input)
            _collect_subgraph_inputs(g, used)


def _check_no_nested(graph) -> None:
    for node in graph.node:
        for g in _subgraphs(node):
            for sub in g.node:
                if sub.domain == DOMAIN:
                    raise _err(sub, f"is inside the control-flow node {node.name or node.op_type!r}; TensorRT "
                               "plugins are only mapped from the main graph here")
            _check_no_nested(g)


def _inputs(node, lo: int, hi: int, names: str) -> list[str]:
    inputs = list(node.input)
    while inputs and not inputs[-1]:  # trailing empty optional inputs
        inputs.pop()
    if not lo <= len(inputs) <= hi or not all(inputs):
        raise _err(node, f"takes inputs {names}, got {list(node.input)}")
    return inputs


def _rewrite_lowbit(node, g: _Graph) -> tuple[list[str], dict]:
    spec = PLUGINS[lowbit.OP_TYPE]
    f = _fields(node, spec, _attrs(node), optional={}, dropped={"accuracy_level": (0, 4)})
    try:
        lowbit.check_attributes(f["K"], f["N"], f["bits"], f["group_size"])
    except ValueError as e:
        raise _err(node, str(e)) from None
    inputs = _inputs(node, 3, 4, "[A, B_packed, scales(, zero_points)]")
    K, N, bits, gs = f["K"], f["N"], f["bits"], f["group_size"]
    groups = lowbit.num_groups(K, gs)
    inputs[1] = g.as_int8(node, inputs[1], "B_packed", (N, lowbit.packed_row_bytes(lowbit.padded_k(K, gs), bits)))
    if inputs[2] in g.inits:
        scales = g.array(node, inputs[2], "scales")
        if scales.dtype != np.float32 or scales.shape != (N, groups):
            raise _err(node, f"scales must be float32 [{N}, {groups}], got {scales.dtype} {list(scales.shape)}")
    if len(inputs) == 4:
        inputs[3] = g.as_int8(node, inputs[3], "zero_points", (N, groups))
    return inputs, f


def _rewrite_sparse24(node, g: _Graph) -> tuple[list[str], dict]:
    spec = PLUGINS[sparse24.OP_TYPE]
    f = _fields(node, spec, _attrs(node), optional={}, dropped={})
    try:
        sparse24.check_attributes(f["K"], f["N"])
    except ValueError as e:
        raise _err(node, str(e)) from None
    if len([n for n in node.input if n]) > 3:
        raise _err(node, "the int8 variants (w_scale, a_scale inputs) have no TensorRT plugin",
                   hint="TensorRT has no UINT8 activations; for INT8 2:4 use Q/DQ MatMul with SPARSE_WEIGHTS "
                   "(TENSORRT.md §4), or export the float variant")
    inputs = _inputs(node, 3, 3, "[A, values, indices] (the float variant)")
    K, N = f["K"], f["N"]
    values = g.array(node, inputs[1], "values")
    if values.dtype == np.int8:
        raise _err(node, "int8 values (the int8 variant) have no TensorRT plugin; export the float variant")
    if values.dtype not in (np.float32, np.float16, np.float64) or values.shape != (N, K // 2):
        raise _err(node, f"values must be float [{N}, {K // 2}], got {values.dtype} {list(values.shape)}")
    if values.dtype != np.float16:
        inputs[1] = g.replace(inputs[1], "fp16", values.astype(np.float16))
    inputs[2] = g.as_int8(node, inputs[2], "indices", (N, sparse24.index_row_bytes(K)))
    return inputs, f


def _rewrite_attention(node, g: _Graph) -> tuple[list[str], dict]:
    spec = PLUGINS[attention.OP_TYPE]
    defaults = {
        "q_block": attention.DEFAULT_Q_BLOCK,
        "k_block": attention.DEFAULT_K_BLOCK,
        "smooth_q": 1,
        "sm_scale": 1.0 / math.sqrt(ATTENTION_HEAD_DIM),
    }
    f = _fields(node, spec, _attrs(node), optional=defaults, dropped={})
    if f["q_block"] < 1 or f["k_block"] < 1:
        raise _err(node, f"q_block and k_block must be >= 1, got {f['q_block']}, {f['k_block']}")
    if f["smooth_q"] not in (0, 1):
        raise _err(node, f"smooth_q must be 0 or 1, got {f['smooth_q']}")
    if not f["sm_scale"] > 0:
        raise _err(node, f"sm_scale must be > 0, got {f['sm_scale']}")
    return _inputs(node, 3, 3, "[Q, K, V]"), f


_REWRITERS = {
    lowbit.OP_TYPE: _rewrite_lowbit,
    sparse24.OP_TYPE: _rewrite_sparse24,
    attention.OP_TYPE: _rewrite_attention,
}


def to_tensorrt_nodes(model):
    """A copy of ``model`` (onnx ModelProto) whose ``ai.edgekit`` nodes are in the plugin form (module docstring).

    Raises ``TensorRTPluginError`` for any node that has no plugin form; other nodes are untouched. Converted
    initializers get new names (``<name>_int8``, ``<name>_fp16``); originals no longer used are removed.
    """
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    _check_no_nested(graph)
    if any(n.domain == DOMAIN for fn in out.functions for n in fn.node):
        raise TensorRTPluginError("ai.edgekit nodes inside model-local functions are not mapped to TensorRT plugins")
    g = _Graph(graph)
    nodes = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in _REWRITERS:
            raise _err(node, f"has no TensorRT plugin (plugins exist for {sorted(_REWRITERS)})")
        bias_add = None
        if node.op_type == lowbit.OP_TYPE and len(node.input) > 4:
            # the plugin has no bias input: MatMulLowBit(A, B, scales, zp) followed by Add(., bias)
            split = onnx.NodeProto()
            split.CopyFrom(node)
            bias = split.input[4]
            del split.input[4:]
            if bias:
                y = split.output[0]
                split.output[0] = g.fresh(f"{y}_no_bias")
                bias_add = helper.make_node("Add", [split.output[0], bias], [y], name=g.fresh(f"{node.name}_bias"))
            node = split
        inputs, fields = _REWRITERS[node.op_type](node, g)
        spec = PLUGINS[node.op_type]
        attrs = {name: (int(fields[name]) if kind == "INT" else float(fields[name])) for name, kind in spec.fields}
        new = helper.make_node(
            spec.plugin_name,
            inputs,
            list(node.output),
            name=node.name,
            domain=DOMAIN,
            plugin_version=PLUGIN_VERSION,
            plugin_namespace=PLUGIN_NAMESPACE,
            **attrs,
        )
        new.doc_string = node.doc_string
        nodes.append(new)
        if bias_add is not None:
            nodes.append(bias_add)
    del graph.node[:]
    graph.node.extend(nodes)
    g.drop_unused()
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def plugin_fields(node) -> list[PluginField]:
    """The ``PluginField``s the ONNX parser hands the creator for a node in the plugin form: the attributes named
    in the creator's field list, in the node's order (INT -> one int32, truncated from int64 as the parser does;
    FLOAT -> one float32). ``plugin_version`` / ``plugin_namespace`` select the creator and are not fields."""
    from onnx import AttributeProto, helper

    spec = BY_PLUGIN_NAME.get(node.op_type)
    if spec is None:
        hint = "run to_tensorrt_nodes first" if node.domain == DOMAIN else None
        raise TensorRTPluginError(f"{node.op_type!r} is not an edgekit TensorRT plugin node", hint=hint)
    names = {name for name, _ in spec.fields}
    out = []
    for a in node.attribute:
        if a.name not in names:
            continue
        value = helper.get_attribute_value(a)
        if a.type == AttributeProto.INT:
            out.append(PluginField(a.name, "kINT32", np.array([value], np.int64).astype(np.int32), 1))
        elif a.type == AttributeProto.FLOAT:
            out.append(PluginField(a.name, "kFLOAT32", np.array([value], np.float32), 1))
        elif a.type == AttributeProto.STRING:
            data = np.frombuffer(value + b"\0", np.uint8)
            out.append(PluginField(a.name, "kCHAR", data, len(data)))
        else:
            raise TensorRTPluginError(f"field {a.name!r} of {node.op_type}: attribute type "
                                      f"{AttributeProto.AttributeType.Name(a.type)} is not one the plugin reads")
    return out
