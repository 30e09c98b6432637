"""Normalization layers of an exported graph, as the agent adapts them.

A BatchNorm is folded into the Conv before it at export, so in the artifact a "norm layer" is a Conv whose output
channels were normalized. Re-estimating normalization statistics on new data is then a per-channel affine
correction of that Conv's output, ``y' = scale * y + shift``, which the agent writes into the Conv's own
parameters: the float weight and bias, or, in an int8 QDQ graph, the per-channel weight scale and the int32 bias.
Those initializers are *overridden in the model the session is created from* (``runtime.prepare_model``), so ONNX
Runtime still sees constants and still fuses the integer kernels; graph inputs would not fuse.

The bundle ships the table (``adapt.json``): for each layer its Conv, the initializers to override and the source
statistics of its output channels (measured by the build on calibration data). numpy + onnx only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ADAPT_FILE = "adapt.json"
SCHEMA_VERSION = 1
# bounds of the per-channel scale: a correction beyond them is a sign of collapse, not of a shift
SCALE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class NormLayer:
    name: str  # the Conv node
    tensor: str  # its output tensor (the stats are taken on a raw copy of the Conv: this may be post-activation)
    channels: int
    weight: str  # float weight initializer, or the per-channel scale of its DequantizeLinear
    weight_kind: str  # "float" | "qdq"
    bias: str  # float bias initializer, or the int32 quantized bias of its DequantizeLinear
    bias_kind: str  # "float" | "qdq"
    bias_scale: str | None  # the scale initializer of the bias DequantizeLinear (qdq)
    src_mean: tuple[float, ...]
    src_std: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> NormLayer:
        return cls(**{**d, "src_mean": tuple(d["src_mean"]), "src_std": tuple(d["src_std"])})


def _producers(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def locate(model, conv_names: Iterable[str]) -> list[dict]:
    """For each named Conv of ``model`` (ModelProto) that can be adapted, the initializers that carry its
    per-channel weight scale and bias. Convs without a bias or with per-tensor weight scales are left out."""
    from onnx import numpy_helper

    wanted = set(conv_names)
    inits = {i.name: i for i in model.graph.initializer}
    prod = _producers(model.graph)
    found: list[dict] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in wanted or len(node.input) < 3 or not node.input[2]:
            continue
        w_in, b_in = node.input[1], node.input[2]
        entry: dict = {"name": node.name, "tensor": node.output[0]}
        if w_in in inits:
            channels = int(inits[w_in].dims[0])
            entry.update(weight=w_in, weight_kind="float")
        elif w_in in prod and prod[w_in].op_type == "DequantizeLinear" and prod[w_in].input[1] in inits:
            scale = numpy_helper.to_array(inits[prod[w_in].input[1]])
            if scale.ndim != 1 or scale.size < 2:
                continue  # per-tensor weight scale: no per-channel handle
            channels = int(scale.size)
            entry.update(weight=prod[w_in].input[1], weight_kind="qdq")
        else:
            continue
        if b_in in inits:
            entry.update(bias=b_in, bias_kind="float", bias_scale=None)
        elif b_in in prod and prod[b_in].op_type == "DequantizeLinear" and all(
                t in inits for t in prod[b_in].input[:2]):
            entry.update(bias=prod[b_in].input[0], bias_kind="qdq", bias_scale=prod[b_in].input[1])
        else:
            continue
        entry["channels"] = channels
        found.append(entry)
    return found


def stats_model(model, layers: Sequence[Mapping]):
    """A copy of ``model`` with two extra outputs per layer: the per-channel mean and mean square of the raw Conv
    output (a duplicate of the Conv, before any fused activation), over batch and spatial axes."""
    from onnx import TensorProto, helper

    m = type(model)()
    m.CopyFrom(model)
    nodes = {n.name: n for n in m.graph.node}
    axes = helper.make_tensor("edgekit_stats_axes", TensorProto.INT64, [3], [0, 2, 3])
    m.graph.initializer.append(axes)
    for i, layer in enumerate(layers):
        conv = nodes[layer["name"]]
        raw = f"edgekit_raw_{i}"
        copy = helper.make_node("Conv", list(conv.input), [raw], name=f"edgekit_raw_conv_{i}")
        copy.attribute.extend(conv.attribute)
        sq = helper.make_node("Mul", [raw, raw], [f"{raw}_sq"], name=f"edgekit_sq_{i}")
        mean = helper.make_node("ReduceMean", [raw, axes.name], [f"edgekit_mean_{i}"], keepdims=0,
                                name=f"edgekit_mean_{i}")
        msq = helper.make_node("ReduceMean", [f"{raw}_sq", axes.name], [f"edgekit_msq_{i}"], keepdims=0,
                               name=f"edgekit_msq_{i}")
        m.graph.node.extend([copy, sq, mean, msq])
        for out in (f"edgekit_mean_{i}", f"edgekit_msq_{i}"):
            m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [layer["channels"]]))
    return m


def stats_outputs(outputs: Mapping[str, np.ndarray], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mean, variance) per layer from a stats session's outputs."""
    res = []
    for i in range(count):
        mean = np.asarray(outputs[f"edgekit_mean_{i}"], np.float64)
        var = np.maximum(np.asarray(outputs[f"edgekit_msq_{i}"], np.float64) - mean * mean, 0.0)
        res.append((mean, var))
    return res


def initial_values(model, layers: Sequence[NormLayer]) -> dict[str, np.ndarray]:
    """The source values of every initializer the layers override."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        for name in (layer.weight, layer.bias, layer.bias_scale):
            if name is not None:
                out[name] = numpy_helper.to_array(inits[name]).copy()
    return out


def overrides(layers: Sequence[NormLayer], source: Mapping[str, np.ndarray], scale: Mapping[str, np.ndarray],
              shift: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Initializer values that make each layer compute ``scale * y + shift`` (layers without a correction are
    left as they are)."""
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.name not in scale:
            continue
        s = np.clip(np.asarray(scale[layer.name], np.float64), *SCALE_BOUNDS)
        t = np.asarray(shift[layer.name], np.float64)
        w0 = source[layer.weight]
        if layer.weight_kind == "float":
            out[layer.weight] = (w0 * s.reshape((-1,) + (1,) * (w0.ndim - 1))).astype(w0.dtype)
        else:
            out[layer.weight] = (w0 * s).astype(w0.dtype)
        b0 = source[layer.bias]
        if layer.bias_kind == "float":
            out[layer.bias] = (b0 * s + t).astype(b0.dtype)
        else:  # int32 bias q with scale x_scale * w_scale: the scale follows the weight scale
            bs0 = source[layer.bias_scale].astype(np.float64)
            q = np.rint(b0.astype(np.float64) + t / (s * bs0))
            out[layer.bias] = np.clip(q, -(2**31), 2**31 - 1).astype(b0.dtype)
            out[layer.bias_scale] = (bs0 * s).astype(source[layer.bias_scale].dtype)
    return out


def save_table(path: Path, layers: Sequence[NormLayer], *, samples: int) -> dict:
    doc = {"schema_version": SCHEMA_VERSION, "method": "per-channel output statistics of BatchNorm-folded Convs",
           "calibration_samples": samples, "layers": [la.to_dict() for la in layers]}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def load_table(path: Path) -> list[NormLayer]:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {doc.get('schema_version')}; this agent reads {SCHEMA_VERSION}")
    return [NormLayer.from_dict(d) for d in doc["layers"]]
