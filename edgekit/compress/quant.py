"""INT8 quantization (static, QDQ): int8 weights per output channel, uint8 activations per tensor, calibrated.

On x86 the u8 x s8 integer kernels are the fast path (s8 x s8 is far slower in ONNX Runtime), so activations
stay unsigned. The math is ONNX Runtime's quantization tooling; this module decides its settings from a Plan and
quantizes exactly the layers the Plan marks ``w8a8``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import CalibrationError, ExportError
from edgekit.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class W8A8Config:
    """Settings of the ``w8a8`` option."""

    per_channel: bool = True
    calibration: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999
    calib_samples: int = 64
    bias_correction: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> W8A8Config:
        """The settings a plan records (``Plan.activations``); unknown calibration methods are refused."""
        from edgekit.errors import ConfigError

        try:
            cfg = cls(per_channel=str(d.get("weights", "int8 symmetric per-channel")).endswith("per-channel"),
                      calibration=str(d.get("calibration", "minmax")), calib_samples=int(d.get("calib_samples", 64)),
                      bias_correction=bool(d.get("bias_correction", True)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the plan's quantizer settings are malformed: {exc}",
                              hint="see plan.json 'activations' as edgekit wrote it") from None
        if cfg.calib_samples < 1:
            raise ConfigError("the plan's calib_samples must be at least 1")
        if cfg.calibration not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"unknown calibration method {cfg.calibration!r} in the plan",
                              hint="use minmax, entropy or percentile")
        return cfg

    def to_dict(self) -> dict:
        return {"scheme": "w8a8", "weights": "int8 symmetric per-channel" if self.per_channel else "int8 per-tensor",
                "activations": "uint8 per-tensor", "calibration": self.calibration,
                "calib_samples": self.calib_samples, "bias_correction": self.bias_correction}


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a Dataset (one sample per call)."""

    def __init__(self, data: Dataset, track=None) -> None:
        feeds = data.feeds()
        self._it = iter(track(feeds, "calibrating", total=len(feeds)) if track else feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of ORT's protocol, unused by static calibration
        pass


def quantize_w8a8(
    fp32_onnx: Path, out_path: Path, plan: Plan, calib: Dataset, config: W8A8Config, *, track=None
) -> Path:
    """Write a QDQ model in which the Plan's ``w8a8`` layers are quantized and its ``fp32`` layers stay float.

    Unweighted ops between quantized layers (Add, Clip, pooling) are quantized as ONNX Runtime sees fit, so that
    integer kernels chain without float round trips. With ``config.bias_correction`` the model is quantized twice:
    the first pass gives the quantized weights, whose expected output shift is then folded into the float biases
    before the final pass. ``track`` (e.g. ``Context.track``) draws calibration progress.
    """
    quantized = static_layers(plan)
    if not quantized:
        raise ExportError("quantize_w8a8 called with a plan that quantizes no layer")
    if len(calib) == 0:
        raise CalibrationError("calibration set is empty")
    calib = calib.take(config.calib_samples)
    if not config.bias_correction:
        return _with_int4(_quantize_static(fp32_onnx, out_path, plan, calib, config, track), fp32_onnx, plan)
    with tempfile.TemporaryDirectory(prefix="edgekit-bc-") as tmp:
        first = _with_int4(_quantize_static(fp32_onnx, Path(tmp) / "first.onnx", plan, calib, config, track),
                           fp32_onnx, plan)
        corrected = correct_biases(fp32_onnx, first, quantized, calib, Path(tmp) / "corrected.onnx")
        return _with_int4(_quantize_static(corrected, out_path, plan, calib, config, None), corrected, plan)


def static_layers(plan: Plan) -> list[str]:
    """The layers ORT's static quantizer handles: ``w8a8`` and ``w4a8`` (int8 first, then rewritten to int4)."""
    return [c.layer for c in plan.layers if c.option in ("w8a8", "w4a8")]


def _with_int4(path: Path, fp32_onnx: Path, plan: Plan) -> Path:
    """Rewrite the plan's ``w4a8`` layers of the QDQ model at ``path`` to int4 weights (``compress.int4``)."""
    four = plan.layers_with("w4a8")
    if not four:
        return path
    import onnx

    from edgekit.compress.int4 import to_int4

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:  # int4 DequantizeLinear needs opset 21
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, 21)
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
            raise ExportError(f"cannot raise the graph to opset 21 for int4 weights: {exc}") from exc
    to_int4(model, onnx.load(str(fp32_onnx)), four)
    onnx.save(model, str(path))
    return path


DYNAMIC_SETTINGS = {"scheme": "w8a8d", "weights": "int8 symmetric per-channel",
                    "activations": "uint8, quantized per call (dynamic)", "calibration": "none"}


def quantize_w8a8d(fp32_onnx: Path, out_path: Path, plan: Plan) -> Path:
    """Dynamic int8 of the plan's ``w8a8d`` layers (Linear/MatMul): int8 weights per output channel, activations
    quantized to uint8 per call (ONNX Runtime's MatMulInteger). No calibration: the scales follow each input."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layers = plan.layers_with("w8a8d")
    if not layers:
        raise ExportError("quantize_w8a8d called with a plan that has no w8a8d layer")
    try:
        quantize_dynamic(str(fp32_onnx), str(out_path), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=layers, op_types_to_quantize=["MatMul", "Gemm"])
    except Exception as exc:
        raise ExportError(f"dynamic INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
    import onnx

    # every quantized layer becomes one MatMulInteger (ORT renames and rewrites nodes, so count, don't match names)
    done = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(out_path), load_external_data=False).graph.node)
    if done < len(layers):
        raise ExportError(f"dynamic INT8 left layers float that the plan quantizes: {done} of {len(layers)} "
                          "became integer MatMuls")
    return Path(out_path)


def _quantize_static(fp32_onnx: Path, out_path: Path, plan: Plan, calib: Dataset, config: W8A8Config, track) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"CalibPercentile": config.percentile} if config.calibration == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="edgekit-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
            _drop_unused_domains(pre)
        except Exception as exc:  # pre-processing only helps; quantize the plain graph if it fails
            log.warning("ONNX Runtime's quantization pre-processing failed (%s); quantizing the graph as exported", exc)
            pre = Path(fp32_onnx)
        try:
            quantize_static(
                str(pre), str(out_path), _Reader(calib, track),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=config.per_channel, calibrate_method=methods[config.calibration],
                nodes_to_exclude=plan.layers_with("fp32"), extra_options=extra,
            )
        except Exception as exc:
            raise ExportError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return Path(out_path)


def _drop_unused_domains(path: Path) -> None:
    """Drop the opset imports of ``path``'s model that no node uses, keeping the default domain. ``quant_pre_process``
    saves through an ONNX Runtime session, which lists every domain registered in the process -- ``ai.edgekit`` at
    version 1000 once the native library has been loaded -- so the quantized file's bytes depended on what ran
    before in the process (a build and its replay by ``edgekit apply`` differed)."""
    import onnx

    from edgekit.export.onnx import all_nodes

    model = onnx.load(str(path))
    used = {n.domain for n in all_nodes(model)} | {f.domain for f in model.functions}
    kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
        onnx.save(model, str(path))


def _input_means(fp32, layers: list, calib: Dataset, batch: int = 8) -> dict[str, np.ndarray]:
    """Per-feature mean of each layer's input over the calibration data: the channel axis (1) for Conv, the last
    axis for Gemm/MatMul (``[batch, ..., features]``)."""
    import onnx
    from onnx import helper

    from edgekit.agent.runtime import OrtRuntime

    wanted = {n.input[0] for n in layers}
    feature_axis = {n.input[0]: 1 if n.op_type == "Conv" else -1 for n in layers}
    graph_inputs = {i.name for i in fp32.graph.input}
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    existing = {o.name for o in probe.graph.output}
    for name in sorted(wanted - graph_inputs - existing):
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sums: dict[str, np.ndarray] = {}
    count = 0
    with tempfile.TemporaryDirectory(prefix="edgekit-means-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, str(path))
        rt = OrtRuntime(path)
        from edgekit.inventory import graph_batch_size

        for feeds in calib.batches(graph_batch_size(probe, batch)):
            n = len(next(iter(feeds.values())))
            outs = rt.run(feeds)
            outs.update({k: v for k, v in feeds.items() if k in wanted})
            for name, v in outs.items():
                if name in wanted:
                    keep = feature_axis[name] % v.ndim
                    axes = tuple(a for a in range(v.ndim) if a != keep)
                    sums[name] = sums.get(name, 0) + v.astype(np.float64).mean(axis=axes) * n
            count += n
    return {node.name: sums[node.input[0]] / count for node in layers if node.input[0] in sums}


def correct_biases(fp32_path: Path, quantized_path: Path, layers: list[str], calib: Dataset, out_path: Path) -> Path:
    """Write a copy of the FP32 model whose quantized layers' biases absorb their weight-quantization shift."""
    import onnx
    from onnx import numpy_helper

    from edgekit.compress.bias_correction import dequantize, output_shift

    fp32 = onnx.load(str(fp32_path))
    q = onnx.load(str(quantized_path))
    inits = {i.name: i for i in fp32.graph.initializer}
    q_inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    q_producer = {o: n for n in q.graph.node for o in n.output}
    q_nodes = {n.name: n for n in q.graph.node}
    nodes = [n for n in fp32.graph.node if n.name in set(layers) and len(n.input) > 1 and n.input[1] in inits]
    means = _input_means(fp32, nodes, calib)
    corrected = 0
    for node in nodes:
        qn = q_nodes.get(node.name)
        dq = q_producer.get(qn.input[1]) if qn is not None and len(qn.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or node.name not in means:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        zp = q_inits.get(dq.input[2]) if len(dq.input) > 2 else None
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim < 2:
            continue
        w_q = dequantize(q_inits[dq.input[0]], q_inits[dq.input[1]], zp, axis)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            shift = output_shift(w, w_q, means[node.name], group=int(attrs.get("group", 1)))
        elif node.op_type == "Gemm":
            shift = output_shift(w, w_q, means[node.name], trans_b=bool(attrs.get("transB", 0)))
        else:  # MatMul: B is (K, N)
            shift = output_shift(w, w_q, means[node.name], trans_b=False)
        if len(node.input) > 2 and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), node.input[2]))
        elif node.op_type in ("Conv", "Gemm") and (len(node.input) == 2 or not node.input[2]):  # no bias: add one
            name = f"{node.input[1]}.bias_correction"
            fp32.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            if len(node.input) == 2:
                node.input.append(name)
            else:
                node.input[2] = name
        else:
            continue  # a bare MatMul has no bias input to fold the shift into
        corrected += 1
    log.info("bias correction applied to %d of %d quantized layers", corrected, len(layers))
    onnx.save(fp32, str(out_path))
    return Path(out_path)
