#!/usr/bin/env python
"""Competitor baselines ("peers") for edgekit: what ONNX Runtime's and OpenVINO/NNCF's own compression tools make of
the same FP32 ONNX model, measured the same way (fidelity to FP32 on held-out samples, batch-1 latency interleaved
with the FP32 ONNX Runtime session, file size).

Peers (each a function returning a :class:`Peer` record ``{name, path, size_bytes, notes}``):

* ONNX Runtime ``quantize_dynamic``: QInt8 weights, per-tensor (``ort-dynamic``) and per-channel
  (``ort-dynamic-pc``);
* ONNX Runtime ``quantize_static`` after ``quant_pre_process`` (CNNs): QDQ, QUInt8 activations, QInt8 per-channel
  weights, MinMax calibration (``ort-static``);
* ONNX Runtime ``MatMulNBitsQuantizer`` (transformers), 4-bit weights of the constant-weight MatMuls: the default
  blockwise round-to-nearest quantizer with block 32 / 128 (``ort-nbits4-rtn-b32``/``-b128``), the same with
  ``accuracy_level=4`` (int8 compute), the same with ``Gather`` added (embeddings quantized too), GPTQ (needs
  calibration data) and HQQ;
* OpenVINO (``openvino`` + ``nncf`` from PyPI; skipped with the reason when they do not import): the FP32 IR at
  ``INFERENCE_PRECISION_HINT=f32`` (``ov-fp32``), OpenVINO's defaults (IR saved with FP16 weights, default precision
  hint, bf16 on CPUs with AVX512-BF16/AMX: ``ov-default``), NNCF ``quantize`` INT8 (CNNs: ``nncf-int8``) and
  NNCF ``compress_weights`` INT8 / INT4 (transformers: ``nncf-w8``, ``nncf-w4-asym-g128``, ``nncf-w4-sym-g128``).
  OpenVINO models run through :class:`OvRuntime`, which has OrtRuntime's ``run(feeds)`` interface, so
  ``edgekit.agent.runtime.compare_latency`` times them interleaved with ONNX Runtime sessions.

CLI (from the repository root; MiniLM needs ``HF_HUB_OFFLINE=1``, set here when unset)::

    .venv/bin/python benchmarks/peers.py --model minilm --json benchmarks/results/peers_minilm.json
    .venv/bin/python benchmarks/peers.py --model efficientnet --json benchmarks/results/peers_efficientnet.json

The host's 2 cores are shared: timing waits for quiet (``--idle-wait``) and summarises only the rounds in which other
processes used under 10 % of the CPUs (the per-round load is printed and saved).

MiniLM: all-MiniLM-L6-v2 from ``examples/minilm.py`` at sequence length 128, on the real sentences of its
``make-data`` (the first 8 calibrate, the next ``--samples``, default 32, evaluate). EfficientNet-Lite0: edgekit's
built-in model with its built-in real photo crops (64 calibration crops, ``--samples`` evaluation crops, default 128,
from other photos).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks.build_cpu` and `examples.minilm` resolve from the repository root
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.peers")

MODELS = ("minilm", "efficientnet")
FAMILY = {"minilm": "transformer", "efficientnet": "cnn"}
THREADS = 2
MINILM_CALIB = 8  # the first sentences of examples/minilm.py's make_data; the following ones are held out
DEFAULT_SAMPLES = {"minilm": 32, "efficientnet": 128}
CALIB_SAMPLES = {"minilm": MINILM_CALIB, "efficientnet": 64}
PER_ROUND = {"minilm": 8, "efficientnet": 25}  # batch-1 calls per runtime per round (MiniLM ~10 ms, EffNet ~2 ms)
NBITS_OPS = ("MatMul",)


# --------------------------------------------------------------------------------------------------- records
@dataclass
class Peer:
    """One compressed model. ``runtime`` is ``onnxruntime`` (``path`` an .onnx) or ``openvino`` (``path`` an IR .xml
    with its .bin beside it; ``size_bytes`` counts both). ``config`` holds runtime settings (OpenVINO's precision
    hint). A peer that could not be made has ``path=None`` and the reason in ``notes["error"]``."""

    name: str
    path: Path | None
    size_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.path is not None

    def to_dict(self) -> dict:
        return {"name": self.name, "path": None if self.path is None else self.path.name,
                "size_bytes": self.size_bytes, "runtime": self.runtime, "config": dict(self.config),
                "notes": dict(self.notes)}


def _failed(name: str, exc: BaseException, runtime: str = "onnxruntime") -> Peer:
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    log.warning("peer %s failed: %s", name, msg)
    return Peer(name, None, 0, {"error": msg}, runtime)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers log every node at INFO on the root logger and NNCF draws tables and progress bars: mute them."""
    root = logging.getLogger()
    names = ("onnxruntime", "nncf", "openvino")
    old = root.level, {n: logging.getLogger(n).level for n in names}
    root.setLevel(max(root.level, logging.ERROR))
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(old[0])
        for n, lvl in old[1].items():
            logging.getLogger(n).setLevel(lvl)


# --------------------------------------------------------------------------------------------------- inspection
def onnx_embeddings(path: Path) -> dict[str, int]:
    """Embedding tables of an ONNX model (Gather nodes whose data is a 2-D weight): how many, how many quantized
    (a GatherBlockQuantized node, an integer initializer, or a DequantizeLinear feeding the Gather)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    tables = quantized = 0
    for n in g.node:
        if n.op_type == "GatherBlockQuantized":
            tables += 1
            quantized += 1
        elif n.op_type == "Gather" and n.input:
            src = n.input[0]
            if src in inits and len(inits[src].dims) == 2:
                tables += 1
                quantized += int(inits[src].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE))
            elif src in producer and producer[src].op_type == "DequantizeLinear":
                tables += 1
                quantized += 1
    return {"tables": tables, "quantized": quantized}


def nbits_zero_point_types(path: Path) -> list[str]:
    """Element types of the MatMulNBits zero points (``uint8`` packed, or float for HQQ; ``none`` when symmetric).
    Float zero points take a slower kernel path in ONNX Runtime's CPU MatMulNBits."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    kinds = set()
    for n in g.node:
        if n.op_type == "MatMulNBits":
            zp = n.input[3] if len(n.input) > 3 and n.input[3] else None
            kinds.add("none" if zp is None or zp not in inits
                      else onnx.helper.tensor_dtype_to_np_dtype(inits[zp].data_type).name)
    return sorted(kinds)


def onnx_op_counts(path: Path, ops: Iterable[str]) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    wanted = set(ops)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type in wanted:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def ov_embeddings(model) -> dict[str, Any]:
    """Embedding tables of an OpenVINO model: Gather ops whose data input traces back (through Convert, Subtract,
    Multiply, Reshape) to a 2-D constant; the constants' element types tell whether they are compressed."""
    tables, types = 0, []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Gather":
            continue
        node = op.input_value(0).get_node()
        for _ in range(8):
            kind = node.get_type_name()
            if kind == "Constant":
                break
            if kind not in ("Convert", "Subtract", "Multiply", "Reshape") or node.get_input_size() == 0:
                node = None
                break
            node = node.input_value(0).get_node()
        if node is None or node.get_type_name() != "Constant" or len(node.get_output_shape(0)) != 2:
            continue
        tables += 1
        types.append(node.get_output_element_type(0).get_type_name())
    quantized = sum(t not in ("f32", "f16", "bf16", "f64") for t in types)
    return {"tables": tables, "quantized": quantized, "element_types": sorted(set(types))}


def nbits_weight_difference(a: Path, b: Path) -> float | None:
    """The fraction of packed 4-bit weight bytes that differ between two MatMulNBits models with the same layers and
    layout (None when they are not comparable): e.g. to show that a GPTQ run changed next to nothing relative to
    round-to-nearest."""
    import onnx
    from onnx import numpy_helper

    def weights(path: Path) -> dict[str, np.ndarray]:
        g = onnx.load(str(path)).graph
        inits = {i.name: i for i in g.initializer}
        return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in g.node
                if n.op_type == "MatMulNBits" and n.input[1] in inits}

    wa, wb = weights(a), weights(b)
    if not wa or wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return None
    return sum(int((wa[k] != wb[k]).sum()) for k in wa) / sum(wa[k].size for k in wa)


def _ir_size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


# --------------------------------------------------------------------------------------------------- ORT peers
def _calib_reader(feeds: Sequence[Mapping[str, np.ndarray]]):
    """build_cpu's plain one-sample-per-call CalibrationDataReader (also iterable, as GPTQ's loader wants)."""
    from benchmarks.build_cpu import _Reader

    class Reader(_Reader):
        def __iter__(self):
            return iter(self._feeds)

    return Reader([dict(f) for f in feeds])


def ort_dynamic(fp32_path: Path, out_dir: Path, *, per_channel: bool = False, name: str | None = None) -> Peer:
    """``quantize_dynamic`` with QInt8 weights (every other setting at its default)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    name = name or ("ort-dynamic-pc" if per_channel else "ort-dynamic")
    out = Path(out_dir) / f"{name}.onnx"
    try:
        with _quiet():
            quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
        return _failed(name, exc)
    notes = {"tool": "onnxruntime.quantization.quantize_dynamic",
             "settings": {"weight_type": "QInt8", "per_channel": per_channel},
             "embeddings": onnx_embeddings(out),
             "ops": onnx_op_counts(out, ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"))}
    return Peer(name, out, out.stat().st_size, notes)


def ort_static(fp32_path: Path, out_dir: Path, calib_feeds: Sequence[Mapping[str, np.ndarray]], *,
               per_channel: bool = True, name: str = "ort-static") -> Peer:
    """``quant_pre_process`` then ``quantize_static``: QDQ, QUInt8 activations, QInt8 (per-channel) weights, MinMax."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    out = out_dir / f"{name}.onnx"
    pre = out_dir / f"{name}-pre.onnx"
    try:
        with _quiet():
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(out), _calib_reader(calib_feeds), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as exc:  # noqa: BLE001
        return _failed(name, exc)
    finally:
        pre.unlink(missing_ok=True)
    notes = {"tool": "onnxruntime.quantization.quant_pre_process + quantize_static",
             "settings": {"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
                          "per_channel": per_channel, "calibrate_method": "MinMax",
                          "calibration_samples": len(calib_feeds)}}
    return Peer(name, out, out.stat().st_size, notes)


def ort_nbits(fp32_path: Path, out_dir: Path, *, algo: str = "rtn", block_size: int = 32,
              calib_feeds: Sequence[Mapping[str, np.ndarray]] | None = None, accuracy_level: int | None = None,
              quantize_embeddings: bool = False, name: str | None = None) -> Peer:
    """``MatMulNBitsQuantizer``, 4-bit weights: ``algo`` is ``rtn`` (the default blockwise round-to-nearest
    quantizer, asymmetric), ``gptq`` (needs ``calib_feeds``) or ``hqq``. Only MatMuls with a constant weight are
    quantized unless ``quantize_embeddings`` adds ``Gather`` (RTN only).

    Seen with onnxruntime 1.32: its GPTQ (the neural_compressor port, ``weight_only.gptq``) feeds each column's
    rounding error forward through ``Hinv1[i:, i]`` of an upper-triangular factor, which is zero below the diagonal,
    so no error is propagated and the weights equal round-to-nearest's (the CLI reports the share of differing
    bytes); its asymmetric zero-point packing also fails when K / block_size is odd (K=384, block 128). HQQ writes
    float zero points, which take a slower MatMulNBits kernel."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if name is None:
        name = f"ort-nbits4-{algo}-b{block_size}"
        if accuracy_level is not None:
            name += f"-acc{accuracy_level}"
        if quantize_embeddings:
            name += "-emb"
    out = Path(out_dir) / f"{name}.onnx"
    ops = NBITS_OPS + (("Gather",) if quantize_embeddings else ())
    settings: dict[str, Any] = {"bits": 4, "block_size": block_size, "accuracy_level": accuracy_level,
                                "op_types_to_quantize": list(ops)}
    try:
        if algo == "rtn":
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                   accuracy_level=accuracy_level, op_types_to_quantize=ops)
            settings["algorithm"] = "DEFAULT (blockwise round-to-nearest), asymmetric"
        elif quantize_embeddings:
            raise ValueError("quantize_embeddings is only supported with algo='rtn'")
        elif algo == "gptq":
            if not calib_feeds:
                raise ValueError("GPTQ needs calibration feeds")
            cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_calib_reader(calib_feeds),
                                                op_types_to_quantize=ops)
            # The INC-derived GPTQ path packs asymmetric zero points wrongly when K / block_size is odd (e.g.
            # K=384, block 128: "cannot reshape array of size 576 into shape (384,newaxis)"); block 32 works.
            settings.update(algorithm="GPTQ, asymmetric", percdamp=cfg.percdamp, perchannel=cfg.perchannel,
                            actorder=cfg.actorder, calibration_samples=len(calib_feeds))
        elif algo == "hqq":
            cfg = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=ops)
            settings["algorithm"] = "HQQ"
        else:
            raise ValueError(f"unknown MatMulNBits algorithm {algo!r} (rtn, gptq, hqq)")
        t0 = time.perf_counter()
        with _quiet():
            q = mnq.MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size,
                                         is_symmetric=False, accuracy_level=accuracy_level, algo_config=cfg)
            q.process()
            model = q.model if isinstance(q.model, onnx.ModelProto) else q.model.model
            onnx.save(model, str(out))
        settings["quantize_s"] = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # noqa: BLE001
        return _failed(name, exc)
    notes = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "settings": settings,
             "embeddings": onnx_embeddings(out),
             "ops": onnx_op_counts(out, ("MatMulNBits", "GatherBlockQuantized", "MatMul")),
             "zero_points": nbits_zero_point_types(out)}
    return Peer(name, out, out.stat().st_size, notes)


# --------------------------------------------------------------------------------------------------- OpenVINO
def openvino_available() -> str | None:
    """None when openvino and nncf import, else why not."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        return f"{type(exc).__name__}: {exc}"
    return None


class OvRuntime:
    """An OpenVINO model compiled for the CPU with edgekit's runtime protocol (``run(feeds) -> {name: array}``),
    so that ``compare_latency`` can time it beside ``OrtRuntime``. ``precision`` sets INFERENCE_PRECISION_HINT
    (``f32``, ``bf16``, ``f16``); None keeps the plugin's default (bf16 on CPUs with AVX512-BF16 or AMX)."""

    name = "openvino"

    def __init__(self, model: Path | Any, *, precision: str | None = None, threads: int | None = THREADS,
                 config: Mapping[str, Any] | None = None) -> None:
        import openvino as ov

        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        cfg.update(config or {})
        core = ov.Core()
        self.path = Path(model) if isinstance(model, (str, Path)) else None
        self.compiled = core.compile_model(str(model) if self.path else model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.input_names = [_port_name(p, i, "input") for i, p in enumerate(self.compiled.inputs)]
        self.output_names = [_port_name(p, i, "output") for i, p in enumerate(self.compiled.outputs)]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(dict(feeds))  # share_outputs=False: the arrays are copies, as ORT's are
        return {n: np.asarray(res[p]) for n, p in zip(self.output_names, self.compiled.outputs)}


def _port_name(port, i: int, kind: str) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:  # an unnamed port
        return f"{kind}_{i}"


def _ov_read(fp32_path: Path):
    import openvino as ov

    return ov.convert_model(str(fp32_path))


def _ov_save(model, out_dir: Path, name: str, *, fp16: bool) -> Path:
    import openvino as ov

    xml = Path(out_dir) / f"{name}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=fp16)
    return xml


def _openvino(fp32_path: Path, out_dir: Path, name: str, *, fp16: bool, tool: str, hint: str | None) -> Peer:
    try:
        with _quiet():
            xml = _ov_save(_ov_read(fp32_path), out_dir, name, fp16=fp16)
    except Exception as exc:  # noqa: BLE001
        return _failed(name, exc, "openvino")
    notes = {"tool": tool, "settings": {"INFERENCE_PRECISION_HINT": hint or "plugin default"}}
    return Peer(name, xml, _ir_size(xml), notes, "openvino", {"precision": hint})


def openvino_fp32(fp32_path: Path, out_dir: Path, *, name: str = "ov-fp32") -> Peer:
    """The FP32 model in OpenVINO, IR with FP32 weights, INFERENCE_PRECISION_HINT=f32."""
    return _openvino(fp32_path, out_dir, name, fp16=False, hint="f32",
                     tool="openvino.convert_model + save_model(compress_to_fp16=False)")


def openvino_default(fp32_path: Path, out_dir: Path, *, name: str = "ov-default") -> Peer:
    """OpenVINO with its defaults: ``save_model`` (FP16 weights in the IR) and no precision hint (bf16 on this CPU)."""
    return _openvino(fp32_path, out_dir, name, fp16=True, hint=None,
                     tool="openvino.convert_model + save_model (defaults: compress_to_fp16=True)")


def nncf_int8(fp32_path: Path, out_dir: Path, calib_feeds: Sequence[Mapping[str, np.ndarray]], *,
              name: str = "nncf-int8") -> Peer:
    """NNCF post-training ``quantize`` (defaults: performance preset, INT8 weights and activations) on the OpenVINO
    model, saved with ``save_model`` defaults, run with the plugin's default precision for what stays float."""
    try:
        import nncf

        t0 = time.perf_counter()
        with _quiet():
            q = nncf.quantize(_ov_read(fp32_path), nncf.Dataset([dict(f) for f in calib_feeds]),
                              subset_size=len(calib_feeds))
            xml = _ov_save(q, out_dir, name, fp16=True)
        secs = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # noqa: BLE001
        return _failed(name, exc, "openvino")
    notes = {"tool": "nncf.quantize (OpenVINO backend) + openvino.save_model",
             "settings": {"preset": "default (performance: symmetric)", "subset_size": len(calib_feeds),
                          "INFERENCE_PRECISION_HINT": "plugin default", "quantize_s": secs}}
    return Peer(name, xml, _ir_size(xml), notes, "openvino", {"precision": None})


def nncf_weights(fp32_path: Path, out_dir: Path, *, mode: str = "int8", group_size: int = 128, ratio: float = 1.0,
                 name: str | None = None) -> Peer:
    """NNCF ``compress_weights`` (data-free): ``mode`` ``int8`` (INT8_ASYM per channel), ``int4_asym`` or
    ``int4_sym`` (``group_size``, ``ratio`` of the layers in INT4; NNCF keeps embeddings and the last layer INT8)."""
    name = name or ("nncf-w8" if mode == "int8" else f"nncf-w4-{mode.removeprefix('int4_')}-g{group_size}")
    try:
        import nncf

        modes = {"int8": nncf.CompressWeightsMode.INT8_ASYM, "int4_asym": nncf.CompressWeightsMode.INT4_ASYM,
                 "int4_sym": nncf.CompressWeightsMode.INT4_SYM}
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r} ({', '.join(modes)})")
        kwargs = {} if mode == "int8" else {"group_size": group_size, "ratio": ratio}
        t0 = time.perf_counter()
        with _quiet():
            model = nncf.compress_weights(_ov_read(fp32_path), mode=modes[mode], **kwargs)
            emb = ov_embeddings(model)
            xml = _ov_save(model, out_dir, name, fp16=True)
        secs = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # noqa: BLE001
        return _failed(name, exc, "openvino")
    notes = {"tool": "nncf.compress_weights (OpenVINO backend) + openvino.save_model",
             "settings": {"mode": modes[mode].name, **kwargs, "INFERENCE_PRECISION_HINT": "plugin default",
                          "compress_s": secs},
             "embeddings": emb}
    return Peer(name, xml, _ir_size(xml), notes, "openvino", {"precision": None})


# --------------------------------------------------------------------------------------------------- all peers
def peer_plan(family: str, calib_feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Callable[..., Peer]]:
    """The peers that apply to a model ``family`` (``transformer`` or ``cnn``): name -> fn(fp32_path, out_dir)."""
    cal = list(calib_feeds)
    plan: dict[str, Callable[..., Peer]] = {
        "ort-dynamic": lambda p, d: ort_dynamic(p, d, per_channel=False),
        "ort-dynamic-pc": lambda p, d: ort_dynamic(p, d, per_channel=True),
    }
    if family == "cnn":
        plan["ort-static"] = lambda p, d: ort_static(p, d, cal)
    elif family == "transformer":
        plan.update({
            "ort-nbits4-rtn-b32": lambda p, d: ort_nbits(p, d, algo="rtn", block_size=32),
            "ort-nbits4-rtn-b128": lambda p, d: ort_nbits(p, d, algo="rtn", block_size=128),
            "ort-nbits4-rtn-b32-acc4": lambda p, d: ort_nbits(p, d, algo="rtn", block_size=32, accuracy_level=4),
            "ort-nbits4-rtn-b32-emb": lambda p, d: ort_nbits(p, d, algo="rtn", block_size=32,
                                                             quantize_embeddings=True),
            "ort-nbits4-gptq-b32": lambda p, d: ort_nbits(p, d, algo="gptq", block_size=32, calib_feeds=cal),
            "ort-nbits4-hqq-b32": lambda p, d: ort_nbits(p, d, algo="hqq", block_size=32),
            "ort-nbits4-hqq-b128": lambda p, d: ort_nbits(p, d, algo="hqq", block_size=128),
        })
    else:
        raise ValueError(f"unknown model family {family!r} (transformer, cnn)")
    plan["ov-fp32"] = openvino_fp32
    plan["ov-default"] = openvino_default
    if family == "cnn":
        plan["nncf-int8"] = lambda p, d: nncf_int8(p, d, cal)
    else:
        plan.update({
            "nncf-w8": lambda p, d: nncf_weights(p, d, mode="int8"),
            "nncf-w4-asym-g128": lambda p, d: nncf_weights(p, d, mode="int4_asym", group_size=128),
            "nncf-w4-sym-g128": lambda p, d: nncf_weights(p, d, mode="int4_sym", group_size=128),
        })
    return plan


def build_peers(fp32_path: Path, calib_feeds: Sequence[Mapping[str, np.ndarray]], out_dir: Path, *,
                family: str, only: Iterable[str] | None = None) -> list[Peer]:
    """Make every peer of ``family`` (or those named in ``only``). Failures come back as records with the reason;
    OpenVINO peers are recorded as skipped when openvino/nncf do not import."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = peer_plan(family, calib_feeds)
    if only is not None:
        wanted = list(only)
        unknown = [n for n in wanted if n not in plan]
        if unknown:
            raise ValueError(f"unknown peer(s) {unknown} for a {family}; known: {', '.join(plan)}")
        plan = {k: v for k, v in plan.items() if k in wanted}
    no_ov = openvino_available()
    peers = []
    for name, make in plan.items():
        if no_ov and (name.startswith("ov-") or name.startswith("nncf-")):
            peers.append(Peer(name, None, 0, {"error": f"skipped: openvino/nncf unavailable ({no_ov})"}, "openvino"))
            continue
        t0 = time.perf_counter()
        peer = make(fp32_path, out_dir)
        peer.notes.setdefault("make_s", round(time.perf_counter() - t0, 1))
        log.info("peer %s: %s", name, "ok" if peer.ok else peer.notes.get("error"))
        peers.append(peer)
    return peers


def make_runtime(peer: Peer, *, threads: int | None = THREADS):
    """A runtime with ``run(feeds)`` for a peer: OrtRuntime for ONNX files, OvRuntime for OpenVINO IRs."""
    if not peer.ok:
        raise ValueError(f"peer {peer.name} has no model: {peer.notes.get('error')}")
    if peer.runtime == "openvino":
        return OvRuntime(peer.path, precision=peer.config.get("precision"), threads=threads)
    from edgekit.agent.runtime import OrtRuntime

    return OrtRuntime(peer.path, threads=threads)


# --------------------------------------------------------------------------------------------------- models
@dataclass
class Prepared:
    fp32_path: Path
    calib: Any  # edgekit.data.Dataset
    evaluation: Any
    classification: bool
    description: str


def prepare_minilm(work: Path, samples: int, ctx) -> Prepared:
    """all-MiniLM-L6-v2 (examples/minilm.py) exported the pipeline's way at sequence length 128, on the real sentences
    of its ``make_data``: the first MINILM_CALIB calibrate, the next ``samples`` evaluate (the default 32 are the rest
    of its 40 hand-written sentences)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgekit.data import Dataset, integer_inputs, load_data
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model
    from examples.minilm import SEQ, make_data

    npz = work / "minilm-sentences.npz"
    make_data(str(npz))
    model = load_model("examples.minilm:make_model", input_shapes=[(1, SEQ), (1, SEQ)],
                       input_dtypes=integer_inputs(str(npz)), ctx=ctx)
    with _quiet():
        fp32 = export_onnx(model, work / "minilm-fp32.onnx")
    data = load_data(npz, model.inputs, None, role="evaluation")
    held_out = len(data) - MINILM_CALIB
    if samples > held_out:
        log.warning("make-data gave %d held-out sentences; evaluating on those, not %d", held_out, samples)
        samples = held_out

    def part(a: int, b: int, role: str):
        return Dataset(f"minilm-{role}", {k: v[a:b] for k, v in data.inputs.items()}, None, str(npz))

    return Prepared(fp32.path, part(0, MINILM_CALIB, "calibration"),
                    part(MINILM_CALIB, MINILM_CALIB + samples, "evaluation"), False,
                    f"all-MiniLM-L6-v2 (examples.minilm:make_model), seq {SEQ}, mean-pooled normalised embedding")


def prepare_efficientnet(work: Path, samples: int, ctx) -> Prepared:
    """edgekit's built-in EfficientNet-Lite0 exported the pipeline's way; built-in real photo crops (64 calibration
    crops, ``samples`` evaluation crops from other photos)."""
    from edgekit.data import load_data
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model

    model = load_model("builtin:efficientnet-lite0", ctx=ctx)
    with _quiet():
        fp32 = export_onnx(model, work / "efficientnet-lite0-fp32.onnx")
    calib = load_data(model.default_calib, model.inputs, model.preprocessing, role="calibration",
                      limit=CALIB_SAMPLES["efficientnet"], seed=ctx.seed)
    evald = load_data(model.default_eval, model.inputs, model.preprocessing, role="evaluation", limit=samples,
                      seed=ctx.seed)
    return Prepared(fp32.path, calib, evald, True, "EfficientNet-Lite0 (builtin:efficientnet-lite0), 1x3x224x224")


def bench_model(name: str, work: Path, *, samples: int, rounds: int, per_round: int, threads: int | None,
                only: Iterable[str] | None = None, idle_wait_s: float = 0.0) -> dict:
    from edgekit.context import Context

    ctx = Context(seed=0, progress=False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = (prepare_minilm if name == "minilm" else prepare_efficientnet)(work, samples, ctx)
    timings["export_and_data_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    peers = build_peers(prep.fp32_path, prep.calib.feeds(), work / "peers", family=FAMILY[name], only=only)
    timings["peers_s"] = round(time.perf_counter() - t0, 1)
    by_name = {p.name: p for p in peers if p.ok}
    for p in peers:
        rtn = by_name.get(p.name.replace("-gptq-", "-rtn-"))
        if p.ok and "-gptq-" in p.name and rtn is not None:
            p.notes["weight_bytes_differing_from_" + rtn.name] = nbits_weight_difference(p.path, rtn.path)
    t0 = time.perf_counter()
    eval_feeds = prep.evaluation.feeds()
    load_log: list[dict] = []
    from benchmarks.measure import evaluate

    results = evaluate(peers, prep.fp32_path, eval_feeds, classification=prep.classification,
                       latency_feeds=eval_feeds[0], rounds=rounds, per_round=per_round, threads=threads,
                       idle_wait_s=idle_wait_s, load_log=load_log)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    return {"model": name, "description": prep.description, "family": FAMILY[name],
            "calibration": {"source": prep.calib.source, "samples": len(prep.calib)},
            "evaluation": {"source": prep.evaluation.source, "samples": len(prep.evaluation)},
            "classification": prep.classification, "variants": results, "timings": timings,
            "latency_rounds_load": load_log}


# --------------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(res: dict) -> str:
    rows = []
    head = (f"{'variant':<24} {'runtime':<8} {'prec':<5} {'size MB':>8} {'size x':>7} {'cosine':>8} {'SQNR dB':>8} "
            f"{'top-1':>6} {'b1 ms':>8} {'lat x':>6} {'x range':>10}  emb q")
    rows += [head, "-" * len(head)]
    for k, r in res["variants"].items():
        if r.get("mean_cosine") is None:
            rows.append(f"{k:<24} {r['runtime'][:8]:<8} FAILED: {r['notes'].get('error', '?')}")
            continue
        lat = r.get("latency_batch1") or {}
        rng = f"{lat['ratio_min']:.2f}-{lat['ratio_max']:.2f}" if lat else "-"
        prec = r.get("config", {}).get("compiled_precision", "-")
        emb = r["notes"].get("embeddings")
        emb_s = f"{emb['quantized']}/{emb['tables']}" if emb else "-"
        rows.append(
            f"{k:<24} {'ort' if r['runtime'] == 'onnxruntime' else 'ov':<8} {prec[:5]:<5} "
            f"{r['size_bytes'] / 1e6:>8.2f} {r.get('size_ratio_vs_fp32', 1.0):>7.3f} {r['mean_cosine']:>8.4f} "
            f"{min(r['sqnr_db'], 999):>8.1f} {_fmt(r['top1_agreement'], '6.1%'):>6} "
            f"{_fmt(lat.get('median_ms'), '8.3f'):>8} {_fmt(lat.get('ratio_vs_fp32'), '6.3f'):>6} {rng:>10}  {emb_s}")
    notes = []
    for k, r in res["variants"].items():
        n = r.get("notes", {})
        for key, val in n.items():
            if key.startswith("weight_bytes_differing_from_") and val is not None:
                notes.append(f"{k}: {val:.4%} of its packed 4-bit weight bytes differ from "
                             f"{key.removeprefix('weight_bytes_differing_from_')}'s")
        if any(z.startswith("float") for z in n.get("zero_points", [])):
            notes.append(f"{k}: float zero points ({'/'.join(n['zero_points'])}): a slower MatMulNBits kernel path")
    if notes:
        rows += ["", "notes:", *[f"  {x}" for x in notes]]
    return "\n".join(rows)


def plot_svg(res: dict, *, x: str = "size") -> str:
    """An SVG scatter of the results (edgekit.svgplot): ``x`` is ``size`` (x FP32) or ``latency`` (batch-1 ms, log
    scale) against fidelity (top-1 agreement for classifiers, else mean cosine), one series per tool."""
    from edgekit.svgplot import scatter_svg

    metric = "top1_agreement" if res.get("classification") else "mean_cosine"
    groups: dict[str, list] = {}
    for k, r in res["variants"].items():
        if r.get(metric) is None:
            continue
        if x == "size":
            xv = r.get("size_ratio_vs_fp32", 1.0)
        else:
            xv = (r.get("latency_batch1") or {}).get("median_ms", math.nan)
        tool = "FP32" if k == "fp32" else "ONNX Runtime" if r["runtime"] == "onnxruntime" else "OpenVINO / NNCF"
        groups.setdefault(tool, []).append((xv, r[metric], k))
    markers = {"FP32": "diamond", "ONNX Runtime": "square", "OpenVINO / NNCF": "triangle"}
    series = [{"name": n, "points": pts, "marker": markers.get(n, "circle")} for n, pts in groups.items()]
    return scatter_svg(series, title=f"{res['model']}: {'size' if x == 'size' else 'batch-1 latency'} vs fidelity",
                       x_label="size (x FP32)" if x == "size" else "batch-1 latency (ms)",
                       y_label="top-1 agreement with FP32" if metric == "top1_agreement" else "mean cosine to FP32",
                       log_x=x != "size", width=640, height=420)


def environment() -> dict:
    from benchmarks.build_cpu import environment as base

    env = base()
    for pkg in ("openvino", "nncf"):
        try:
            env["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            env["versions"][pkg] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--samples", type=int, default=None,
                    help="held-out evaluation samples (default: minilm 32, efficientnet 128)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (default 9)")
    ap.add_argument("--per-round", type=int, default=None, help="batch-1 calls per runtime per round")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"threads for every runtime (default {THREADS})")
    ap.add_argument("--idle-wait", type=float, default=60.0, metavar="S",
                    help="before each timing round wait for other processes to leave the CPUs idle, up to S seconds "
                         "in all (default 60; 0 turns it off)")
    ap.add_argument("--peers", default=None, help="comma-separated subset of the peers to run")
    ap.add_argument("--svg", default=None, metavar="PREFIX",
                    help="also write PREFIX-size.svg and PREFIX-latency.svg (fidelity against size and latency)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the models in this folder instead of a temp dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    samples = args.samples or DEFAULT_SAMPLES[args.model]
    if samples < 1 or args.rounds < 1:
        ap.error("--samples and --rounds must be at least 1")
    per_round = args.per_round or PER_ROUND[args.model]
    only = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else None

    env = environment()
    print(f"edgekit peers benchmark — {args.model} — {env['date']} — {env['cpu'].get('model name', '?')}, "
          f"{env['cpu_count']} CPUs — {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as tmp:
        work = args.keep if args.keep is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = bench_model(args.model, work, samples=samples, rounds=args.rounds, per_round=per_round,
                          threads=args.threads, only=only, idle_wait_s=args.idle_wait)
    total = round(time.perf_counter() - t_start, 1)
    print(f"\n=== {res['description']} — eval {res['evaluation']['source']} x{res['evaluation']['samples']}, "
          f"calib x{res['calibration']['samples']}; fidelity vs the FP32 ONNX in ONNX Runtime; batch-1 latency "
          f"interleaved ({args.rounds} rounds x {per_round}), {args.threads} threads ===")
    print(format_table(res))
    loads = [x["foreign_cpu_share"] for x in res["latency_rounds_load"] if x["foreign_cpu_share"] is not None]
    if loads:
        waited = sum(x["waited_s"] for x in res["latency_rounds_load"])
        used = res["variants"]["fp32"].get("latency_batch1", {}).get("rounds_used", [])
        print(f"CPU share used by other processes per timing round: {', '.join(f'{x:.0%}' for x in loads)} "
              f"(waited {waited:.0f} s for quiet); latency from rounds {used}")
    print(f"(timings: {res['timings']}; total {total} s; 'emb q' = embedding tables quantized / found)")
    if args.svg:
        for kind in ("size", "latency"):
            svg_path = Path(f"{args.svg}-{kind}.svg")
            svg_path.parent.mkdir(parents=True, exist_ok=True)
            svg_path.write_text(plot_svg(res, x=kind))
            print(f"wrote {svg_path}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        doc = {"environment": env, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "settings": {"samples": res["evaluation"]["samples"], "rounds": args.rounds, "per_round": per_round,
                            "idle_wait_s": args.idle_wait,
                            "threads": args.threads, "batch": 1, "reference": "FP32 ONNX in ONNX Runtime"},
               "results": res, "total_s": total, "loadavg_at_end": load}
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
