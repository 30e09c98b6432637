"""TensorRT-ready ONNX: explicit quantization placed the way TensorRT fuses it (``../shared/design/TENSORRT.md``).

The host ships this graph and the device builds the engine (``edgekit.agent.engine``): engines are specific to the
GPU and the TensorRT version. ``tensorrt_graph`` turns the float graph and a plan into it:

- **INT8** (plan options ``w8a8``, ``w8a8d``, ``w4a8``; TensorRT has no dynamic or int4-weight x int8-activation
  scheme, so the last two run as static INT8): ``QuantizeLinear`` -> ``DequantizeLinear`` on every weighted layer's
  activation input (symmetric int8, per tensor, zero-point 0, scale from calibration) and ``DequantizeLinear`` on its
  weight (int8 initializer, per output channel along the axis TensorRT expects: Conv 0, Gemm ``transB`` 0 else 1,
  MatMul 1; ``axis`` always written). No Q/DQ on outputs; the bias stays float. A residual ``Add`` gets Q/DQ on its
  skip input only, so TensorRT fuses the Add into the convolution that produces the other input (rule 6).
- **INT4 weight-only** (``w4g64s`` / ``w4g128s`` on 2-D MatMul/Gemm weights, TensorRT >= 10): an INT4 initializer
  read by a blocked ``DequantizeLinear`` (opset 21, ``block_size`` 64/128 along the reduction axis, no zero-point),
  the form TensorRT-Model-Optimizer writes (rule 7). The codes are the plan's own (GPTQ) symmetric groups.
- **2:4** (``sparse2:4+...``): the structural step has already pruned the float weight along the reduction axis; the
  layer is listed so the engine build sets ``SPARSE_WEIGHTS`` (rule 9). 4:8 has no TensorRT form.
- **Other weight-only options** (2/3-bit, group 32, asymmetric): ``ai.edgekit::MatMulLowBit``, renamed to the
  TensorRT plugin node ``EdgekitMatMulLowBit`` by ``export.trt_plugins.to_tensorrt_nodes`` (only when the target
  lists the ``ai.edgekit`` plugin library).

Activation ranges: a histogram of ``|x|`` per tensor over the calibration data; the clipping point minimises the
expected squared error of symmetric int8 rounding plus clipping ("mse", as in TensorRT's pytorch-quantization) or is
the maximum ("max").

The result runs in ONNX Runtime as it is (Q/DQ pairs are standard ONNX), which is how the host verifies it; the
plugin rename comes after verification (``TrtGraph.for_tensorrt``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import CalibrationError, ExportError
from edgekit.inventory import WEIGHTED_OPS
from edgekit.plan import Plan, parse_option

log = logging.getLogger(__name__)

INT8_OPTIONS = ("w8a8", "w8a8d", "w4a8")
INT4_GROUPS = (64, 128)
INT4_OPSET = 21  # DequantizeLinear with block_size and INT4 initializers
QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear
HIST_BINS = 2048
METHODS = ("mse", "max")


@dataclass
class TrtGraph:
    """A TensorRT-ready graph and what the engine build needs to know about it."""

    model: object  # onnx.ModelProto, runnable in ONNX Runtime
    int8_layers: list[str] = field(default_factory=list)
    int4_layers: list[str] = field(default_factory=list)
    sparse_layers: list[str] = field(default_factory=list)
    plugin_layers: list[str] = field(default_factory=list)
    refittable: list[str] = field(default_factory=list)  # float initializers an engine can refit by name
    amax: dict[str, float] = field(default_factory=dict)

    def for_tensorrt(self):
        """The graph with ``ai.edgekit`` nodes in the form TensorRT's parser maps to plugins."""
        if not self.plugin_layers:
            return self.model
        from edgekit.export.trt_plugins import to_tensorrt_nodes

        return to_tensorrt_nodes(self.model)

    def engine_flags(self) -> dict:
        """Builder settings the plan implies (manifest ``engine.flags``)."""
        return {"fp16": True, "int8": bool(self.int8_layers), "int4": bool(self.int4_layers),
                "sparse_weights": bool(self.sparse_layers), "plugins": bool(self.plugin_layers)}


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# (output-channel axis, reduction axis) of a weighted node's weight, as TensorRT expects them (TENSORRT.md §2, §4)
_AXES = {"Conv": (0, 1), "ConvTranspose": (1, 0), "MatMul": (1, 0), "Gemm": (1, 0), "Gemm.transB": (0, 1)}


def _axes(node) -> tuple[int, int]:
    key = "Gemm.transB" if node.op_type == "Gemm" and _attr(node, "transB", 0) else node.op_type
    if key not in _AXES:
        raise ExportError(f"{node.name}: {node.op_type} has no weight axis rule")
    return _AXES[key]


def weight_axis(node) -> int:
    """The output-channel axis of a weighted node's weight (per-channel scales lie along it)."""
    return _axes(node)[0]


def reduction_axis(node) -> int:
    """The weight axis that is summed over (where 2:4 zeros and INT4 blocks lie)."""
    return _axes(node)[1]


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes in [-127, 127] and strictly positive per-channel scales (``max|w| / 127``)."""
    w = np.asarray(w, np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # TensorRT needs scales > 0
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def mse_amax(hist: np.ndarray, edges: np.ndarray) -> float:
    """The clipping point for symmetric int8 that minimises rounding (``s^2 / 12`` per value inside) plus clipping
    (``(|x| - c)^2`` outside) error over a histogram of ``|x|``."""
    centers = 0.5 * (edges[:-1] + edges[1:])
    total = hist.sum()
    if total == 0 or edges[-1] <= 0:
        return float(max(edges[-1], 1e-8))
    # candidates: the upper edges of the bins from 1/16 of the range up
    start = max(1, len(hist) // 16)
    cand = edges[start:]
    below = np.cumsum(hist)[start - 1:]  # values with |x| below each candidate edge
    cx = np.cumsum(hist * centers)[start - 1:]
    cxx = np.cumsum(hist * centers * centers)[start - 1:]
    tx, txx = cx[-1], cxx[-1]
    above_n, above_x, above_xx = total - below, tx - cx, txx - cxx
    clip = above_xx - 2 * cand * above_x + cand * cand * above_n
    s = cand / 127.0
    err = below * s * s / 12.0 + clip
    return float(cand[int(np.argmin(err))])


def calibrate_amax(model, tensors: list[str], calib: Dataset, *, method: str = "mse", batch: int = 8,
                   track=None) -> dict[str, float]:
    """Per-tensor activation ranges of ``tensors`` in ``model`` (float ModelProto) over ``calib``."""
    if method not in METHODS:
        raise ExportError(f"unknown calibration method {method!r}", hint=f"one of {', '.join(METHODS)}")
    if not tensors:
        return {}
    if len(calib) == 0:
        raise CalibrationError("TensorRT INT8 needs calibration data; the calibration set is empty")
    import onnx

    from edgekit.agent.runtime import OrtRuntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    rt = OrtRuntime(probe.SerializeToString())
    batches = list(calib.batches(batch))
    it = batches if track is None else track(batches, "calibrating (TensorRT INT8)", total=len(batches))
    peak = dict.fromkeys(tensors, 0.0)
    for feeds in it:  # pass 1: the range of each tensor
        out = rt.run(feeds)
        for name in tensors:
            peak[name] = max(peak[name], float(np.abs(out[name]).max(initial=0.0)))
    if method == "max":
        return {n: max(v, 1e-8) for n, v in peak.items()}
    hists = {n: np.zeros(HIST_BINS, np.int64) for n in tensors}
    for feeds in batches:  # pass 2: histograms over those ranges (a second run keeps memory to one batch)
        out = rt.run(feeds)
        for name in tensors:
            hists[name] += np.histogram(np.abs(out[name]), bins=HIST_BINS, range=(0.0, max(peak[name], 1e-8)))[0]
    return {n: mse_amax(hists[n], np.linspace(0.0, max(peak[n], 1e-8), HIST_BINS + 1)) for n in tensors}


def _route(plan: Plan, nodes: Mapping[str, object], inits: Mapping[str, np.ndarray], tensorrt_major: int,
           plugins: bool) -> tuple[list[str], list[str], list[str], list[str]]:
    """Split the plan's layers into (int8, int4, plugin, sparse) by what TensorRT can run."""
    from edgekit.errors import UnsupportedOnTarget
    from edgekit.wonly import weight_only

    int8, int4, plugin, sparse = [], [], [], []
    for c in plan.layers:
        if c.option == "fp32":
            continue
        parts = parse_option(c.option)
        node = nodes.get(c.layer)
        if node is None:
            raise ExportError(f"the plan names layer {c.layer!r}, which the graph does not have")
        if parts.sparsity is not None:
            if parts.sparsity != "sparse2:4":
                raise UnsupportedOnTarget(f"{c.layer}: TensorRT runs 2:4 sparsity only, not {parts.sparsity}")
            sparse.append(c.layer)
        if parts.base in INT8_OPTIONS:
            int8.append(c.layer)
        elif weight_only(parts.base):
            w = inits.get(node.input[1])
            bits, group, symmetric = weight_only(parts.base)
            if (tensorrt_major >= 10 and bits == 4 and symmetric
                    and group in INT4_GROUPS and node.op_type in ("MatMul", "Gemm") and w is not None and w.ndim == 2
                    and w.shape[reduction_axis(node)] % group == 0):
                int4.append(c.layer)
            elif plugins:
                plugin.append(c.layer)
            else:
                raise UnsupportedOnTarget(
                    f"{c.layer}: {c.option} has no TensorRT {tensorrt_major}.x form (INT4 weight-only needs "
                    "TensorRT >= 10, symmetric groups of 64/128 on a 2-D MatMul/Gemm weight)",
                    hint="use w4g128s or w8a8 for this layer, or a target that lists the ai.edgekit plugins")
        elif parts.base != "fp32":
            raise UnsupportedOnTarget(f"{c.layer}: option {c.option} has no TensorRT form")
    return int8, int4, plugin, sparse


def tensorrt_graph(fp32, plan: Plan, calib: Dataset, *, tensorrt_major: int = 10, plugins: bool = False,
                   weights: Mapping[str, object] | None = None, method: str = "mse", track=None,
                   amax: Mapping[str, float] | None = None) -> TrtGraph:
    """The TensorRT-ready form of ``fp32`` (a float ModelProto whose weighted nodes carry the plan's layer names,
    after any structural step) under ``plan``. ``weights`` holds the plan's QWeights of weight-only layers;
    ``amax`` activation ranges already calibrated (else calibrated here)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.op_type in WEIGHTED_OPS}
    int8, int4, plugin, sparse = _route(plan, nodes, inits, tensorrt_major, plugins)
    for layer in sparse:
        _check_24(nodes[layer], inits)
    missing = [n for n in int4 + plugin if weights is None or n not in weights]
    if missing:
        raise ExportError(f"quantized weights missing for weight-only layers {missing[:5]}")
    producer = {o: n for n in graph.node for o in n.output}
    act = [nodes[n].input[0] for n in int8]
    skips = _skip_inputs(graph, producer, set(int8))
    tensors = list(dict.fromkeys(act + skips))
    missing_amax = [t for t in tensors if amax is None or t not in amax]
    amax = {**(amax or {}), **calibrate_amax(fp32, missing_amax, calib, method=method, track=track)}

    new_inits: list = []
    dq_of: dict[str, str] = {}  # activation tensor -> its DequantizeLinear output
    out_nodes: list = []

    def qdq(tensor: str) -> str:
        if tensor not in dq_of:
            s = np.float32(max(amax[tensor], 1e-8) / 127.0)
            new_inits.extend([numpy_helper.from_array(np.array(s, np.float32), f"{tensor}_trt_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_trt_zp")])
            out_nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{tensor}_trt_scale", f"{tensor}_trt_zp"],
                                              [f"{tensor}_trt_q"], name=f"{tensor}_QuantizeLinear"))
            out_nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_trt_q", f"{tensor}_trt_scale",
                                                                    f"{tensor}_trt_zp"],
                                              [f"{tensor}_trt_dq"], name=f"{tensor}_DequantizeLinear"))
            dq_of[tensor] = f"{tensor}_trt_dq"
        return dq_of[tensor]

    drop_inits: set[str] = set()
    skip_set = set(skips)
    for node in list(graph.node):
        if node.name in int8:
            w_name = node.input[1]
            axis = weight_axis(node)
            q, scale = int8_per_channel(inits[w_name], axis)
            new_inits.extend([numpy_helper.from_array(q, f"{w_name}_trt_int8"),
                              numpy_helper.from_array(scale, f"{w_name}_trt_scale"),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{w_name}_trt_zp")])
            out_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{w_name}_trt_int8", f"{w_name}_trt_scale", f"{w_name}_trt_zp"],
                [f"{w_name}_trt_dq"], name=f"{node.name}_weight_DequantizeLinear", axis=axis))
            node.input[0] = qdq(node.input[0])
            node.input[1] = f"{w_name}_trt_dq"
            drop_inits.add(w_name)
        elif node.name in int4:
            w_name = node.input[1]
            new_inits.extend(_int4_initializers(node, w_name, weights[node.name]))
            qw = weights[node.name]
            out_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{w_name}_trt_int4", f"{w_name}_trt_scale"], [f"{w_name}_trt_dq"],
                name=f"{node.name}_weight_DequantizeLinear", axis=reduction_axis(node), block_size=int(qw.group)))
            node.input[1] = f"{w_name}_trt_dq"
            drop_inits.add(w_name)
        elif node.op_type == "Add" and any(i in skip_set for i in node.input):
            for i, name in enumerate(node.input):
                if name in skip_set:
                    node.input[i] = qdq(name)
        out_nodes.append(node)
    del graph.node[:]
    graph.node.extend(out_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name not in drop_inits or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    _set_opset(model, INT4_OPSET if int4 else QDQ_MIN_OPSET)
    result = TrtGraph(model, int8_layers=int8, int4_layers=int4, sparse_layers=sparse, plugin_layers=plugin,
                      amax=amax)
    if plugin:
        from edgekit.export.lowbit import apply_weight_only

        result.model = apply_weight_only(model, {n: weights[n] for n in plugin}, edgekit_ops=True)
    result.refittable = _float_biases(result.model)
    return result


def _skip_inputs(graph, producer: Mapping[str, object], int8: set[str]) -> list[str]:
    """Skip inputs of residual Adds: an Add whose one input is an INT8 layer's output consumed by the Add alone (the
    branch) gets Q/DQ on its other input, so TensorRT fuses the Add into that layer (TENSORRT.md §2, rule 6)."""
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    out = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in consts for i in node.input):
            continue
        branch = [getattr(producer.get(i), "name", None) in int8 and uses.get(i) == 1 for i in node.input]
        if sum(branch) == 1:
            out.extend(i for i, b in zip(node.input, branch, strict=True) if not b)
    return out


def _check_24(node, inits: Mapping[str, np.ndarray]) -> None:
    w = inits.get(node.input[1])
    if w is None:
        raise ExportError(f"{node.name}: 2:4 sparsity needs a constant weight")
    axis = reduction_axis(node)
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % 4:
        raise ExportError(f"{node.name}: 2:4 needs the reduction axis to be a multiple of 4, not {moved.shape[-1]}")
    nonzero = (moved.reshape(-1, 4) != 0).sum(axis=1)
    if (nonzero > 2).any():
        raise ExportError(f"{node.name}: the weight is not 2:4 sparse along its reduction axis "
                          f"({int((nonzero > 2).sum())} groups of 4 hold more than 2 non-zeros)")


def _int4_initializers(node, w_name: str, qw) -> list:
    """The INT4 codes ``[K, N]`` (MatMul) or ``[N, K]`` (Gemm ``transB``) and their block scales, symmetric."""
    from onnx import TensorProto, helper, numpy_helper

    if qw.zeros is not None or qw.bits != 4:
        raise ExportError(f"{node.name}: TensorRT INT4 needs symmetric 4-bit weights")
    codes = (qw.q[:, : qw.k].astype(np.int16) - 8).astype(np.int8)  # [N, K], symmetric midpoint 8
    scales = qw.scales.astype(np.float32)  # [N, K / group]
    if reduction_axis(node) == 0:  # stored as [K, N]
        codes, scales = codes.T, scales.T
    codes = np.ascontiguousarray(codes)
    tensor = helper.make_tensor(f"{w_name}_trt_int4", TensorProto.INT4, codes.shape, codes.flatten().tolist())
    return [tensor, numpy_helper.from_array(np.ascontiguousarray(scales), f"{w_name}_trt_scale")]


def _float_biases(model) -> list[str]:
    """Float biases of weighted layers: stable names an engine built with REFIT_INDIVIDUAL can refit (rule 10)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
            out.append(node.input[2])
    return out


def _set_opset(model, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            op.version = minimum
