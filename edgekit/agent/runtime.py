"""Runtimes that execute an artifact. This module holds the ONNX Runtime backend; others join it behind the
same small protocol (``run(feeds) -> outputs``). No torch here: the agent and the verifier share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgekit.errors import ExportError

log = logging.getLogger(__name__)


class Runtime(Protocol):
    name: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# ONNX Runtime's WeightBiasQuantization pass quantizes a float Conv/Gemm that sits between DequantizeLinear and
# QuantizeLinear nodes, silently undoing a plan that keeps that layer float. Plans are the contract: disable it
# wherever an artifact runs (the verifier and the agent share this class).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


INT4_TYPES = (22, 21)  # onnx.TensorProto.INT4, UINT4


def widen_int4(model) -> int:
    """Int4 weights are stored packed (half the bytes of int8) but ONNX Runtime's CPU kernels fuse only int8 Q/DQ
    groups into integer convolutions: the same graph with int4 weight DequantizeLinear runs several times slower.
    Every int4/uint4 *initializer* read by a DequantizeLinear of ``model`` (ModelProto, changed in place) is widened
    to int8/uint8, losslessly (same values, scales and zero points); the stored artifact keeps its size and runs
    correctly unwidened too. Returns how many were widened."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq_inputs = {t for n in model.graph.node if n.op_type == "DequantizeLinear" for t in n.input[:3] if t}
    widened = 0
    for name in dq_inputs:
        init = inits.get(name)
        if init is None or init.data_type not in INT4_TYPES:
            continue
        wide = numpy_helper.to_array(init).astype(np.int8 if init.data_type == 22 else np.uint8)
        init.CopyFrom(numpy_helper.from_array(wide, name))
        widened += 1
    return widened


# ai.edgekit ops that have a standard-ONNX form (edgekit.kernels.ort_python): (ops, function, what the warning says)
STANDARD_FORMS = (
    (("MatMulSparse24",), "sparse24_to_standard", "MatMulSparse24 as dense standard ops (no 2:4 speed-up)"),
    (("QLinearDepthwiseConv", "QLinearConvDirect"), "qconv_to_standard", "the int8 convolutions as ONNX Runtime's "
     "QLinearConv (same output, no speed-up)"),
)


def prepare_model(path: Path | bytes, opts, overrides: Mapping[str, np.ndarray] | None = None, *,
                  native_registered: bool = False) -> bytes | str:
    """What the session loads: the model as given, unless it holds int4 weights (widened, ``widen_int4``),
    ``ai.edgekit`` ops (the native library ``libedgekit_ort.so`` is registered with ``opts`` when it is built and not
    ``native_registered`` already; otherwise they run through the onnxruntime-extensions Python fallback,
    ``edgekit.kernels.ort_python``, with a warning) or initializers to override (written into the model, so that
    they stay constants to the graph optimizer; ``SessionOptions.add_initializer`` is not used because ONNX Runtime's
    NCHWc transformer repacks Conv weights from the original values and ignores it). The file is parsed once to
    tell."""
    import onnx

    model = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
    int4 = any(i.data_type in INT4_TYPES for i in model.graph.initializer)
    custom = any(o.domain == "ai.edgekit" for o in model.opset_import)
    if custom:
        from edgekit.kernels import ort_native

        if native_registered or ort_native.register_native(opts):
            log.debug("ai.edgekit ops run in the native library (%s kernels)", ort_native.active_isa() or "?")
            custom = False
    if not int4 and not custom and not overrides:
        return path if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes):
        model = onnx.load(str(path))  # with its external data
    if overrides:
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}
        missing = sorted(set(overrides) - set(inits))
        if missing:
            raise ExportError(f"cannot override {missing}: the model has no such initializers")
        for name, value in overrides.items():
            inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    if int4:
        log.debug("widened %d int4 initializers to 8 bits for ONNX Runtime's integer kernels", widen_int4(model))
    for ops, standard, what in STANDARD_FORMS:  # ops the native library speeds up, as standard ops without it
        if custom and any(n.op_type in ops for n in model.graph.node if n.domain == "ai.edgekit"):
            from edgekit.kernels import ort_python

            try:
                model = getattr(ort_python, standard)(model)
            except ValueError as exc:
                raise ExportError(f"{exc}; the native library is not built here",
                                  hint="build it: python runtimes/onnxruntime/build.py (or make native)") from exc
            log.warning("native ai.edgekit kernels are not built here: running %s (build them with python "
                        "runtimes/onnxruntime/build.py)", what)
            custom = any(n.domain == "ai.edgekit" for n in model.graph.node)
    if custom:
        other = sorted({n.op_type for n in model.graph.node if n.domain == "ai.edgekit"} - {"MatMulLowBit"})
        if other:
            raise ExportError(f"this model uses ai.edgekit ops {other}, which only the native library runs, and it "
                              "is not built here", hint="build it: python runtimes/onnxruntime/build.py (or make "
                              "native)")
        try:
            from edgekit.kernels.ort_python import register_python_op, to_contrib_domain

            opts.register_custom_ops_library(register_python_op())
        except ImportError as exc:
            raise ExportError("this model uses ai.edgekit ops and the native library is not built here; the "
                              "fallback needs onnxruntime-extensions", hint="build the library (python "
                              "runtimes/onnxruntime/build.py) or pip install onnxruntime-extensions") from exc
        log.warning("native ai.edgekit kernels are not built here: running ai.edgekit ops through the Python "
                    "reference fallback (slow; build them with python runtimes/onnxruntime/build.py)")
        model = to_contrib_domain(model)
    return model.SerializeToString()


def session_options(threads: int | None = None):
    """ONNX Runtime session options as edgekit runs (and times) models: quiet; ``threads`` intra-op threads (one
    inter-op thread) when given; intra-op threads that spin while a run needs them and stop when it returns. An idle
    session's spinning threads would otherwise take the cores from whatever runs next: with ten sessions loaded,
    timings of one model moved by 1.4x and FP32 ran 2-3x slower (benchmarks/RESULTS.md); turning spinning off
    instead costs a single session 26 % on INT8 EfficientNet-Lite0 here."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OrtRuntime:
    """ONNX Runtime on the CPU (or the given execution providers). Int4 weights are widened at load (``widen_int4``)."""

    name = "onnxruntime"

    def __init__(
        self, path: Path | bytes, *, threads: int | None = None, providers: list[str] | None = None,
        optimized_model_path: Path | None = None, overrides: Mapping[str, np.ndarray] | None = None,
        custom_op_libraries: Iterable[Path] = (),
    ) -> None:
        """``path`` is a model file, or the serialized model itself. ``overrides`` replace initializers of the same
        name in the model the session is made from (they stay constants to the graph optimizer, so fused integer
        kernels stay fused); ``custom_op_libraries`` are native libraries of custom ops to register first."""
        import onnxruntime as ort

        opts = session_options(threads)
        if optimized_model_path is not None:  # for inspection: the graph as ORT will run it
            opts.optimized_model_filepath = str(optimized_model_path)
        native = False
        for lib in custom_op_libraries:
            try:
                opts.register_custom_ops_library(str(lib))
            except Exception as exc:
                raise ExportError(f"cannot load the custom-op library {lib}: {exc}") from exc
            native = native or Path(lib).name == "libedgekit_ort.so"
        try:
            source = prepare_model(path, opts, overrides, native_registered=native)
        except Exception as exc:
            if isinstance(exc, ExportError):
                raise
            where = "the model" if isinstance(path, bytes) else path
            raise ExportError(f"cannot read {where}: {exc}") from exc
        try:
            self.session = ort.InferenceSession(
                source, opts, providers=providers or ["CPUExecutionProvider"],
                disabled_optimizers=list(DISABLED_OPTIMIZERS),
            )
        except Exception as exc:
            where = "the model" if isinstance(path, bytes) else path
            raise ExportError(f"ONNX Runtime cannot load {where}: {exc}") from exc
        self.path = None if isinstance(path, bytes) else Path(path)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs))

    def run_batches(self, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Run every batch and concatenate the outputs along the batch axis."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for feeds in batches:
            for k, v in self.run(feeds).items():
                parts[k].append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "p90_ms": round(self.p90_ms, 4), "runs": self.runs}


def compare_latency(
    runtimes: Mapping[str, Runtime], feeds: Mapping[str, np.ndarray], *, rounds: int = 5, per_round: int = 20,
    warmup: int = 5,
) -> dict[str, LatencyStats]:
    """Time several runtimes on the same input, interleaved round by round (machines drift; ratios stay fair)."""
    for rt in runtimes.values():
        for _ in range(warmup):
            rt.run(feeds)
    samples: dict[str, list[float]] = {k: [] for k in runtimes}
    for _ in range(rounds):
        for key, rt in runtimes.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                rt.run(feeds)
                samples[key].append((time.perf_counter() - t0) * 1e3)
    return {
        k: LatencyStats(float(np.median(v)), float(np.percentile(v, 90)), len(v)) for k, v in samples.items()
    }
