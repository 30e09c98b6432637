"""On-device engine build (``edgekit.agent.engine``) up to the TensorRT calls, driven by a fake ``tensorrt`` module
that records every call; the real-TensorRT test is skipped where TensorRT is not installed (every machine here)."""

from __future__ import annotations

import json
import types

import pytest

from edgekit.agent.engine import EngineSpec, build_engine, engine_key
from edgekit.errors import AgentError


class _Recorder:
    def __init__(self):
        self.calls = []


def fake_trt(version: str = "10.3.0", *, parse_ok: bool = True, build_ok: bool = True, dynamic: bool = True):
    rec = _Recorder()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            rec.calls.append(("Logger", level))

    class Tensor:
        name = "input"
        shape = (-1, 3, 8, 8) if dynamic else (1, 3, 8, 8)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

        def mark_weights_refittable(self, name):
            rec.calls.append(("mark_weights_refittable", name))

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, lo, opt, hi))

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+timing"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("pool", pool, size))

        def set_flag(self, flag):
            rec.calls.append(("flag", flag))

        def create_timing_cache(self, blob):
            rec.calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            rec.calls.append(("Builder",))

        def create_network(self, flags):
            rec.calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build",))
            return b"ENGINE" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse_from_file", path))
            return parse_ok

        def get_error(self, i):
            return "In node 3 (importFallbackPluginImporter): UNSUPPORTED_NODE"

    class Engine:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            rec.calls.append(("deserialize", bytes(blob)))
            return Engine(bytes(blob))

    class Weights:
        def __init__(self, array):
            self.array = array

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.set = engine, {}

        def set_named_weights(self, name, weights):
            rec.calls.append(("set_named_weights", name, weights.array.tolist()))
            self.set[name] = weights.array
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            rec.calls.append(("refit",))
            self.engine.blob += b"+refit:" + b",".join(n.encode() for n in sorted(self.set))
            return True

    flags = types.SimpleNamespace(FP16="FP16", INT8="INT8", SPARSE_WEIGHTS="SPARSE_WEIGHTS", REFIT="REFIT",
                                  REFIT_INDIVIDUAL="REFIT_INDIVIDUAL")
    mod = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=flags,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
        init_libnvinfer_plugins=lambda logger, ns: rec.calls.append(("init_plugins", ns)),
        Runtime=Runtime, Refitter=Refitter, Weights=Weights,
    )
    return mod, rec


@pytest.fixture
def graph(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"not really onnx: the fake parser does not read it")
    return p


MANIFEST = {"engine": {"tensorrt_version": "10.3", "flags": {"fp16": True, "int8": True, "sparse_weights": True},
                       "refittable": ["conv.bias", "fc.bias"], "workspace_mb": 256, "plugin_library": None}}


def test_spec_from_manifest_and_missing_section():
    spec = EngineSpec.from_manifest(MANIFEST, refit=True, max_batch=4)
    assert (spec.fp16, spec.int8, spec.sparse_weights, spec.refit, spec.max_batch) == (True, True, True, True, 4)
    assert spec.refittable == ("conv.bias", "fc.bias") and spec.workspace_mb == 256
    with pytest.raises(AgentError, match="no engine section"):
        EngineSpec.from_manifest({"artifact": {}})


def test_build_sets_the_manifest_flags_profile_and_timing_cache(graph, tmp_path):
    trt, rec = fake_trt()
    spec = EngineSpec.from_manifest(MANIFEST, refit=True, max_batch=4)
    cache = tmp_path / "cache"
    res = build_engine(graph, spec, cache, trt=trt, gpu="Orin (nvgpu)")
    assert not res.cached and res.path.read_bytes() == b"ENGINE"
    flags = [c[1] for c in rec.calls if c[0] == "flag"]
    assert flags == ["FP16", "INT8", "SPARSE_WEIGHTS", "REFIT_INDIVIDUAL"]
    assert [c[1] for c in rec.calls if c[0] == "mark_weights_refittable"] == ["conv.bias", "fc.bias"]
    assert ("create_network", 0) in rec.calls  # TensorRT 10: explicit batch is implicit
    assert ("pool", "WORKSPACE", 256 << 20) in rec.calls
    assert ("set_shape", "input", (1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8)) in rec.calls
    assert ("create_timing_cache", b"") in rec.calls  # first build on this device: empty cache
    assert res.timing_cache.read_bytes() == b"+timing"
    index = json.loads((cache / "index.json").read_text())
    assert index[res.key]["gpu"] == "Orin (nvgpu)" and index[res.key]["tensorrt_version"] == "10.3.0"
    # a second build of the same graph is a cache hit; a forced one reuses the saved timing cache
    trt2, rec2 = fake_trt()
    again = build_engine(graph, spec, cache, trt=trt2, gpu="Orin (nvgpu)")
    assert again.cached and again.path == res.path and not any(c[0] == "build" for c in rec2.calls)
    trt3, rec3 = fake_trt()
    build_engine(graph, spec, cache, trt=trt3, gpu="Orin (nvgpu)", force=True)
    assert ("create_timing_cache", b"+timing") in rec3.calls


def test_cache_key_changes_with_gpu_version_and_flags():
    spec = EngineSpec(int8=True)
    base = engine_key("abc", "Orin", "10.3.0", spec)
    assert base != engine_key("abc", "RTX 4090", "10.3.0", spec)
    assert base != engine_key("abc", "Orin", "10.4.0", spec)
    assert base != engine_key("abc", "Orin", "10.3.0", EngineSpec(int8=False))
    assert base != engine_key("abd", "Orin", "10.3.0", spec)
    assert base == engine_key("abc", "Orin", "10.3.0", EngineSpec(int8=True))


def test_tensorrt_8_uses_the_explicit_batch_flag_and_plain_refit(graph, tmp_path):
    trt, rec = fake_trt("8.6.2")
    del trt.BuilderFlag.REFIT_INDIVIDUAL
    spec = EngineSpec(tensorrt_version="8.6", refit=True, refittable=("a",))
    build_engine(graph, spec, tmp_path, trt=trt, gpu="Orin")
    assert ("create_network", 1) in rec.calls
    assert "REFIT" in [c[1] for c in rec.calls if c[0] == "flag"]
    assert not any(c[0] == "mark_weights_refittable" for c in rec.calls)


def test_errors_are_clear_and_leave_no_engine(graph, tmp_path):
    trt, _ = fake_trt(parse_ok=False)
    with pytest.raises(AgentError, match="cannot parse.*UNSUPPORTED_NODE"):
        build_engine(graph, EngineSpec(), tmp_path / "a", trt=trt, gpu="Orin")
    trt, _ = fake_trt(build_ok=False)
    with pytest.raises(AgentError, match="could not build"):
        build_engine(graph, EngineSpec(), tmp_path / "b", trt=trt, gpu="Orin")
    trt, _ = fake_trt("8.6.2")
    with pytest.raises(AgentError, match="exported for TensorRT 10.3"):
        build_engine(graph, EngineSpec(tensorrt_version="10.3"), tmp_path / "c", trt=trt, gpu="Orin")
    trt, _ = fake_trt()
    with pytest.raises(AgentError, match="plugins"):
        build_engine(graph, EngineSpec(plugin_library="libedgekit_trt.so"), tmp_path / "d", trt=trt, gpu="Orin")
    assert not list(tmp_path.rglob("*.engine"))


def test_plugin_library_is_loaded_before_parsing(graph, tmp_path, monkeypatch):
    import edgekit.agent.engine as engine

    loaded = []
    monkeypatch.setattr(engine.ctypes, "CDLL", lambda path: loaded.append(path))
    trt, rec = fake_trt()
    build_engine(graph, EngineSpec(plugin_library="libedgekit_trt.so"), tmp_path, trt=trt, gpu="Orin",
                 plugin_libraries=[tmp_path / "libedgekit_trt.so"])
    assert loaded == [str(tmp_path / "libedgekit_trt.so")]
    names = [c[0] for c in rec.calls]
    assert names.index("init_plugins") < names.index("parse_from_file")


@pytest.mark.gpu
def test_real_tensorrt_build(tmp_path):
    """Needs TensorRT and a GPU: parse and build a tiny Q/DQ graph. Never run here (TensorRT is not installable)."""
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed on this project's machines")
    pytest.importorskip("cupy", reason="needs CuPy and an NVIDIA GPU")
    import onnx

    from edgekit.export.tensorrt import tensorrt_graph
    from tests.test_tensorrt_export import _calib, _plan, residual_net

    g = tensorrt_graph(residual_net(), _plan({"head": "w8a8", "fc": "w8a8"}), _calib())
    path = tmp_path / "m.onnx"
    onnx.save(g.model, str(path))
    res = build_engine(path, EngineSpec(int8=True), tmp_path / "cache")
    assert res.path.stat().st_size > 0 and res.timing_cache.exists()


def test_open_runtime_needs_tensorrt_for_plugin_graphs(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    from edgekit.agent.backends import open_runtime

    manifest = {"artifact": {"format": "tensorrt-onnx", "path": "model.onnx"},
                "engine": {**MANIFEST["engine"], "plugin_library": "libedgekit_trt.so"}}
    with pytest.raises(AgentError, match="plugins and TensorRT is not installed"):
        open_runtime(manifest, tmp_path)


def _conv_graph(path, bias, weight_scale=1.0):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.ones((2, 3, 1, 1)) * weight_scale).astype(np.float32), "conv.weight")
    b = numpy_helper.from_array(np.asarray(bias, np.float32), "conv.bias")
    node = helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["out"], name="conv")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], [w, b])
    onnx.save(helper.make_model(g), str(path))
    return path


def test_a_release_that_changes_only_refittable_weights_is_refitted_not_rebuilt(tmp_path):
    """What a delta's release does to a TensorRT device: the cached refittable engine of the base takes the new
    biases (``trt.Refitter``) instead of a full build; any other change builds."""
    trt, rec = fake_trt()
    spec = EngineSpec(refit=True, refittable=("conv.bias",))
    first = build_engine(_conv_graph(tmp_path / "a.onnx", [0.0, 1.0]), spec, tmp_path / "cache", trt=trt, gpu="Orin")
    assert ("build",) in rec.calls and first.details["fixed_sha256"]
    rec.calls.clear()
    second = build_engine(_conv_graph(tmp_path / "b.onnx", [0.5, -1.0]), spec, tmp_path / "cache", trt=trt,
                          gpu="Orin")
    assert ("build",) not in rec.calls and ("refit",) in rec.calls
    assert ("set_named_weights", "conv.bias", [0.5, -1.0]) in rec.calls
    assert second.key != first.key and second.details["refitted_from"] == first.key
    assert second.path.read_bytes() == b"ENGINE+refit:conv.bias"
    # a weight that is not refittable changed: a build
    rec.calls.clear()
    build_engine(_conv_graph(tmp_path / "c.onnx", [0.5, -1.0], weight_scale=2.0), spec, tmp_path / "cache", trt=trt,
                 gpu="Orin")
    assert ("build",) in rec.calls and ("refit",) not in rec.calls
    # another GPU never takes this GPU's engine
    rec.calls.clear()
    build_engine(_conv_graph(tmp_path / "d.onnx", [9.0, 9.0]), spec, tmp_path / "cache", trt=trt, gpu="RTX 4090")
    assert ("build",) in rec.calls and ("refit",) not in rec.calls
