"""Choosing and opening the runtime for a bundle on this device.

Every backend has the ``Runtime`` protocol of ``edgekit.agent.runtime`` (``run(feeds) -> outputs``, plus
``input_names``/``output_names``):
- ``onnx`` artifacts run in ONNX Runtime with the best execution provider present (TensorRT, CUDA, then CPU, in
  the order the config or the target profile prefers). Native custom-op libraries a bundle ships (manifest
  ``artifact.custom_op_libraries``) are registered first; ``ai.edgekit`` ops without one fall back to the Python
  reference (``runtime.prepare_model``).
- ``tflite`` artifacts run in LiteRT (``ai-edge-litert``).
- ``tensorrt`` runs an engine built on this device from the bundle's TensorRT-ready ONNX with the TensorRT Python
  API and cached by (artifact hash, GPU, TensorRT version). Written against TensorRT's documented API; it cannot
  run on machines without an NVIDIA GPU and is untested here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgekit.agent.runtime import OrtRuntime
from edgekit.errors import AgentError

log = logging.getLogger(__name__)

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def ort_providers(preferred: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask for, best first, among those this ONNX Runtime build has."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    order = list(preferred) if preferred else list(PROVIDER_ORDER)
    chosen = [p for p in order if p in have]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class LiteRtRuntime:
    """A ``.tflite`` artifact in the LiteRT interpreter, float32 in and out like the ONNX artifact.

    Quantized inputs (int8/uint8/int16 with a scale) are quantized from float feeds with the input's (scale,
    zero_point), rounding half away from zero as TFLite's QUANTIZE does; quantized outputs are dequantized to float32.
    Integer feeds to a quantized input are taken as already quantized. A batch larger than the model's is run by
    resizing the inputs, or sample by sample when the model cannot be resized (its output batch stays fixed).
    """

    name = "litert"

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise AgentError("this bundle is a TFLite model and needs LiteRT",
                             hint="pip install 'edgekit[tflite]' (ai-edge-litert)") from exc
        self.path = Path(path)
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise AgentError(f"LiteRT cannot load {path}: {exc}") from exc
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.input_names = [d["name"] for d in self._in]
        self.output_names = [d["name"] for d in self._out]
        self.providers = ["litert-cpu"]
        self._per_sample = False  # set when a resized batch gave outputs of the wrong batch

    @staticmethod
    def _quantized(d: Mapping) -> bool:
        return bool(d["quantization"][0]) and np.dtype(d["dtype"]).kind in "iu"

    def _feed(self, d: Mapping, value) -> np.ndarray:
        x = np.asarray(value)
        if self._quantized(d) and x.dtype.kind == "f":
            scale, zero_point = d["quantization"]
            info = np.iinfo(d["dtype"])
            q = x.astype(np.float64) / scale
            q = np.sign(q) * np.floor(np.abs(q) + 0.5) + zero_point
            return np.clip(q, info.min, info.max).astype(d["dtype"])
        return np.ascontiguousarray(x, d["dtype"])

    def _fetch(self, d: Mapping) -> np.ndarray:
        y = self.interpreter.get_tensor(d["index"])
        if self._quantized(d):
            scale, zero_point = d["quantization"]
            return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)
        return y.copy()

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        xs = [self._feed(d, feeds[d["name"]]) for d in self._in]
        if any(tuple(d["shape"]) != x.shape for d, x in zip(self._in, xs)):
            for d, x in zip(self._in, xs):
                self.interpreter.resize_tensor_input(d["index"], x.shape)
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
        for d, x in zip(self._in, xs):
            self.interpreter.set_tensor(d["index"], x)
        self.interpreter.invoke()
        return {d["name"]: self._fetch(d) for d in self._out}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise AgentError(f"missing inputs {missing} (the model takes {self.input_names})")
        n = len(feeds[self.input_names[0]]) if self.input_names and np.ndim(feeds[self.input_names[0]]) else 1
        if n > 1 and not self._per_sample:
            try:
                out = self._invoke(feeds)
                if all(v.ndim and len(v) == n for v in out.values()):
                    return out
            except (ValueError, RuntimeError) as exc:
                log.debug("LiteRT cannot resize %s to batch %d (%s); running sample by sample", self.path, n, exc)
            self._per_sample = True
        if n > 1:
            parts = [self._invoke({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._invoke(feeds)

    def run_batches(self, batches) -> dict[str, np.ndarray]:
        """Run every batch and concatenate the outputs along the batch axis (as ``OrtRuntime.run_batches``)."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for feeds in batches:
            for k, v in self.run(feeds).items():
                parts[k].append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}


class TensorRtRuntime:
    """A TensorRT engine built on this device from a bundle's TensorRT-ready ONNX (``edgekit.agent.engine``: flags
    from the manifest, timing cache, cached per graph, GPU and TensorRT version).

    Follows the TensorRT 10 Python API (``IRuntime``, ``execute_async_v3`` with tensor addresses); device memory
    through CuPy. Untested here: no machine this project builds on has TensorRT.
    """

    name = "tensorrt"

    def __init__(self, onnx_path: Path, cache_dir: Path, spec=None, *, plugin_libraries: Sequence[Path] = ()) -> None:
        from edgekit.agent.engine import EngineSpec, build_engine, import_tensorrt

        trt = import_tensorrt()
        try:
            import cupy as cp
        except ImportError as exc:
            raise AgentError("TensorRT engines need CuPy and an NVIDIA GPU", hint="pip install cupy") from exc
        self._cp, self._trt = cp, trt
        built = build_engine(Path(onnx_path), spec or EngineSpec(), Path(cache_dir), trt=trt,
                             plugin_libraries=plugin_libraries)
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(built.path.read_bytes())
        if engine is None:
            raise AgentError(f"TensorRT could not load the engine {built.path}",
                             hint="delete it from the engine cache to rebuild it")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.providers = ["tensorrt"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cp, trt = self._cp, self._trt
        keep = []
        for name in self.input_names:
            x = cp.asarray(np.ascontiguousarray(feeds[name]))
            self.context.set_input_shape(name, x.shape)
            self.context.set_tensor_address(name, x.data.ptr)
            keep.append(x)
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            y = cp.empty(shape, dtype)
            self.context.set_tensor_address(name, y.data.ptr)
            outs[name] = y
        self.context.execute_async_v3(self.stream.ptr)
        self.stream.synchronize()
        return {k: cp.asnumpy(v) for k, v in outs.items()}


def open_runtime(manifest: Mapping, root: Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, overrides: Mapping[str, np.ndarray] | None = None,
                 cache_dir: Path | None = None, extra_outputs: Sequence[str] = ()):
    """The runtime for a bundle's artifact on this device (``root`` is the unpacked bundle)."""
    art = manifest.get("artifact") or {}
    fmt = art.get("format", "onnx")
    path = Path(root) / art.get("path", "model.onnx")
    if fmt == "tflite":
        return LiteRtRuntime(path, threads=threads)
    if fmt == "tensorrt-onnx":
        runtime = _tensorrt_or_fallback(manifest, path, cache_dir or Path(root) / ".engines")
        if runtime is not None:
            return runtime
    elif providers and "tensorrt" in providers:
        return TensorRtRuntime(path, cache_dir or Path(root) / ".engines")
    elif fmt != "onnx":
        raise AgentError(f"this agent cannot run artifacts of format {fmt!r}", hint="upgrade edgekit on the device")
    libs = [Path(root) / lib for lib in art.get("custom_op_libraries", [])]
    source: Path | bytes = path
    if extra_outputs:  # cached: adaptation updates rebuild the session with the same extra outputs
        source = _with_outputs_cached(str(path), tuple(extra_outputs), path.stat().st_mtime_ns)
    return OrtRuntime(source, threads=threads, providers=ort_providers(providers), overrides=overrides,
                      custom_op_libraries=libs)


def _tensorrt_or_fallback(manifest: Mapping, path: Path, cache_dir: Path):
    """The TensorRT engine of a ``tensorrt-onnx`` artifact; without TensorRT here, None (run the same graph in ONNX
    Runtime: Q/DQ graphs are standard ONNX), unless the graph needs edgekit's TensorRT plugins."""
    from edgekit.agent.engine import EngineSpec

    # refittable when the manifest names refittable weights: a later delta's release is then refitted, not rebuilt
    refit = bool((manifest.get("engine") or {}).get("refittable"))
    spec = EngineSpec.from_manifest(manifest, refit=refit) if manifest.get("engine") else EngineSpec()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        if spec.plugin_library:
            raise AgentError("this bundle's graph uses edgekit's TensorRT plugins and TensorRT is not installed here",
                             hint="install TensorRT (JetPack ships it) or build the model for an ONNX Runtime target"
                             ) from None
        log.warning("TensorRT is not installed here: running the TensorRT-ready graph in ONNX Runtime")
        return None
    return TensorRtRuntime(path, cache_dir, spec)


@functools.lru_cache(maxsize=4)
def _with_outputs_cached(path: str, names: tuple[str, ...], mtime_ns: int) -> bytes:
    return with_outputs(Path(path), names)


def with_outputs(path: Path, names: Sequence[str]) -> bytes:
    """The model with extra graph outputs (e.g. the classifier's input features, for LAME)."""
    import onnx

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()
