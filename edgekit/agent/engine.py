"""TensorRT engines on the device: built from a bundle's TensorRT-ready ONNX with the settings its manifest's
``engine`` section names, with a per-device timing cache, and cached by (ONNX hash, GPU, TensorRT version, flags).

Engines are tied to the GPU and the TensorRT version (``../shared/design/TENSORRT.md`` §6, rule 13), so the host
ships the graph and the device builds. ``build_engine`` follows TensorRT 10's Python API (``Builder``, ``OnnxParser``,
``IBuilderConfig`` flags and memory pools, ``create_timing_cache`` / ``set_timing_cache``, optimization profiles for
dynamic batch, ``REFIT_INDIVIDUAL`` + ``mark_weights_refittable``, ``build_serialized_network``) and TensorRT 8.x's
explicit-batch flag. **It has never run against real TensorRT** (no machine this project builds on can install it):
the tests drive it with a fake ``tensorrt`` module that records every call.

A release that differs from a cached engine's graph only in weights marked refittable (a delta's release: adapted
biases) is not built again: the cached engine is deserialized, ``trt.Refitter`` writes the new weights in
(``set_named_weights``, ``refit_cuda_engine``) and the result is cached under the new graph's key. Which engine may
donate is recorded in the cache index: the graph's hash with the refittable weights' values left out
(``fixed_digest``), the GPU, the TensorRT version and the builder settings must all match; otherwise it builds.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgekit.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
INDEX = "index.json"


@dataclass(frozen=True)
class EngineSpec:
    """Builder settings from a manifest's ``engine`` section."""

    tensorrt_version: str | None = None  # the version the graph was exported for
    fp16: bool = True
    int8: bool = False
    sparse_weights: bool = False
    refit: bool = False  # build refittable (REFIT_INDIVIDUAL on the names below)
    refittable: tuple[str, ...] = ()
    plugin_library: str | None = None
    workspace_mb: int = 1024
    max_batch: int = DEFAULT_MAX_BATCH

    @classmethod
    def from_manifest(cls, manifest: Mapping, *, refit: bool = False, max_batch: int | None = None) -> EngineSpec:
        section = manifest.get("engine")
        if not isinstance(section, Mapping):
            raise AgentError("this bundle has no engine section: it was not built for a TensorRT target",
                             hint="build it for a TensorRT target, e.g. `edgekit build --target jetson-orin-nano`")
        flags = section.get("flags") or {}
        return cls(tensorrt_version=section.get("tensorrt_version"), fp16=bool(flags.get("fp16", True)),
                   int8=bool(flags.get("int8", False)), sparse_weights=bool(flags.get("sparse_weights", False)),
                   refit=refit, refittable=tuple(section.get("refittable") or ()),
                   plugin_library=section.get("plugin_library"), workspace_mb=int(section.get("workspace_mb", 1024)),
                   max_batch=int(max_batch or DEFAULT_MAX_BATCH))

    def flags(self) -> dict:
        return {"fp16": self.fp16, "int8": self.int8, "sparse_weights": self.sparse_weights, "refit": self.refit}


@dataclass(frozen=True)
class EngineBuild:
    path: Path
    key: str
    cached: bool
    timing_cache: Path
    seconds: float
    details: dict = field(default_factory=dict)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise AgentError("TensorRT is not installed on this device",
                         hint="JetPack ships it (python3-libnvinfer); on x86 install `tensorrt` from NVIDIA's index, "
                              "or run the bundle's graph with ONNX Runtime") from exc
    return trt


def gpu_name() -> str:
    """The name of GPU 0 (CuPy, as the runtime uses it)."""
    try:
        import cupy as cp
    except ImportError as exc:
        raise AgentError("building a TensorRT engine needs CuPy to identify the GPU", hint="pip install cupy") from exc
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "gpu"


def engine_key(onnx_sha256: str, gpu: str, tensorrt_version: str, spec: EngineSpec) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "gpu": gpu, "trt": tensorrt_version, "flags": spec.flags(),
                       "refittable": list(spec.refittable) if spec.refit else [], "max_batch": spec.max_batch},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_version(trt, spec: EngineSpec) -> None:
    have = str(trt.__version__)
    want = spec.tensorrt_version
    if want and have.split(".")[0] != want.split(".")[0]:
        raise AgentError(f"this bundle's graph was exported for TensorRT {want}; this device has TensorRT {have}",
                         hint="build the bundle for a target profile with this device's TensorRT version")
    if want and have.split(".")[:2] != want.split(".")[:2]:
        log.warning("the graph was exported for TensorRT %s; building with %s", want, have)


def _load_plugins(trt, logger, libraries: Sequence[Path]) -> None:
    for lib in libraries:
        try:
            ctypes.CDLL(str(lib))  # REGISTER_TENSORRT_PLUGIN registers the creators on load
        except OSError as exc:
            raise AgentError(f"cannot load the TensorRT plugin library {lib}: {exc}",
                             hint="build runtimes/tensorrt on this device (see its README)") from exc
    trt.init_libnvinfer_plugins(logger, "")


def _profile(trt, builder, network, config, max_batch: int) -> bool:
    """An optimization profile for dynamic input dimensions (batch 1..max_batch, optimum 1)."""
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        if any(d < 0 for d in shape[1:]):
            raise AgentError(f"input {tensor.name} has dynamic dimensions other than the batch: {shape}",
                             hint="export the model with fixed non-batch dimensions for TensorRT")
        profile = profile or builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(tensor.name, (1, *rest), (1, *rest), (max_batch, *rest))
    if profile is not None:
        config.add_optimization_profile(profile)
    return profile is not None


def build_engine(onnx_path: Path, spec: EngineSpec, cache_dir: Path, *, trt=None, gpu: str | None = None,
                 plugin_libraries: Sequence[Path] = (), force: bool = False) -> EngineBuild:
    """The engine for ``onnx_path`` under ``spec``: from ``cache_dir`` when it holds one for this (graph, GPU,
    TensorRT, flags), else built and saved there, with the device's timing cache read and updated."""
    trt = trt if trt is not None else import_tensorrt()
    _check_version(trt, spec)
    gpu = gpu or gpu_name()
    onnx_path = Path(onnx_path)
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    key = engine_key(digest, gpu, str(trt.__version__), spec)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine_path = cache_dir / f"{key}.engine"
    timing_path = cache_dir / f"timing-{_slug(gpu)}-trt{trt.__version__}.cache"
    if engine_path.exists() and not force:
        log.info("TensorRT engine %s is cached", engine_path.name)
        return EngineBuild(engine_path, key, True, timing_path, 0.0)
    if spec.plugin_library and not plugin_libraries:
        raise AgentError(f"this graph uses edgekit's TensorRT plugins ({spec.plugin_library})",
                         hint="build runtimes/tensorrt on this device and pass --plugin-lib PATH")
    fixed = fixed_digest(onnx_path, spec.refittable) if spec.refit and spec.refittable else None
    donor = None if fixed is None or force else _refit_donor(cache_dir, fixed, gpu, str(trt.__version__), spec)
    if donor is not None:  # the same graph but for refittable weights (a delta's release): refit, do not rebuild
        t0 = time.time()
        try:
            blob = _refit(trt, cache_dir / f"{donor}.engine", onnx_path, spec.refittable, plugin_libraries)
        except AgentError as exc:
            log.warning("refitting engine %s failed (%s); building instead", donor, exc.message)
        else:
            _write_atomic(engine_path, blob)
            details = {"onnx_sha256": digest, "fixed_sha256": fixed, "gpu": gpu, "tensorrt_version":
                       str(trt.__version__), "refitted_from": donor, "built_at": int(time.time()),
                       "spec": asdict(spec)}
            _record(cache_dir, key, details)
            log.info("refitted TensorRT engine %s from %s in %.2f s", engine_path.name, donor, time.time() - t0)
            return EngineBuild(engine_path, key, False, timing_path, time.time() - t0, details)
    t0 = time.time()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_libraries:
        _load_plugins(trt, logger, plugin_libraries)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AgentError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}",
                         hint="the host's pre-flight should have caught this: report it with the bundle's target")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    set_flags = [name for name, on in (("FP16", spec.fp16), ("INT8", spec.int8),
                                       ("SPARSE_WEIGHTS", spec.sparse_weights)) if on]
    if spec.refit:
        individual = hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable")
        set_flags.append("REFIT_INDIVIDUAL" if individual else "REFIT")
        if individual:
            for name in spec.refittable:
                network.mark_weights_refittable(name)
    for name in set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    dynamic = _profile(trt, builder, network, config, spec.max_batch)
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(cache, False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise AgentError(f"TensorRT could not build an engine from {onnx_path.name}",
                         hint="run with --verbose to see TensorRT's log")
    _write_atomic(engine_path, bytes(blob))
    _write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
    details = {"onnx_sha256": digest, "fixed_sha256": fixed, "gpu": gpu, "tensorrt_version": str(trt.__version__),
               "flags": set_flags,
               "dynamic_batch": dynamic, "built_at": int(time.time()), **{"spec": asdict(spec)}}
    _record(cache_dir, key, details)
    seconds = time.time() - t0
    log.info("built TensorRT engine %s in %.1f s (%s)", engine_path.name, seconds, ", ".join(set_flags))
    return EngineBuild(engine_path, key, False, timing_path, seconds, details)


def fixed_digest(onnx_path: Path, refittable: Sequence[str]) -> str | None:
    """sha256 of the graph with its ``refittable`` weights' values left out: two graphs with the same digest differ
    only in weights a refit replaces (None when the file is not a readable ONNX model)."""
    try:
        import onnx

        model = onnx.load(str(onnx_path))
    except Exception:  # noqa: BLE001 - not ONNX (or onnx missing): no refit, a build
        return None
    names = set(refittable)
    for init in model.graph.initializer:
        if init.name in names:
            init.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(f)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _refit_donor(cache_dir: Path, fixed: str, gpu: str, version: str, spec: EngineSpec) -> str | None:
    """A cached refittable engine of a graph with the same ``fixed_digest``, GPU, TensorRT version and flags."""
    try:
        index = json.loads((cache_dir / INDEX).read_text())
    except (OSError, ValueError):
        return None
    for key, d in sorted(index.items(), key=lambda kv: -int(kv[1].get("built_at", 0))):
        if (d.get("fixed_sha256") == fixed and d.get("gpu") == gpu and d.get("tensorrt_version") == version
                and d.get("spec") == json.loads(json.dumps(asdict(spec))) and (cache_dir / f"{key}.engine").exists()):
            return key
    return None


def _refit(trt, engine_path: Path, onnx_path: Path, names: Sequence[str],
           plugin_libraries: Sequence[Path]) -> bytes:  # noqa: ANN001 - the tensorrt module
    """``engine_path``'s engine with the ``names`` weights of ``onnx_path`` written in (``trt.Refitter``)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_libraries:
        _load_plugins(trt, logger, plugin_libraries)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise AgentError(f"cannot deserialize {engine_path.name}")
    refitter = trt.Refitter(engine, logger)
    wanted = set(names)
    model = onnx.load(str(onnx_path))
    weights = {i.name: np.ascontiguousarray(numpy_helper.to_array(i)) for i in model.graph.initializer
               if i.name in wanted}
    for name, value in weights.items():  # kept alive until the refit: TensorRT reads them then
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise AgentError(f"the engine does not take refitted weights {name!r}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise AgentError(f"the refit lacks weights {missing[:5]}")
    if not refitter.refit_cuda_engine():
        raise AgentError("TensorRT refused the refit")
    return bytes(engine.serialize())


def _record(cache_dir: Path, key: str, details: dict) -> None:
    path = cache_dir / INDEX
    try:
        index = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        index = {}
    index[key] = details
    _write_atomic(path, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
