"""The TensorRT artifact of a plan (build side): structure, weight quantization, the TensorRT-ready graph
(``export.tensorrt``), pre-flight (``export.trt_preflight``), and the manifest's ``engine`` section that tells the
agent how to build the engine on the device (``edgekit.agent.engine``).

The artifact file is the graph as ONNX Runtime runs it (``ai.edgekit`` nodes in ONNX Runtime form), so the host
verifies, sketches and adapts it like any ONNX artifact; ``bundle_form`` writes the TensorRT form (plugin nodes
renamed) into the bundle.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.export.onnx import describe
from edgekit.export.tensorrt import TrtGraph, tensorrt_graph
from edgekit.export.trt_preflight import require
from edgekit.iospec import Artifact
from edgekit.plan import Plan
from edgekit.targets import TargetProfile

log = logging.getLogger(__name__)

FORMAT = "tensorrt-onnx"
WORKSPACE_MB = 1024
CACHE_KEY = ("onnx_sha256", "gpu", "tensorrt_version", "flags")


def preflight_source(fp32: Artifact, profile: TargetProfile) -> None:
    """Pre-flight the float graph before any compression work: an op TensorRT cannot parse fails the build now."""
    import onnx

    require(onnx.load(str(fp32.path)), profile, stage="exported FP32 graph")
    log.info("TensorRT %s pre-flight passed for the FP32 graph", profile.tensorrt.version)


def apply_plan_tensorrt(plan: Plan, fp32: Artifact, calib: Dataset, out: Path, profile: TargetProfile,
                        ctx: Context) -> tuple[Artifact, TrtGraph]:
    """The TensorRT-ready artifact of ``plan`` at ``out`` (pre-flighted) and what its engine build needs."""
    import onnx

    from edgekit.mixed import plan_quantizer, structural_step
    from edgekit.wonly import weight_only

    out.parent.mkdir(parents=True, exist_ok=True)
    if plan.is_structural:
        fp32, plan = structural_step(plan, fp32, calib, out, ctx)
    wonly = {c.layer: c.option for c in plan.layers if weight_only(c.option)}
    weights = None
    if wonly:
        quantizer = plan_quantizer(plan, fp32, calib, ctx, layers=list(wonly))
        weights = {n: quantizer.qweight(n, o) for n, o in wonly.items()}
    options = {"tensorrt_major": profile.tensorrt.major, "plugins": profile.edgekit_kernels,
               "weights": weights, "track": ctx.track}
    graph = tensorrt_graph(onnx.load(str(fp32.path)), plan, calib, **options)
    if graph.int8_layers and plan.activations.get("bias_correction", True):
        graph = _bias_corrected(graph, fp32, plan, calib, out, options)
    require(graph.for_tensorrt(), profile, sparse=bool(graph.sparse_layers), stage="TensorRT-ready graph")
    onnx.save(graph.model, str(out))
    log.info("TensorRT-ready graph: %d INT8, %d INT4, %d 2:4 and %d plugin layers; pre-flight passed",
             len(graph.int8_layers), len(graph.int4_layers), len(graph.sparse_layers), len(graph.plugin_layers))
    custom = ("ai.edgekit",) if graph.plugin_layers else ()
    return replace(describe(out, runtime="tensorrt", custom_ops=custom), format=FORMAT), graph


def _bias_corrected(graph: TrtGraph, fp32: Artifact, plan: Plan, calib: Dataset, out: Path, options: dict
                    ) -> TrtGraph:
    """The graph again from a float model whose INT8 layers' biases absorb their weight-rounding shift (the same
    bias correction as the ONNX Runtime path, ``compress.quant.correct_biases``); activation ranges are kept."""
    import onnx

    from edgekit.compress.quant import correct_biases

    first = out.with_name(out.stem + ".uncorrected.onnx")
    corrected = out.with_name(out.stem + ".fp32-bias-corrected.onnx")
    onnx.save(graph.model, str(first))
    try:
        correct_biases(Path(fp32.path), first, graph.int8_layers, calib, corrected)
        return tensorrt_graph(onnx.load(str(corrected)), plan, calib, amax=graph.amax, **options)
    finally:
        first.unlink(missing_ok=True)
        corrected.unlink(missing_ok=True)


def bundle_form(graph: TrtGraph, path: Path) -> Artifact:
    """Write the TensorRT form of ``graph`` (plugin nodes as TensorRT's parser maps them) to ``path``."""
    import onnx

    onnx.save(graph.for_tensorrt(), str(path))
    custom = ("ai.edgekit",) if graph.plugin_layers else ()
    return replace(describe(path, runtime="tensorrt", custom_ops=custom), format=FORMAT)


def engine_section(graph: TrtGraph, profile: TargetProfile) -> dict:
    """The manifest's ``engine`` section: how the agent builds (and caches) the engine on the device."""
    trt = profile.tensorrt
    plugins = []
    if graph.plugin_layers:
        from edgekit.export.trt_plugins import PLUGINS

        plugins = sorted({PLUGINS["MatMulLowBit"].plugin_name})
    return {
        "builder": "tensorrt",
        "tensorrt_version": trt.version,
        "plugin_api": trt.plugin_api,
        "sm": profile.hardware.sm,
        "dla_cores": profile.hardware.dla_cores,
        "flags": graph.engine_flags(),
        "layers": {"int8": graph.int8_layers, "int4": graph.int4_layers, "sparse_2_4": graph.sparse_layers,
                   "plugin": graph.plugin_layers},
        "plugins": plugins,
        "plugin_library": "libedgekit_trt.so" if plugins else None,
        "refittable": graph.refittable,
        "workspace_mb": WORKSPACE_MB,
        "cache_key": list(CACHE_KEY),
        "timing_cache": "per device and TensorRT version, in the agent's engine cache",
        "command": "edgekit engine build BUNDLE",
    }
