"""Measure what each option costs per layer on this machine and write the target's hardware table.

Every weighted layer of a model becomes a ONE-LAYER ONNX model with its exact shapes and attributes, followed by
the Relu/Clip the real model applies to it (integer kernels fold that activation into their requantization, so
the layer and its activation are one unit). Each unit is timed in ONNX Runtime per option, interleaved:

- ``fp32``: float in, float out (ORT fuses Conv + activation).
- ``w8a8``: the unit quantized like ``edgekit.compress.quant`` does (ORT ``quantize_static``, QDQ, uint8 activations
  per tensor, int8 weights per channel), with its boundary QuantizeLinear/DequantizeLinear removed: uint8 in,
  uint8 out, as inside an int8 graph where layers chain without float round trips. ``quantize_in_ms`` and
  ``dequantize_out_ms`` record what float neighbours add (measured on the same unit with float input and output).
- weight-only ``w<bits>g<group>[s]``: ``export.lowbit``'s rewrite (MatMulNBits, or ``ai.edgekit::MatMulLowBit``).

With ``edgekit_ops`` (a target whose runtime carries edgekit's native library, ``custom_op_domains`` naming
``ai.edgekit``: ``edgekit hardware probe --target``) every unit is exported as that target's exporter writes it:
int8 depthwise and stem convolutions as ``ai.edgekit`` ops (``export.ort_qconv``), weight-only layers as
``MatMulLowBit``, and the sessions register the library. Probing so needs the library built here.

Each unit holds ``copies`` side-by-side copies of the layer (one call runs them back to back, so ORT's thread pool
stays awake between them as it does inside a whole model; a lone layer per call pays a thread wake-up each time).
The variants run interleaved (``compare_latency``) under ONNX Runtime's profiler. ``median_ms`` is the sum of the
nodes' median times per copy, without the layout changes ORT adds at the unit's edges and without per-call
overhead (see ``kernel_ms``): the layer's time inside a whole model. ``wall_ms`` is the median call time per copy.

Layers with the same signature (``edgekit.cost.layer_signature``) are measured once. No torch here, except in
``main`` when it exports a built-in model.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgekit.agent.runtime import DISABLED_OPTIMIZERS, compare_latency, session_options
from edgekit.cost import FUSED_ACTIVATIONS, HardwareTable, LayerGeometry, layer_geometry, layer_signature
from edgekit.errors import ConfigError
from edgekit.inventory import layer_inventory

log = logging.getLogger(__name__)

KERNELS = "ai.edgekit (int8 depthwise/stem convolutions: export.ort_qconv; weight-only: MatMulLowBit)"
PROBE_OPTIONS = ("fp32", "w8a8", "w8a8d")  # plus any weight-only w<bits>g<group>[s] (MatMul / Gemm layers)


def applicable(option: str, op_type: str) -> bool:
    """Whether the probe can time ``option`` on a layer of this op: dynamic int8 on MatMul, weight-only on
    MatMul/Gemm, static int8 and float everywhere."""
    from edgekit.wonly import weight_only

    if option == "w8a8d":
        return op_type == "MatMul"
    if weight_only(option):
        return op_type in ("MatMul", "Gemm")
    return option in PROBE_OPTIONS


# -- one-layer models -----------------------------------------------------------------------------------------------
def one_layer_model(model, layer: str, geometry: LayerGeometry, *, batch: int = 1, copies: int = 1):
    """A model holding only ``layer`` (its real weights and attributes) and its fused activation: x -> y.

    With ``copies`` > 1 the unit is repeated side by side on the same input (outputs ``y_0`` ... ``y_<k-1>``), each
    copy with its own weights (scaled by 1 + 0.001·i, so that ORT's common-subexpression elimination cannot merge
    them): one call then runs the layer k times back to back with the thread pool awake, as inside a whole model.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    node = next(n for n in g.node if n.name == layer)
    base = [node]
    if geometry.activation:
        base.append(next(n for n in g.node if n.op_type in FUSED_ACTIVATIONS and node.output[0] in n.input[:1]))
    arrays = {}
    for name in sorted({i for n in base for i in n.input[1:] if i}):
        if name in inits:
            arrays[name] = numpy_helper.to_array(inits[name])
        elif name in consts:  # a Constant node's value becomes an initializer
            arrays[name] = numpy_helper.to_array(consts[name].attribute[0].t)
        else:
            raise ConfigError(f"layer {layer!r} reads {name!r}, which is neither an initializer nor a constant")
    nodes, tensors, outputs = [], [], []
    for k in range(copies):
        suffix = "" if copies == 1 else f"_{k}"
        for name, a in arrays.items():
            scaled = a * (1 + 1e-3 * k) if k and a.size > 1 and a.dtype.kind == "f" else a
            tensors.append(numpy_helper.from_array(np.asarray(scaled, dtype=a.dtype), name + suffix))
        for i, src in enumerate(base):
            n = onnx.NodeProto()
            n.CopyFrom(src)
            n.name = f"{src.name or src.op_type}{suffix}"
            n.input[:] = ["x" if i == 0 else f"pre{suffix}"] + [v + suffix if v else v for v in src.input[1:]]
            n.output[:] = [f"y{suffix}" if i == len(base) - 1 else f"pre{suffix}"]
            nodes.append(n)
        outputs.append(helper.make_tensor_value_info(f"y{suffix}", onnx.TensorProto.FLOAT,
                                                     [batch, *geometry.output_shape]))
    graph = helper.make_graph(
        nodes, f"unit_{layer}",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, *geometry.input_shape])],
        outputs, tensors)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    out = helper.make_model(graph, opset_imports=opsets)
    out.ir_version = model.ir_version
    return out


def quantize_unit(fp32_path: Path, out_path: Path, input_shape: tuple[int, ...], *, samples: int = 4) -> Path:
    """Quantize a one-layer model as ``edgekit.compress.quant`` does: ORT's pre-processing, then ``quantize_static``
    (QDQ, uint8 activations per tensor, int8 weights per channel, MinMax on random-normal calibration data)."""
    import onnx

    from edgekit.compress.quant import W8A8Config, quantize_w8a8
    from edgekit.data import Dataset
    from edgekit.plan import LayerChoice, Plan

    model = onnx.load(str(fp32_path))
    rng = np.random.default_rng(0)
    data = Dataset(name="probe", inputs={model.graph.input[0].name: rng.standard_normal(
        (samples, *input_shape[1:])).astype(np.float32)}, labels=None, source="random normal")
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    plan = Plan(model_sha256="probe", target="probe", precision="int8",
                layers=tuple(LayerChoice(name, "w8a8") for name in layers))
    # timing does not depend on the bias values: skip the bias-correction pass
    return quantize_w8a8(Path(fp32_path), Path(out_path), plan, data, W8A8Config(bias_correction=False,
                                                                                  calib_samples=samples))


def integer_io(qdq) -> tuple[object, bool]:
    """The QDQ unit without its boundary QuantizeLinear (on the input) and DequantizeLinear (on each output): uint8
    in and out. Returns the model and whether every boundary was found (if not, the model comes back unchanged)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    g = out.graph
    x, ys = g.input[0].name, {o.name for o in g.output}
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == x]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in ys]
    if len(q) != 1 or len(dq) != len(ys):
        return qdq, False
    q_out = q[0].output[0]
    produced = {n.input[0]: n.output[0] for n in dq}  # each DQ's input (a Q output) becomes the graph output
    for n in q + dq:
        g.node.remove(n)
    for n in g.node:
        n.input[:] = [x if v == q_out else v for v in n.input]
        n.output[:] = [produced.get(v, v) for v in n.output]
    for vi in [g.input[0], *g.output]:
        vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return out, True


LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")  # what ORT adds at a unit's edges to change layout


class ProfiledUnit:
    """An ONNX Runtime session on a unit with the profiler on, set up as ``OrtRuntime`` sets up its sessions (CPU,
    the same ``DISABLED_OPTIMIZERS``, the same threading), that always runs its own feeds: ``compare_latency``
    gives every runtime the same feeds, and the units' inputs differ (float or uint8)."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None, tmp: Path, seed: int = 0, native: bool = False) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        if native:
            from edgekit.kernels import ort_native

            if not ort_native.register_native(opts):
                raise ConfigError("probing for a target with ai.edgekit kernels needs edgekit's native library, and "
                                  "it is not built here", hint="build it: python runtimes/onnxruntime/build.py (or "
                                  "make native)")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / f"profile_{Path(path).stem}")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))
        x = self.session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in x.shape]
        rng = np.random.default_rng(seed)
        data = (rng.integers(0, 256, size=shape, dtype=np.uint8) if "uint8" in x.type
                else rng.normal(size=shape).astype(np.float32))
        self.feeds = {x.name: data}

    def run(self, feeds=None):
        return self.session.run(None, self.feeds)

    def profile(self, skip: int = 0) -> tuple[float, dict[str, float]]:
        """End profiling: the median run time and, summed per op type, each node's median time (µs), the first
        ``skip`` runs (warm-up) left out."""
        import json

        events = json.loads(Path(self.session.end_profiling()).read_text())
        totals = [e["dur"] for e in events if e.get("name") == "model_run"][skip:]
        nodes: dict[tuple[str, str], list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                nodes.setdefault((e["name"], e["args"].get("op_name", "")), []).append(e["dur"])
        per_op: dict[str, float] = {}
        for (_, op), durs in nodes.items():
            per_op[op] = per_op.get(op, 0.0) + float(np.median(durs[skip:] or durs))
        return (float(np.median(totals)) if totals else 0.0), per_op


def kernel_ms(profile: tuple[float, dict[str, float]], exclude: tuple[str, ...] = LAYOUT_OPS) -> float:
    """A unit's own time in ms: its nodes' median times, those of type ``exclude`` left out.

    A one-layer unit pays for things a layer inside a whole model does not: per-call overhead, and the layout
    changes ORT inserts at the unit's edges (NCHW <-> NCHWc for float convolutions, NCHW <-> NHWC for int8 ones;
    in a whole model they happen once, where the layout region starts and ends).
    """
    return sum(t for op, t in profile[1].items() if op not in exclude) / 1e3


def measure_unit(model, layer: str, geometry: LayerGeometry, options: list[str], tmp: Path, *, rounds: int,
                 per_round: int, threads: int | None, copies: int = 4, warmup: int = 5,
                 edgekit_ops: bool = False) -> dict[str, dict]:
    """Time one layer unit under each option, interleaved; returns {option: {"median_ms", ...}} (see ``probe``)."""
    import onnx

    def target_form(qdq):  # an int8 unit as a target with ai.edgekit kernels exports it
        if not edgekit_ops:
            return qdq
        from edgekit.compress.graphedit import eliminate_dead_code
        from edgekit.export.ort_qconv import apply_qconv

        out = apply_qconv(qdq)[0]
        eliminate_dead_code(out.graph)  # the copies' shared input DequantizeLinear, which nothing reads any more
        return out

    fp32 = tmp / "fp32.onnx"
    onnx.save(one_layer_model(model, layer, geometry, copies=copies), str(fp32))
    paths = {"fp32": fp32} if "fp32" in options else {}
    if "w8a8" in options:
        qdq = quantize_unit(fp32, tmp / "qdq.onnx", (1, *geometry.input_shape))
        core, ok = integer_io(onnx.load(str(qdq)))
        if not ok:
            log.warning("layer %s: no int8 boundary found in the quantized unit; timing it with float I/O", layer)
        onnx.save(target_form(core), str(tmp / "w8a8.onnx"))
        if edgekit_ops:
            onnx.save(target_form(onnx.load(str(qdq))), str(qdq))
        paths |= {"w8a8": tmp / "w8a8.onnx", "w8a8_float_io": qdq}
    if "w8a8d" in options:
        paths["w8a8d"] = _dynamic_unit(fp32, tmp / "w8a8d.onnx")
    for option in options:
        if option not in paths and option != "w8a8":
            paths[option] = _weight_only_unit(fp32, tmp / f"{option}.onnx", option, edgekit_ops=edgekit_ops)
    units = {key: ProfiledUnit(path, threads=threads, tmp=tmp, native=edgekit_ops) for key, path in paths.items()}
    stats = compare_latency(units, {}, rounds=rounds, per_round=per_round, warmup=warmup)
    profiles = {key: unit.profile(skip=warmup) for key, unit in units.items()}
    out = {}
    for option in options:
        wall = stats[option]
        out[option] = {"median_ms": round(kernel_ms(profiles[option]) / copies, 4),
                       "wall_ms": round(wall.median_ms / copies, 4), "runs": wall.runs * copies}
    if "w8a8" in out:  # what a float neighbour costs: the (shared) input Quantize, each output's Dequantize
        per_op = profiles["w8a8_float_io"][1]
        out["w8a8"]["quantize_in_ms"] = round(per_op.get("QuantizeLinear", 0.0) / 1e3, 4)
        out["w8a8"]["dequantize_out_ms"] = round(per_op.get("DequantizeLinear", 0.0) / 1e3 / copies, 4)
    return out


def _weighted(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def _dynamic_unit(fp32_path: Path, out: Path) -> Path:
    """The unit with dynamic int8 (``compress.quant.quantize_w8a8d``): float in and out, as in a dynamic graph."""
    import onnx

    from edgekit.compress.quant import quantize_w8a8d
    from edgekit.plan import LayerChoice, Plan

    names = _weighted(onnx.load(str(fp32_path)))
    plan = Plan(model_sha256="probe", target="probe", precision="int8-dynamic",
                layers=tuple(LayerChoice(n, "w8a8d") for n in names))
    return quantize_w8a8d(fp32_path, out, plan)


def _weight_only_unit(fp32_path: Path, out: Path, option: str, *, edgekit_ops: bool = False) -> Path:
    """The unit with weight-only low-bit weights (``export.lowbit``; RTN: timing does not depend on the values)."""
    import onnx

    from edgekit.compress.wquant import rtn
    from edgekit.export.lowbit import apply_weight_only, weight_matrix
    from edgekit.wonly import weight_only

    bits, group, symmetric = weight_only(option)
    model = onnx.load(str(fp32_path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    weights = {n: rtn(weight_matrix(nodes[n], inits), bits, group, symmetric=symmetric, clip=False)
               for n in _weighted(model)}
    onnx.save(apply_weight_only(model, weights, edgekit_ops=edgekit_ops), str(out))
    return out


# -- probing --------------------------------------------------------------------------------------------------------
def probe(model_path: Path, options: list[str] | tuple[str, ...] = PROBE_OPTIONS, *, rounds: int = 5,
          per_round: int = 20, threads: int | None = None, progress: Callable | None = None,
          table: HardwareTable | None = None, copies: int = 4, edgekit_ops: bool = False) -> HardwareTable:
    """Measure every weighted layer of an ONNX model under each option; returns a HardwareTable (batch 1).
    ``edgekit_ops``: as a target with ``ai.edgekit`` kernels exports and runs them (see the module docstring).

    Signatures already in ``table`` (or seen earlier in this model) are not measured again; the result holds
    ``table``'s entries plus the new ones. ``progress`` is a track-like wrapper (``Context.track``).
    """
    import onnx

    from edgekit.wonly import weight_only

    bad = [o for o in options if o not in PROBE_OPTIONS and not weight_only(o)]
    if bad or not options:
        raise ConfigError(f"cannot probe options {bad or options}",
                          hint=f"probe-able: {', '.join(PROBE_OPTIONS)} and weight-only w<bits>g<group>[s]")
    if table is not None and table.entries and bool(table.meta.get("kernels")) != edgekit_ops:
        raise ConfigError(f"cannot add measurements {'with' if edgekit_ops else 'without'} ai.edgekit kernels to a "
                          f"table measured {'without' if edgekit_ops else 'with'} them",
                          hint="keep one hardware table per target (a profile's hardware_table)")
    model_path = Path(model_path)
    model = onnx.load(str(model_path))
    geometry = layer_geometry(model)
    layers = layer_inventory(model)
    result = HardwareTable(meta=dict(table.meta) if table else {}, label=table.label if table else "")
    if table is not None:
        result.entries = {s: dict(o) for s, o in table.entries.items()}
        result.layers = {m: dict(names) for m, names in table.layers.items()}
        if table.meta.get("threads", "default") != (threads or "default"):
            log.warning("adding measurements with threads=%s to a table measured with threads=%s",
                        threads or "default", table.meta.get("threads"))
    seen = result.layers.setdefault(model_path.name, {})
    todo = progress(layers, f"probing {model_path.name}", total=len(layers)) if progress else layers
    with tempfile.TemporaryDirectory(prefix="edgekit-probe-") as tmp:
        for layer in todo:
            sig = layer_signature(layer, geometry.get(layer.name))
            if sig is None:
                log.warning("layer %s: input shape unknown, not measured", layer.name)
                continue
            seen[layer.name] = sig
            missing = [o for o in options if o not in result.entries.get(sig, {}) and applicable(o, layer.op_type)]
            if not missing:
                continue
            unit = Path(tempfile.mkdtemp(prefix="unit-", dir=tmp))
            measured = measure_unit(model, layer.name, geometry[layer.name], missing, unit, rounds=rounds,
                                    per_round=per_round, threads=threads, copies=copies, edgekit_ops=edgekit_ops)
            result.entries.setdefault(sig, {}).update(measured)
            log.info("%s: %s", layer.name, {o: m["median_ms"] for o, m in measured.items()})
    result.meta.update(_meta(threads, rounds, per_round), copies=copies)
    if edgekit_ops:
        result.meta["kernels"] = KERNELS
    result.meta["models"] = sorted(set(result.meta.get("models", [])) | {model_path.name})
    return result


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")


def _cpu_flags() -> dict:
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (p.strip() for p in line.partition(":"))
            if key in ("cpu family", "model", "stepping") and key not in info:
                info["cpu_" + key.removeprefix("cpu ")] = value
            if key == "flags" and "isa" not in info:
                flags = set(value.split())
                info["isa"] = [f for f in _ISA if f in flags]
    except OSError:
        pass
    return info


def _meta(threads: int | None, rounds: int, per_round: int) -> dict:
    import os

    import onnxruntime as ort

    from edgekit import __version__

    return {"cpu": cpu_model(), **_cpu_flags(), "logical_cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "threads": threads if threads else "default", "batch": 1, "rounds": rounds, "per_round": per_round,
            "disabled_optimizers": list(DISABLED_OPTIMIZERS), "edgekit": __version__,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "w8a8": "QDQ (quantize_static), uint8 activations per tensor, int8 weights per channel; uint8 in/out",
            "median_ms_is": "per-layer kernel time (ORT profiler), edge layout changes and per-call overhead excluded"}


def write_hardware_table(results: HardwareTable, path: Path, *, command: str | None = None) -> Path:
    """Write ``results`` as JSON at ``path`` (atomically), stamping the command that made it."""
    results.meta["command"] = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return results.save(Path(path))


def probe_models(specs: list[str], options: list[str], *, ctx, table: HardwareTable | None = None,
                 **kw) -> HardwareTable:
    """Probe every weighted layer of each model (``.onnx`` path or any ``edgekit build --model`` spec) into one table;
    signatures already in ``table`` are not measured again."""
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model

    with tempfile.TemporaryDirectory(prefix="edgekit-probe-models-") as tmp:
        for spec in specs:
            path = Path(spec)
            if spec.endswith(".onnx"):
                load_model(spec, ctx=ctx)  # a missing or unreadable file is a clear ModelLoadError here
            else:
                path = Path(tmp) / f"{spec.replace(':', '_').replace('/', '_')}.onnx"
                export_onnx(load_model(spec, ctx=ctx), path)
            table = probe(path, options, table=table, progress=ctx.track, **kw)
    if table is None:
        raise ConfigError("no model to probe")
    return table
