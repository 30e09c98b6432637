"""The layer inventory of an ONNX graph: every weighted Conv / Gemm / MatMul with shapes, parameters and MACs, and
every embedding (a Gather from a constant 2-D table along axis 0), which weight-only options can compress.

Layer names are stable: the exporter names each weighted node after the module that owns its weight
(``_blocks.3._expand_conv``), so plans and reports speak the user's vocabulary. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
EMBEDDING_OPS = ("Gather",)


@dataclass(frozen=True)
class LayerInfo:
    name: str  # node name in the exported graph (= layer name in the Plan)
    op_type: str  # ONNX op
    kind: str  # "conv" | "depthwise_conv" | "linear" | "embedding": the profile's op kinds
    weight: str  # initializer name
    weight_shape: tuple[int, ...]
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates per sample (0 when shapes are unknown)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        return d


def graph_batch_size(model, default: int) -> int:
    """The batch an ONNX model must run with: its first input's static batch (e.g. 1), else ``default``."""
    dim = model.graph.input[0].type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") and dim[0].dim_value > 0 else default


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def layer_inventory(model_or_path) -> list[LayerInfo]:
    """List the weighted layers of an ONNX model (path or ModelProto), in graph order."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes only feed the MAC count
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type in EMBEDDING_OPS:
            table = inits.get(node.input[0]) if node.input else None
            if table is not None and len(table.dims) == 2 and int(_attr(node, "axis", 0)) == 0:
                wshape = tuple(int(d) for d in table.dims)
                layers.append(LayerInfo(name=node.name, op_type=node.op_type, kind="embedding", weight=node.input[0],
                                        weight_shape=wshape, params=int(np.prod(wshape)), macs=0))
            continue
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        wshape = tuple(int(d) for d in w.dims)
        params = int(np.prod(wshape))
        if len(node.input) > 2 and node.input[2] in inits:
            params += int(np.prod(inits[node.input[2]].dims))
        out_shape = shapes.get(node.output[0], ())
        spatial = int(np.prod([d for d in out_shape[2:] if d > 0])) if out_shape else 0
        if node.op_type == "Conv":
            group = int(_attr(node, "group", 1))
            kind = "depthwise_conv" if group > 1 and group == wshape[0] and wshape[1] == 1 else "conv"
            macs = int(np.prod(wshape)) * spatial
        else:
            kind = "linear"
            rows = int(np.prod([d for d in out_shape[1:-1] if d > 0])) if len(out_shape) > 2 else 1
            macs = int(np.prod(wshape)) * rows
        layers.append(
            LayerInfo(
                name=node.name, op_type=node.op_type, kind=kind, weight=node.input[1],
                weight_shape=wshape, params=params, macs=macs,
            )
        )
    return layers
