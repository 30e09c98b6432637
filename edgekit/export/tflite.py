"""Export to TFLite (LiteRT): a torch module becomes one ``.tflite`` artifact, float or quantized per a Plan.

Plan layers are torch module names of Conv/Linear layers (as ``export/onnx.py`` names ONNX nodes). Per option:

- ``fp32``: the layer stays float.
- ``w8a8``: static int8 through litert-torch's PT2E path: int8 weights (symmetric, per output channel) x int8
  activations (asymmetric, per tensor, HistogramObserver) calibrated on ``calib``. A Conv/Linear/add and a ReLU/ReLU6
  alone after it share one output observer (the activation fuses into the op at its clamped range); pads, pooling and
  reshapes keep their input's scale. Weight-quantization bias correction runs in torch first.
- weight options, by an ai-edge-quantizer recipe on the converted model (LiteRT kernels take symmetric weights):
  ``w8a8d`` dynamic-range int8; ``w4a8`` dynamic-range int4 per channel (activations quantized per call: PT2E has no
  int4 x int8 path to TFLite); ``w4g<G>s`` on Linear/embedding dynamic int4 in blocks of G (32-256); any other
  ``w4g*`` weight-only int4 per output channel (TFLite has no grouped or asymmetric weight-only int4: groups become
  channels, zero points are dropped); ``w8g*`` weight-only int8 per channel.
- 2/3-bit, N:M sparsity, ``+ch``/``+r``/``+e`` and ``drop``: ``UnsupportedOnTarget``.

Recipes select ops by regex over output tensor names. litert-torch names tensors after the module hierarchy of the
torch nodes they come from (``litert_torch.backend.debuginfo``), but an op writing a model output is named after the
signature instead. So a layer's ops are found by their *weight* (constant input) names, their outputs get a unique
marker for the recipe, and the markers are removed afterwards. A layer that cannot be found, or shares its names with
a layer of another option, raises ExportError: none is silently left float. Inputs and outputs are named as given and
stay float32 (the model quantizes and dequantizes inside); ``LiteRtRuntime`` also runs models with int8 I/O.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import ConfigError, EdgekitError, ExportError, UnsupportedOnTarget
from edgekit.fsutil import atomic_write_bytes, sha256_file
from edgekit.iospec import Artifact, TensorSpec
from edgekit.plan import Plan, parse_option

log = logging.getLogger(__name__)

HINT = "pip install 'edgekit[tflite]'"
_MARK = "|edgekit-layer:{}|"  # appended to a layer's op output names while ai-edge-quantizer runs
_MARK_RE = r"\|edgekit-layer:([^|]*)\|"
_NOISY = ("torchao", "jax", "absl", "litert_torch", "ai_edge_quantizer", "ai_edge_litert")
_MATMULS = {"CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "EMBEDDING_LOOKUP"}
# TFLite ops each ai-edge-quantizer scheme supports (its default policy): (kind, bits, blockwise) -> ops
_AEQ_OPS = {("weight_only", 8, False): _MATMULS | {"DEPTHWISE_CONV_2D"}, ("weight_only", 4, False): _MATMULS,
            ("dynamic", 8, False): _MATMULS | {"DEPTHWISE_CONV_2D"}, ("dynamic", 4, False): _MATMULS - {"BATCH_MATMUL"},
            ("dynamic", 4, True): {"FULLY_CONNECTED", "EMBEDDING_LOOKUP"}}
_KIND_OP = {"conv": "CONV_2D", "depthwise_conv": "DEPTHWISE_CONV_2D", "linear": "FULLY_CONNECTED",
            "embedding": "EMBEDDING_LOOKUP"}


@dataclass(frozen=True)
class Scheme:
    """How a layer is stored: ``float``, ``int8`` (static, PT2E), or an ai-edge-quantizer ``weight_only`` /
    ``dynamic`` recipe of ``bits`` per output channel (``block`` 0) or in blocks of ``block`` input columns."""

    kind: str
    bits: int = 8
    block: int = 0

    @property
    def ops(self) -> set[str]:
        return _AEQ_OPS.get((self.kind, self.bits, self.block > 0), set())


def scheme_for(layer: str, option: str, kind: str, columns: int = 0) -> Scheme:
    """The scheme of ``option`` on a layer of ``kind`` (conv, depthwise_conv, linear, embedding) with ``columns``
    input columns (blocks must divide them); raises UnsupportedOnTarget naming the layer and option when TFLite
    cannot express it."""
    parts = parse_option(option)

    def refuse(why: str) -> UnsupportedOnTarget:
        return UnsupportedOnTarget(f"layer {layer!r}: option {option!r} cannot be expressed in TFLite ({why})",
                                   hint="choose fp32, w8a8, w8a8d, w4a8 or w4g<G>[s] for this layer")

    if parts.structural:
        raise refuse("drop, +ch, +r, +e and N:M sparsity are not exported to TFLite")
    if parts.base in ("fp32", "w8a8"):
        if parts.base == "w8a8" and kind == "embedding":
            raise refuse("static int8 covers Conv and Linear layers")
        return Scheme("float" if parts.base == "fp32" else "int8")
    if parts.base in ("w8a8d", "w4a8"):
        scheme = Scheme("dynamic", int(parts.base[1]))
    else:
        m = re.fullmatch(r"w(\d)g(\d+)(s?)", parts.base)
        if int(m[1]) not in (4, 8):
            raise refuse(f"LiteRT has no {m[1]}-bit weights")
        blockwise = (m[1] == "4" and m[3] == "s" and int(m[2]) in (32, 64, 128, 256) and columns % int(m[2]) == 0
                     and kind in ("linear", "embedding"))
        scheme = Scheme("dynamic", 4, int(m[2])) if blockwise else Scheme("weight_only", int(m[1]))
    if _KIND_OP[kind] not in scheme.ops:
        raise refuse(f"ai-edge-quantizer has no {scheme.kind} {scheme.bits}-bit scheme for {_KIND_OP[kind]}")
    return scheme


def plan_schemes(plan: Plan, module) -> dict[str, Scheme]:
    """Each plan layer's scheme; ConfigError when the plan names a layer ``module`` does not have."""
    import torch

    subs = dict(module.named_modules())
    missing = [c.layer for c in plan.layers if c.layer not in subs]
    if missing:
        raise ConfigError(f"the plan names layers this module does not have: {missing[:5]}",
                          hint="plans name torch modules, as edgekit's ONNX export names layers")
    kinds = {n: "embedding" if isinstance(m, torch.nn.Embedding) else "linear" if isinstance(m, torch.nn.Linear)
             else "depthwise_conv" if getattr(m, "groups", 1) > 1 else "conv" for n, m in subs.items()}
    columns = {n: getattr(m, "in_features", getattr(m, "embedding_dim", 0)) for n, m in subs.items()}
    return {c.layer: scheme_for(c.layer, c.option, kinds[c.layer], columns[c.layer]) for c in plan.layers}


def _need(name: str):
    """Import an optional TFLite package, or raise ExportError with the install hint."""
    import importlib

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ExportError(f"TFLite export needs {name.split('.')[0]}, which is not installed ({exc})",
                          hint=HINT) from exc


@contextlib.contextmanager
def _quiet():
    """Around imports and conversions (never around progress bars): litert-torch's progress console off; Python and
    native (fd 2: TensorFlow/absl) output, and the packages' log records below ERROR, logged at debug; warnings off."""
    import tempfile
    from unittest import mock

    levels, out = {n: logging.getLogger(n).level for n in _NOISY}, io.StringIO()
    sys.stderr.flush()
    with (tempfile.TemporaryFile() as native, mock.patch.dict(os.environ, {"LITERT_TORCH_SHOW_PROGRESS": "n"}),
          warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out)):
        warnings.simplefilter("ignore")
        for n in _NOISY:
            logging.getLogger(n).setLevel(logging.ERROR)
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            native.seek(0)
            if text := (out.getvalue() + native.read().decode(errors="replace")).strip():
                log.debug("converter output:\n%s", text)


def bias_correct(module, layers: list[str], calib: Dataset, names: list[str], ctx: Context):
    """A copy of ``module`` whose Conv/Linear ``layers`` have their bias corrected for the expected output shift of
    per-channel int8 weights (``compress.bias_correction``; E[x] over ``calib``). A BatchNorm folded into the conv
    later keeps it right: symmetric per-channel quantization commutes with the per-channel BN scale."""
    import torch

    from edgekit.compress.bias_correction import output_shift

    mod = copy.deepcopy(module).eval()
    subs = dict(mod.named_modules())
    targets = {n: subs[n] for n in layers if isinstance(subs[n], (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))}
    sums, counts = {}, {}

    def hook(name):
        def record(m, args):
            x = args[0].detach()
            ch = x.ndim - 1 if isinstance(m, torch.nn.Linear) else 1
            sums[name] = sums.get(name, 0) + x.sum([d for d in range(x.ndim) if d != ch], dtype=torch.float64)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[ch]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for feeds in ctx.track(calib.batches(16), "bias correction", total=-(-len(calib) // 16)):
                mod(*[torch.from_numpy(feeds[n]) for n in names])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for n in set(targets) & set(counts):  # layers the data reached
            m, w = targets[n], targets[n].weight.detach()
            # PT2E's PerChannelMinMaxObserver: scale = max|w| / 127 per output channel (at least 2^-12)
            scale = torch.clamp(w.reshape(len(w), -1).abs().amax(1) / 127, min=2**-12).reshape(-1, *[1] * (w.ndim - 1))
            w_q = torch.clamp(torch.round(w / scale), -127, 127) * scale
            shift = output_shift(w.numpy(), w_q.numpy(), (sums[n] / counts[n]).numpy(), group=getattr(m, "groups", 1))
            if m.bias is None:
                m.bias = torch.nn.Parameter(torch.zeros(len(w), dtype=w.dtype))
            m.bias -= torch.from_numpy(shift).to(w.dtype)
    return mod


def _layer_of(node) -> str:
    """The plan layer of a Conv/Linear node: its weight's owner (as the ONNX exporter names nodes), else its module."""
    w = node.args[1] if len(node.args) > 1 else None
    if getattr(w, "op", None) == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target).removesuffix(".weight")
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _plan_quantizer(int8_layers: set[str]):
    """A litert-torch PT2EQuantizer that quantizes exactly ``int8_layers`` (static int8, see the module docstring)."""
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.pt2e_quantizer_utils import OP_TO_ANNOTATOR
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    a = torch.ops.aten
    weighted = {a.conv1d.default, a.conv2d.default, a.convolution.default, a.linear.default}
    fused = {(a.relu.default, ()), (a.relu_.default, ()), (a.relu6.default, ()), (a.hardtanh.default, (0.0, 6.0)),
             (a.hardtanh_.default, (0.0, 6.0)), (a.hardtanh.default, (-1.0, 1.0)), (a.hardtanh.default, (0.0, 1.0))}
    keep_scale = {t for t, _ in fused} | {
        a.pad.default, a.constant_pad_nd.default, a.max_pool2d.default, a.avg_pool2d.default, a.mean.dim,
        a.adaptive_avg_pool2d.default, a.mean.default, a.view.default, a.reshape.default, a.flatten.using_ints,
        a.permute.default, a.squeeze.dim, a.unsqueeze.default, a.dropout.default, a.clone.default, a.transpose.int}
    config = get_symmetric_quantization_config(is_per_channel=True)  # histogram activations, per-channel weights
    act, key = config.input_activation, "quantization_annotation"

    def done(n) -> bool:
        return key in n.meta and n.meta[key]._annotated

    def annotate(n, inputs: dict) -> None:
        """Observe the inputs of ``n``, and its output after the fusable activation alone following it, if any."""
        n.meta[key] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        u = next(iter(n.users)) if len(n.users) == 1 else None
        bounds = tuple(float(x) for x in u.args[1:3] if isinstance(x, (int, float))) if u is not None else ()
        if u is not None and u.op == "call_function" and (u.target, bounds) in fused:
            u.meta[key] = QuantizationAnnotation(output_qspec=act, _annotated=True)
        else:
            n.meta[key].output_qspec = act

    class PlanQuantizer(PT2EQuantizer):
        annotated: set[str] = set()

        def annotate(self, gm):
            float_modules, self.annotated = set(), set()
            for n in gm.graph.nodes:
                if n.op == "call_function" and n.target in weighted:
                    layer = _layer_of(n)
                    if layer not in int8_layers or (n.target is a.convolution.default and n.args[6]):  # transposed
                        float_modules.add(layer)
                        continue
                    annotate(n, {n.args[0]: act, n.args[1]: config.weight})
                    self.annotated.add(layer)

            def ok(n) -> bool:  # not inside a layer kept float (e.g. a conv's own padding)
                return not ({v[0] for v in (n.meta.get("nn_module_stack") or {}).values()} & float_modules)

            for n in gm.graph.nodes:
                if (n.op == "call_function" and n.target in (a.add.Tensor, a.sub.Tensor, a.mul.Tensor) and ok(n)
                        and not done(n) and all(isinstance(x, Node) for x in n.args[:2])):
                    annotate(n, {x: act for x in n.args[:2]})
            for op in ("cat", "fixed_qparams"):
                OP_TO_ANNOTATOR[op](gm, config, ok)
            for n in gm.graph.nodes:
                prev = n.args[0] if n.op == "call_function" and n.target in keep_scale and n.args else None
                if isinstance(prev, Node) and done(prev) and prev.meta[key].output_qspec and not done(n) and ok(n):
                    shared = SharedQuantizationSpec(prev)
                    n.meta[key] = QuantizationAnnotation({prev: shared}, output_qspec=shared, _annotated=True)
            return gm

    return PlanQuantizer().set_global(config)


def _fold_symmetric_pads(gm) -> int:
    """Symmetric zero pads that alone feed a conv2d become the conv's padding (exact). litert-torch keeps an FX pad in
    NCHW between two transposes, and after PT2E the converter no longer folds it into the int8 conv: EfficientNet-
    Lite0's stride-1 depthwise pads made its int8 model about 30 % slower. Asymmetric (SAME, stride 2) pads stay."""
    import torch

    a, folded = torch.ops.aten, 0
    for pad in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is a.pad.default]:
        conv = next(iter(pad.users)) if len(pad.users) == 1 else None
        mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
        value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value")
        if (conv is None or conv.target is not a.conv2d.default or conv.args[0] is not pad or conv.kwargs
                or mode != "constant" or value not in (None, 0) or len(pad.args[1]) != 4):
            continue
        left, right, top, bottom = pad.args[1]
        args = list(conv.args) + [None, [1, 1], [0, 0]][len(conv.args) - 2:]
        if left != right or top != bottom or min(left, top) < 0 or isinstance(args[4], str) or any(args[4]):
            continue
        args[0], args[4] = pad.args[0], [top, left]
        conv.args = tuple(args)
        gm.graph.erase_node(pad)
        folded += 1
    gm.recompile()
    return folded


def _convert_int8(litert, exported, int8: set[str], samples: list, ctx: Context):
    """PT2E static int8: annotate with the plan's quantizer, calibrate one sample at a time, convert."""
    import torch
    from litert_torch._convert import litert_converter
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _plan_quantizer(int8)
    with _quiet():
        gm = exported.module()
        log.debug("folded %d zero pads into their convolutions", _fold_symmetric_pads(gm))
        prepared = prepare_pt2e(gm, quantizer)
    left = sorted(int8 - quantizer.annotated)
    if left:
        raise UnsupportedOnTarget(f"static int8 cannot quantize layers {left[:5]} (not a Conv1d/Conv2d/Linear call)",
                                  hint="keep them at fp32")
    with torch.no_grad():
        for sample in ctx.track(samples, "calibrating", total=len(samples)):
            prepared(*sample)
    # Strict QDQ: the converter quantizes exactly the ops PT2E wrapped in quantize/dequantize. Otherwise it also
    # quantizes a float layer between two of them (weights included), undoing the plan's fp32 layers; strict also
    # keeps float model inputs and outputs (QUANTIZE/DEQUANTIZE inside). litert-torch has no argument for it.
    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig
    if not hasattr(original(), "strict_qdq_mode"):
        raise ExportError("this litert-torch cannot convert in strict QDQ mode, which keeps fp32 layers float",
                          hint="pip install 'litert-torch>=0.10'")

    def strict():
        config = original()
        config.strict_qdq_mode = True
        return config

    with _quiet():
        converted = convert_pt2e(prepared, fold_quantize=False)
        for m in converted.modules():  # the graph's ops are in eval form already; this only silences a warning
            m.training = False
        api.ConvertToTFLConfig = strict
        try:
            return litert.convert(converted, samples[0], quant_config=QuantConfig(pt2e_quantizer=quantizer))
        finally:
            api.ConvertToTFLConfig = original


def _quantize_weights(content: bytes, schemes: dict[str, Scheme], gm, plan: Plan) -> bytes:
    """Apply the ai-edge-quantizer recipe of ``schemes`` (layer -> weight scheme) to the converted model: each
    layer's ops are found by their constant inputs' names (``gm`` is the exported graph) and marked for the recipe."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu
    from ai_edge_quantizer import qtyping, quantizer
    from litert_torch.backend.debuginfo._build import _get_hierarchy

    options = {c.layer: c.option for c in plan.layers}
    weighted = {"aten.conv1d", "aten.conv2d", "aten.convolution", "aten.linear", "aten.embedding"}
    owners: dict[str, set[str]] = {}  # tensor name prefix -> the layers whose nodes litert-torch names so
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).rsplit(".", 1)[0] in weighted:
            owners.setdefault(_get_hierarchy(n), set()).add(_layer_of(n))
    model, found = fbu.read_model_from_bytearray(content), {}
    for sg in model.subgraphs:
        produced = {i for op in sg.operators for i in op.outputs} | set(sg.inputs)
        for op in sg.operators:
            op_name = fbu.opcode_to_name(model, op.opcodeIndex)
            consts = [sg.tensors[i].name.decode() for i in op.inputs if i >= 0 and i not in produced]
            for h, layers in owners.items():
                wanted = sorted(layers & set(schemes))
                if (op_name not in _MATMULS | {"DEPTHWISE_CONV_2D"} or not wanted
                        or not any(re.search(r"(?:^|;)" + re.escape(h), c) for c in consts)):
                    continue
                if len({options.get(x, "fp32") for x in layers}) > 1:
                    raise ExportError(f"layers {sorted(layers)} share the tensor names {h!r} in the converted "
                                      "model, so a recipe cannot tell them apart", hint="give them the same option")
                if op_name not in schemes[wanted[0]].ops:
                    raise UnsupportedOnTarget(f"layer {wanted[0]!r} became a TFLite {op_name}, for which ai-edge-"
                                              f"quantizer has no scheme for option {options[wanted[0]]!r}",
                                              hint="keep it at fp32")
                sg.tensors[op.outputs[0]].name += _MARK.format(wanted[0]).encode()
                for x in wanted:  # layers sharing names (and option) are marked by the first
                    found.setdefault(x, set()).add(op_name)
    missing = sorted(set(schemes) - set(found))
    if missing:
        raise ExportError(f"cannot find the TFLite ops of layers {missing[:5]} in the converted model",
                          hint="keep these layers at fp32 or w8a8")
    qt, g = quantizer.Quantizer(bytes(fbu.convert_object_to_bytearray(model))), qtyping.QuantGranularity
    for layer, scheme in schemes.items():
        add = qt.add_weight_only_config if scheme.kind == "weight_only" else qt.add_dynamic_config
        for op_name in found[layer]:
            add(re.escape(_MARK.format(layer)), qtyping.TFLOperationName(op_name), scheme.bits,
                getattr(g, f"BLOCKWISE_{scheme.block}") if scheme.block else g.CHANNELWISE)
    return bytes(qt.quantize(enable_progress_bar=False, enable_progress_report=False).quantized_model)


def _finish(content: bytes, input_names: list[str], output_names: list[str]) -> bytes:
    """Check that every marked layer got quantized weights, drop the markers, name the model's inputs and outputs."""
    from ai_edge_litert.schema_py_generated import TensorType
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model, left_float = fbu.read_model_from_bytearray(content), set()
    for sg in model.subgraphs:
        producer = {o: op for op in sg.operators for o in op.outputs}
        for op in sg.operators:
            for layer in re.findall(_MARK_RE, sg.tensors[op.outputs[0]].name.decode() if len(op.outputs) else ""):
                w, src = op.inputs[1], producer.get(op.inputs[1])
                if sg.tensors[w].type not in (TensorType.INT8, TensorType.INT4) and not (
                        src is not None and fbu.opcode_to_name(model, src.opcodeIndex) == "DEQUANTIZE"):
                    left_float.add(layer)
        for t in sg.tensors:
            t.name = re.sub(_MARK_RE, "", (t.name or b"").decode()).encode()
    if left_float:
        raise ExportError(f"ai-edge-quantizer left layers {sorted(left_float)[:5]} float", hint="keep them at fp32")
    sg = model.subgraphs[0]
    renames = dict(zip(sg.inputs, input_names)) | dict(zip(sg.outputs, output_names))
    for index, name in renames.items():
        sg.tensors[index].name = name.encode()
    for sig in model.signatureDefs or []:
        for entry in list(sig.inputs or []) + list(sig.outputs or []):
            entry.name = renames.get(entry.tensorIndex, entry.name.decode()).encode()
    return bytes(fbu.convert_object_to_bytearray(model))


def describe_tflite(path: Path) -> Artifact:
    """An Artifact for a ``.tflite`` file. Quantized float tensors (integers with a scale) are described as float32,
    the interface ``LiteRtRuntime`` gives them; a resizable dimension (-1) is ``batch`` first, else ``?``."""
    interpreter = _need("ai_edge_litert.interpreter").Interpreter(model_path=str(path))

    def spec(d: dict) -> TensorSpec:
        kind = np.dtype(d["dtype"])
        dtype = "float32" if d["quantization"][0] and kind.kind in "iu" else kind.name
        shape = tuple(("batch" if i == 0 else "?") if s < 0 else int(s) for i, s in enumerate(d["shape_signature"]))
        return TensorSpec(d["name"], shape, dtype)

    return Artifact(path=Path(path), format="tflite", sha256=sha256_file(path), runtime="tflite",
                    inputs=tuple(map(spec, interpreter.get_input_details())),
                    outputs=tuple(map(spec, interpreter.get_output_details())))


def export_tflite(module, inputs: tuple[TensorSpec, ...], output_names: tuple[str, ...], out_path: Path, *,
                  plan: Plan | None = None, calib: Dataset | None = None, ctx: Context | None = None,
                  bias_correction: bool | None = None) -> Artifact:
    """Convert the torch ``module`` (inputs ``inputs``, batch 1) to ``out_path`` and describe it: float without a
    plan, else each plan layer as its option asks (module docstring). ``calib`` feeds the int8 calibration, one
    sample at a time (the export specializes batch 1), and the bias correction (default: the plan's
    ``activations["bias_correction"]``, else on). The file appears only complete (temporary file, then rename)."""
    import torch

    from edgekit.model import example_inputs

    ctx = ctx or Context()
    schemes = plan_schemes(plan, module) if plan is not None else {}
    int8 = {layer for layer, s in schemes.items() if s.kind == "int8"}
    weights = {layer: s for layer, s in schemes.items() if s.ops}
    names = [s.name for s in inputs]
    if int8 and calib is None:
        raise ConfigError("static int8 (w8a8) layers need calibration data", hint="pass calib")
    if int8 and set(names) - set(calib.inputs):
        raise ConfigError(f"the calibration data has inputs {sorted(calib.inputs)}, the model {names}")
    if bias_correction is None:
        bias_correction = bool(plan.activations.get("bias_correction", True)) if plan is not None else True
    samples = [tuple(torch.from_numpy(f[n]) for n in names) for f in calib.feeds()] if int8 else []
    args = samples[0] if samples else example_inputs(tuple(inputs))
    module = copy.deepcopy(module).eval() if module.training else module
    try:
        with _quiet():
            litert = _need("litert_torch")
            _need("ai_edge_litert.interpreter")
            if weights:
                _need("ai_edge_quantizer")
        if int8 and bias_correction:
            module = bias_correct(module, sorted(int8), calib, names, ctx)
        with _quiet():
            exported = torch.export.export(module, args) if (int8 or weights) else None
            edge = None if int8 else litert.convert(module, args)
        edge = _convert_int8(litert, exported, int8, samples, ctx) if int8 else edge
        with _quiet():
            content = bytes(edge.model_content())
            if weights:
                content = _quantize_weights(content, weights, exported.module(), plan)
            content = _finish(content, names, list(output_names))
    except EdgekitError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converters raise anything; the user needs one clear error
        raise ExportError(f"TFLite conversion failed: {type(exc).__name__}: {exc}",
                          hint="keep the failing layers at fp32, or target ONNX Runtime") from exc
    atomic_write_bytes(Path(out_path), content)
    log.info("TFLite model written: %s (%.2f MB; %d static int8, %d weight-quantized layers)", out_path,
             len(content) / 1e6, len(int8), len(weights))
    return describe_tflite(Path(out_path))
