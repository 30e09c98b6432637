"""Simulate weight-only and dynamic-int8 options by *feeding* weights: one ONNX Runtime session for every variant.

The float graph is rewritten once: the weight of every candidate layer becomes a graph input, and the input of every
layer that may take dynamic int8 passes through ``x + gate · (DQ(DynamicQuantizeLinear(x)) − x)`` with a scalar
``gate`` input (0: float, 1: uint8 activations quantized per call, exactly as ONNX Runtime's ``MatMulInteger`` path
does). Any combination of per-layer options is then one ``run`` with other feeds: the float weights, or the
dequantized low-bit weights the real quantizer produced, and the gates. No session is built per variant, which
makes the sensitivity table (one layer at a time), the additivity check and the evolutionary solver's measured
scoring (many layers at once) cheap. Weight-only options are simulated exactly (``MatMulNBits`` with
``accuracy_level`` 0 computes with the same dequantized weights); the shipped kernel's int8 compute
(``accuracy_level`` 4) adds a small activation rounding that verification measures.

The same rewrite exposes each layer's input as an output, from which ``hessians`` accumulates ``2·XᵀX/n`` for GPTQ.
No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ExportError
from edgekit.inventory import LayerInfo, graph_batch_size

log = logging.getLogger(__name__)

WEIGHT_PREFIX = "edgekit::W::"
GATE_PREFIX = "edgekit::gate::"
BATCH = 16


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_slot(node) -> int:
    """Which input of a weighted node holds its weight (0 for a Gather's table, 1 otherwise)."""
    return 0 if node.op_type == "Gather" else 1


def to_graph_layout(node, w_nk: np.ndarray) -> np.ndarray:
    """An ``[N, K]`` (rows = outputs) weight in the layout the node's initializer has."""
    if node.op_type == "Gather" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
        return np.ascontiguousarray(w_nk, dtype=np.float32)
    return np.ascontiguousarray(w_nk.T, dtype=np.float32)


def int8_per_channel(w_nk: np.ndarray) -> np.ndarray:
    """The weight ONNX Runtime's dynamic int8 (``quantize_dynamic``, QInt8, per channel, symmetric) computes with:
    scale = max|w| / 127 per output row, values rounded to [−127, 127] (ORT's symmetric int8 range)."""
    w = np.asarray(w_nk, dtype=np.float32)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True) / 127, 1e-12).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


class FeedSimulator:
    """The float model with candidate layers' weights as inputs (and dynamic-int8 gates on ``dynamic`` layers)."""

    def __init__(self, fp32, layers: Sequence[LayerInfo], *, dynamic: Iterable[str] = (), collect: bool = False):
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from edgekit.agent.runtime import OrtRuntime

        model = onnx.ModelProto()
        model.CopyFrom(fp32)
        g = model.graph
        inits = {i.name: i for i in g.initializer}
        by_name = {n.name: n for n in g.node}
        self.names = [layer.name for layer in layers]
        self.dynamic = [n for n in dynamic if n in by_name]
        self.float_weights: dict[str, np.ndarray] = {}  # graph layout
        self.nodes = {}
        self.input_of: dict[str, str] = {}
        for name in self.names:
            node = by_name.get(name)
            if node is None:
                raise ExportError(f"layer {name!r} is not in the model")
            slot = weight_slot(node)
            init = inits.get(node.input[slot])
            if init is None:
                raise ExportError(f"layer {name!r} has no constant weight")
            self.nodes[name] = node
            self.float_weights[name] = numpy_helper.to_array(init).astype(np.float32)
            feed = WEIGHT_PREFIX + name
            node.input[slot] = feed
            g.input.append(helper.make_tensor_value_info(feed, TensorProto.FLOAT, list(init.dims)))
            if node.op_type != "Gather":
                self.input_of[name] = node.input[0]
        new_nodes = []
        for node in g.node:
            if node.name in self.dynamic:
                x, tag = node.input[0], node.name
                gate = GATE_PREFIX + tag
                g.input.append(helper.make_tensor_value_info(gate, TensorProto.FLOAT, []))
                new_nodes += [
                    helper.make_node("DynamicQuantizeLinear", [x], [f"{tag}::xq", f"{tag}::xs", f"{tag}::xz"],
                                     name=f"{tag}::dynq"),
                    helper.make_node("DequantizeLinear", [f"{tag}::xq", f"{tag}::xs", f"{tag}::xz"], [f"{tag}::xdq"],
                                     name=f"{tag}::dq"),
                    helper.make_node("Sub", [f"{tag}::xdq", x], [f"{tag}::xd"], name=f"{tag}::sub"),
                    helper.make_node("Mul", [f"{tag}::xd", gate], [f"{tag}::xg"], name=f"{tag}::mul"),
                    helper.make_node("Add", [x, f"{tag}::xg"], [f"{tag}::x"], name=f"{tag}::add"),
                ]
                node.input[0] = f"{tag}::x"
            new_nodes.append(node)
        del g.node[:]
        g.node.extend(new_nodes)
        used = {t for n in g.node for t in n.input}
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
        self.model_outputs = [o.name for o in g.output]
        graph_inputs = {i.name for i in g.input}
        if collect:  # expose every layer input, for Hessians
            for x in sorted(set(self.input_of.values()) - graph_inputs - set(self.model_outputs)):
                g.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
        self.batch = graph_batch_size(model, BATCH)
        self.runtime = OrtRuntime(model.SerializeToString())

    def run(self, data: Dataset, weights: Mapping[str, np.ndarray] | None = None, gates: Iterable[str] = (),
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run ``data`` with ``weights`` (layer -> graph-layout weight; others float) and dynamic int8 on the
        ``gates`` layers. Returns the model outputs (or ``outputs``), concatenated over batches."""
        feeds_w = {WEIGHT_PREFIX + n: (weights or {}).get(n, self.float_weights[n]) for n in self.names}
        on = set(gates)
        unknown = on - set(self.dynamic)
        if unknown:
            raise ExportError(f"no dynamic-int8 gate for layers {sorted(unknown)[:3]}")
        feeds_g = {GATE_PREFIX + n: np.array(1.0 if n in on else 0.0, dtype=np.float32) for n in self.dynamic}
        wanted = list(outputs or self.model_outputs)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
        # dynamic int8 scales follow each call's input: simulate one sample per call, as a device runs at batch 1
        for batch in data.batches(1 if on else self.batch):
            outs = dict(zip(wanted, self.runtime.session.run(wanted, {**batch, **feeds_w, **feeds_g})))
            for k in wanted:
                parts[k].append(outs[k] if k in outs else batch[k])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def output(self, data: Dataset, weights=None, gates=()) -> np.ndarray:
        """The first model output (what distortions compare)."""
        return self.run(data, weights, gates)[self.model_outputs[0]]

    def hessians(self, data: Dataset, layers: Iterable[str]) -> dict[str, np.ndarray]:
        """``2·XᵀX/n`` of each layer's input over ``data``, float64. Rows are every sample and position, except
        padded positions when the model has an attention-mask input (``mask_rows``): they do not reach the output
        of a masked model, and short sentences padded to the full length would otherwise dominate."""
        wanted = {n: self.input_of[n] for n in layers if n in self.input_of}
        tensors = sorted(set(wanted.values()))
        sums: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        for batch in data.batches(self.batch):
            computed = [t for t in tensors if t not in batch]
            outs = self.run(Dataset("batch", batch, None, data.source), outputs=computed) if computed else {}
            mask = mask_rows(batch)
            for t in tensors:
                x = np.asarray(outs[t] if t in outs else batch[t], dtype=np.float64)
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    x = x[mask]
                x = x.reshape(-1, x.shape[-1])
                sums[t] = sums.get(t, 0) + x.T @ x
                rows[t] = rows.get(t, 0) + len(x)
        return {n: 2.0 * sums[t] / max(rows[t], 1) for n, t in wanted.items() if t in sums}


def mask_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Which [batch, sequence] positions are real tokens: an integer input named like ``*mask*``, else None."""
    for name, v in batch.items():
        if "mask" in name.lower() and v.ndim == 2 and v.dtype.kind in "iub":
            return v != 0
    return None
