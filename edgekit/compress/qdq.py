"""Simulated mixed models: quantize chosen layers of a float graph with the parameters of a fully quantized one.

A QDQ model quantized once (calibrated once, bias-corrected) holds every layer's int8 weights, int32 biases and the
scale of every layer's input. ``insert`` builds the float model in which only the chosen layers are quantized:
their input goes through Quantize/Dequantize with that scale, and their weight and bias are read through
DequantizeLinear from the quantized initializers. Everything else stays exactly float (including the Clip/ReLU
nodes that ONNX Runtime folds into the uint8 range of a fully quantized graph). ORT calibrates on the float model,
so these variants carry the scales a fresh quantization would get, without calibrating again: the sensitivity
analysis measures with the quantizer that will actually be applied.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgekit.errors import ExportError
from edgekit.inventory import WEIGHTED_OPS


def insert(fp32, q_full, quantized: Iterable[str]):
    """A copy of ``fp32`` (ModelProto) in which the layers named in ``quantized`` are quantized as in ``q_full``."""
    import onnx
    from onnx import helper

    keep = set(quantized)
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    q_producer = {o: n for n in q_full.graph.node for o in n.output}
    q_nodes = {n.name: n for n in q_full.graph.node if n.op_type in WEIGHTED_OPS}
    q_inits = {i.name: i for i in q_full.graph.initializer}
    have = {i.name for i in graph.initializer}

    def copy_init(name: str) -> str:
        if name and name not in have:
            if name not in q_inits:
                raise ExportError(f"quantized model lacks initializer {name!r}")
            graph.initializer.append(q_inits[name])
            have.add(name)
        return name

    def dq_of(tensor: str, layer: str, role: str):
        dq = q_producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            raise ExportError(f"layer {layer!r}: its {role} is not dequantized in the quantized model")
        return dq

    new_nodes = []
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS and node.name in keep:
            qn = q_nodes.get(node.name)
            if qn is None:
                raise ExportError(f"layer {node.name!r} is not in the quantized model")
            tag = node.name
            # input activation: Q -> DQ with the calibrated scale and zero point
            a_dq = dq_of(qn.input[0], tag, "input")
            scale, zp = copy_init(a_dq.input[1]), copy_init(a_dq.input[2]) if len(a_dq.input) > 2 else ""
            q_out, dq_out = f"{tag}::x_q", f"{tag}::x_dq"
            new_nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale, zp], [q_out], name=f"{tag}::Q"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out], name=f"{tag}::DQ"))
            node.input[0] = dq_out
            # weight and bias: DequantizeLinear of the quantized initializers
            for k, role in ((1, "weight"), (2, "bias")):
                if k >= len(qn.input) or not qn.input[k]:
                    continue
                w_dq = dq_of(qn.input[k], tag, role)
                out = f"{tag}::{role}_dq"
                dq = helper.make_node("DequantizeLinear", [copy_init(t) for t in w_dq.input], [out],
                                      name=f"{tag}::{role}_DQ")
                dq.attribute.extend(w_dq.attribute)
                new_nodes.append(dq)
                if k < len(node.input):
                    node.input[k] = out
                else:
                    node.input.append(out)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _prune_initializers(graph)
    return model


def _prune_initializers(graph) -> None:
    used = {t for n in graph.node for t in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
