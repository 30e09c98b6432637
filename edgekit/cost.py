"""What each option costs per layer on a target: exact weight bytes, and latency measured or estimated.

Latency comes from the target's hardware table (``hardware/<target>.json``, written by ``edgekit.probe``) when it
holds the layer's *signature* (op, weight shape, input shape, strides, pads, groups, fused activation): a layer's
speed depends on its geometry, not its name, so one measurement serves every layer and model that shares it.
Otherwise a roofline estimate from the profile's peak compute and memory bandwidth stands in. No torch here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ConfigError
from edgekit.fsutil import atomic_write_text
from edgekit.inventory import WEIGHTED_OPS, LayerInfo
from edgekit.tables import CostEntry, CostTable

HARDWARE_SCHEMA_VERSION = 1
# option -> the profile's peak_gops key, and bytes per activation element (w8a8: uint8 activations)
OPTION_PRECISION = {"fp32": "fp32", "w8a8": "int8", "w4a8": "int8", "w8a8d": "int8"}
ACTIVATION_BYTES = {"fp32": 4, "w8a8": 1, "w4a8": 1, "w8a8d": 4}
MEASURED_AS = {"w4a8": "w8a8"}  # runs in that option's kernels (int4 weights are widened to int8 at load)
FUSED_ACTIVATIONS = ("Relu", "Clip")  # measured together with the layer: int8 kernels fold them into the requant
_CONV_DEFAULTS = {"strides": 1, "dilations": 1}
_WONLY_RE = re.compile(r"^w([2348])g(\d+)(s?)$")


def _weight_only(option: str) -> tuple[int, int, bool] | None:
    m = _WONLY_RE.match(option)
    return (int(m[1]), int(m[2]), bool(m[3])) if m else None


def _check(option: str) -> str:
    if option not in OPTION_PRECISION and _weight_only(option) is None:
        raise ConfigError(f"no cost model for option {option!r}",
                          hint=f"known: {', '.join(OPTION_PRECISION)} and weight-only w<bits>g<group>[s]")
    return option


def _precision(option: str) -> str:
    """The peak_gops key an option computes at: weight-only kernels (MatMulNBits, accuracy level 4) use int8 dot
    products on block-quantized activations."""
    return OPTION_PRECISION.get(option, "int8")


# -- geometry: what the inventory does not say (input shape, strides, pads, fused activation) --------------------
@dataclass(frozen=True)
class LayerGeometry:
    """Shapes and attributes of one weighted node, read from the ONNX graph. Shapes are per sample (no batch)."""

    name: str
    op_type: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # () when shape inference could not tell
    output_shape: tuple[int, ...]
    attrs: tuple[tuple[str, Any], ...]  # normalised: Conv strides/pads/dilations/group, Gemm transA/transB/alpha/beta
    has_bias: bool
    activation: str | None = None  # "Relu" or "Clip(0,6)" when the only consumer is that activation
    reads_graph_input: bool = False
    writes_graph_output: bool = False

    def attr(self, name: str, default: Any = None) -> Any:
        return dict(self.attrs).get(name, default)

    @property
    def out_channels(self) -> int:
        """The quantization axis' length: Conv O, Gemm N (either transB), MatMul N."""
        w = self.weight_shape
        if self.op_type == "Gemm":
            return int(w[0] if self.attr("transB", 0) else w[1])
        return int(w[-1] if self.op_type == "MatMul" else w[0])


def _dims(vi) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)


def _const_scalar(name: str, inits: dict, consts: dict) -> float | None:
    from onnx import numpy_helper

    t = inits.get(name) if name in inits else consts.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _activation_of(node, consumers: dict, outputs: set[str], inits: dict, consts: dict) -> str | None:
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or node.output[0] in outputs or users[0].op_type not in FUSED_ACTIVATIONS:
        return None
    act = users[0]
    if act.op_type == "Relu":
        return "Relu"
    bounds: list[float | None] = [None, None]
    for i, name in enumerate(list(act.input[1:3])):
        if name:
            bounds[i] = _const_scalar(name, inits, consts)
            if bounds[i] is None:
                return None  # bounds computed at run time: not a fusable unit
    for a in act.attribute:  # opset < 11 keeps the bounds as attributes
        if a.name in ("min", "max"):
            bounds[0 if a.name == "min" else 1] = a.f
    return "Clip({},{})".format(*("" if b is None else f"{b:g}" for b in bounds))


def _norm_attrs(node, wshape: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    import onnx

    raw = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        n = len(wshape) - 2
        out: dict[str, Any] = {k: tuple(int(x) for x in raw.get(k, [d] * n)) for k, d in _CONV_DEFAULTS.items()}
        out["pads"] = tuple(int(x) for x in raw.get("pads", [0] * 2 * n))
        out["group"] = int(raw.get("group", 1))
        pad = raw.get("auto_pad", b"NOTSET")
        out["auto_pad"] = pad.decode() if isinstance(pad, bytes) else str(pad)
        return tuple(sorted(out.items()))
    if node.op_type == "Gemm":
        return tuple(sorted({"transA": int(raw.get("transA", 0)), "transB": int(raw.get("transB", 0)),
                             "alpha": float(raw.get("alpha", 1.0)), "beta": float(raw.get("beta", 1.0))}.items()))
    return ()


def layer_geometry(model_or_path) -> dict[str, LayerGeometry]:
    """Geometry of every weighted layer of an ONNX model (path or ModelProto), keyed by node name."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - geometry then stays unknown and the roofline guesses
        inferred = model
    g = inferred.graph
    shapes = {vi.name: _dims(vi) for vi in list(g.value_info) + list(g.output) + list(g.input)}
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "value"}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs, outputs = {i.name for i in g.input} - set(inits), {o.name for o in g.output}
    geo = {}
    for node in g.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        wshape = tuple(int(d) for d in inits[node.input[1]].dims)
        act = _activation_of(node, consumers, outputs, inits, consts)
        out_name = consumers[node.output[0]][0].output[0] if act else node.output[0]
        per_sample = [shapes.get(node.input[0], ()), shapes.get(node.output[0], ())]
        per_sample = [s[1:] if s and all(d > 0 for d in s[1:]) else () for s in per_sample]
        geo[node.name] = LayerGeometry(
            name=node.name, op_type=node.op_type, weight_shape=wshape, input_shape=per_sample[0],
            output_shape=per_sample[1], attrs=_norm_attrs(node, wshape),
            has_bias=len(node.input) > 2 and bool(node.input[2]), activation=act,
            reads_graph_input=node.input[0] in inputs, writes_graph_output=out_name in outputs)
    return geo


def layer_signature(layer: LayerInfo, geometry: LayerGeometry | None) -> str | None:
    """A string naming everything that decides a layer's speed, e.g.
    ``Conv/conv w=32x3x3x3 in=3x224x224 s=2x2 p=0,0,1,1 d=1x1 g=1 b=1 act=Clip(0,6)``; None without input shape."""
    if geometry is None or not geometry.input_shape:
        return None
    x = "x".join
    parts = [f"{layer.op_type}/{layer.kind}", f"w={x(map(str, geometry.weight_shape))}",
             f"in={x(map(str, geometry.input_shape))}"]
    a = dict(geometry.attrs)
    if layer.op_type == "Conv":
        parts += [f"s={x(map(str, a['strides']))}", f"p={','.join(map(str, a['pads']))}",
                  f"d={x(map(str, a['dilations']))}", f"g={a['group']}"]
        if a["auto_pad"] != "NOTSET":
            parts.append(f"auto_pad={a['auto_pad']}")
    elif layer.op_type == "Gemm":
        parts += [f"tA={a['transA']}", f"tB={a['transB']}"]
        parts += [f"{k}={a[k]:g}" for k in ("alpha", "beta") if a[k] != 1.0]
    parts += [f"b={int(geometry.has_bias)}", f"act={geometry.activation or 'none'}"]
    return " ".join(parts)


# -- bytes ----------------------------------------------------------------------------------------------------------
def _out_channels(layer: LayerInfo, geometry: LayerGeometry | None) -> int:
    if geometry is not None:
        return geometry.out_channels
    w = layer.weight_shape  # the exporter writes Gemm with transB=1 (weight N x K)
    return int(w[-1] if layer.op_type == "MatMul" else w[0])


def layer_bytes(layer: LayerInfo, option: str, *, geometry: LayerGeometry | None = None,
                bias_correction: bool = True) -> int:
    """Weight bytes of ``layer`` in the artifact under ``option`` (initializer payloads, exact).

    - ``fp32``: 4 bytes per parameter (weight and bias).
    - weight-only ``w<b>g<G>[s]``: ``compress.wquant.storage_bytes`` plus a float32 bias;
    - ``w8a8d``: 1 byte per weight element plus an fp32 scale and int8 zero point per output column;
    - ``w8a8`` (ORT QDQ, per-channel): 1 byte per weight element, plus per output channel an fp32 weight scale and
      an int8 weight zero point; a bias becomes int32 with its own per-channel fp32 scale (input scale × weight
      scale) and int32 zero point: 12 bytes per output channel. Bias correction (edgekit's default) gives every
      Conv and Gemm a bias, even one that had none; a bare MatMul never has one.
    """
    _check(option)
    if option == "fp32":
        return 4 * layer.params
    weight = int(np.prod(layer.weight_shape))
    wo = _weight_only(option)
    if wo is not None:  # MatMulNBits / GatherBlockQuantized: packed values, fp32 scales, packed zero points, bias
        from edgekit.compress.wquant import storage_bytes

        bits, group, symmetric = wo
        out = int(layer.weight_shape[0]) if layer.op_type == "Gather" else _out_channels(layer, geometry)
        return storage_bytes(out, weight // out, bits, group, symmetric=symmetric) + 4 * (layer.params - weight)
    out = _out_channels(layer, geometry)
    has_bias = layer.params > weight or (bias_correction and layer.op_type in ("Conv", "Gemm"))
    if option == "w4a8":  # int4 weights two per byte, fp32 scale + int4 zero point per channel, int32 bias as w8a8
        return -(-weight // 2) + out * 4 + -(-out // 2) + (12 * out if has_bias else 0)
    if option == "w8a8d":  # ORT quantize_dynamic, per channel: int8 weights, fp32 scale + int8 zero point per column
        return weight + out * (4 + 1) + 4 * (layer.params - weight)
    return weight + out * (4 + 1) + (12 * out if has_bias else 0)


# -- roofline -------------------------------------------------------------------------------------------------------
def activation_elements(layer: LayerInfo, geometry: LayerGeometry | None = None) -> tuple[int, int]:
    """Input and output activation elements per sample: exact from the geometry, else estimated from the MACs
    (stride 1, same spatial size in and out)."""
    if geometry is not None and geometry.input_shape and geometry.output_shape:
        return int(np.prod(geometry.input_shape)), int(np.prod(geometry.output_shape))
    w = layer.weight_shape
    if layer.op_type == "Conv":
        per_out = int(np.prod(w[1:]))  # MACs per output element
        outs = layer.macs // max(per_out, 1)
        c_in = w[0] if layer.kind == "depthwise_conv" else w[1]
        return outs * c_in // max(w[0], 1), outs
    k, n = (w[0], w[1]) if layer.op_type == "MatMul" else (w[1], w[0])
    rows = max(layer.macs // max(k * n, 1), 1)
    return rows * k, rows * n


def roofline_ms(layer: LayerInfo, option: str, profile, batch: int = 1, *,
                geometry: LayerGeometry | None = None) -> float:
    """Roofline latency estimate in ms: the larger of compute time and memory time.

    compute_ms = 2 · macs · batch / (peak_gops[precision] · 1e9) · 1e3, precision = "int8" for w8a8, "fp32" for
    fp32 (fp32's peak when the profile lists none for that precision);
    memory_ms = (layer_bytes + batch · (in + out activation elements) · activation bytes) / (bandwidth_gbs · 1e9)
    · 1e3, activation bytes = 4 (fp32) or 1 (w8a8, uint8 activations).
    """
    _check(option)
    if layer.op_type == "Gather":  # reads only the rows it gathers: one row per sample, whatever the encoding
        return batch * int(layer.weight_shape[-1]) * 8 / (profile.hardware.bandwidth_gbs * 1e9) * 1e3
    peaks = profile.hardware.peak_gops
    peak = peaks.get(_precision(option)) or peaks.get("fp32")
    if not peak:
        raise ConfigError(f"target {profile.name!r} lists no peak_gops for {_precision(option)} or fp32")
    compute_ms = 2.0 * layer.macs * batch / (peak * 1e9) * 1e3
    n_in, n_out = activation_elements(layer, geometry)
    moved = layer_bytes(layer, option, geometry=geometry) + batch * (n_in + n_out) * ACTIVATION_BYTES.get(option, 4)
    memory_ms = moved / (profile.hardware.bandwidth_gbs * 1e9) * 1e3
    return max(compute_ms, memory_ms)


# -- hardware tables ------------------------------------------------------------------------------------------------
@dataclass
class HardwareTable:
    """Measured latency per layer signature and option: ``entries[signature][option] = {"median_ms", "runs", ...}``.

    ``meta`` says how and where it was measured (cpu, onnxruntime version, threads, batch, date, command);
    ``layers`` which model layers had which signature (for reports). ``label`` names it in CostEntry sources.
    """

    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> layer -> signature
    label: str = ""

    @property
    def batch(self) -> int:
        return int(self.meta.get("batch", 1))

    def latency(self, signature: str | None, option: str) -> float | None:
        entry = self.entries.get(signature or "", {}).get(option)
        return None if entry is None else float(entry["median_ms"])

    def merge(self, other: HardwareTable) -> HardwareTable:
        """A new table with ``other``'s entries added (``other`` wins where both measured the same thing)."""
        entries = {s: dict(o) for s, o in self.entries.items()}
        for sig, opts in other.entries.items():
            entries.setdefault(sig, {}).update(opts)
        return HardwareTable(entries, {**self.meta, **other.meta}, {**self.layers, **other.layers}, self.label)

    def to_dict(self) -> dict:
        return {"version": HARDWARE_SCHEMA_VERSION, "meta": self.meta, "entries": self.entries, "layers": self.layers}

    def save(self, path: Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict, label: str = "") -> HardwareTable:
        name = label or "(unnamed)"
        if not isinstance(d, dict):
            raise ConfigError(f"hardware table {name} is a JSON {type(d).__name__}, not an object",
                              hint="re-run `edgekit hardware probe`")
        if d.get("version") != HARDWARE_SCHEMA_VERSION or "entries" not in d:
            raise ConfigError(f"hardware table {name} has schema version {d.get('version')!r}, "
                              f"expected {HARDWARE_SCHEMA_VERSION}", hint="re-run `edgekit hardware probe`")
        for key in ("entries", "meta", "layers"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"hardware table {name}: {key!r} must be a JSON object, not "
                                  f"{type(d[key]).__name__}", hint="re-run `edgekit hardware probe`")
        return cls(entries=d["entries"], meta=d.get("meta", {}), layers=d.get("layers", {}), label=label)

    @classmethod
    def load(cls, path: Path, label: str | None = None) -> HardwareTable:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read hardware table {path}: {exc}") from exc
        return cls.from_dict(d, label=str(path) if label is None else label)

    @classmethod
    def for_profile(cls, profile, root: Path | None = None) -> HardwareTable | None:
        """The profile's table, or None when it names none or the file does not exist (yet). A table probed with
        ``ai.edgekit`` kernels for a profile without them (or the reverse) is used with a warning."""
        path = hardware_table_path(profile, root)
        if path is None or not path.is_file():
            return None
        table = cls.load(path, label=profile.hardware_table)
        if profile.edgekit_kernels != bool(table.meta.get("kernels")):
            import logging

            logging.getLogger(__name__).warning(
                "hardware table %s was probed %s ai.edgekit kernels, and target %s runs %s them; its latencies "
                "misprice those layers (probe with `edgekit hardware probe --target %s`)", profile.hardware_table,
                "with" if table.meta.get("kernels") else "without", profile.name,
                "with" if profile.edgekit_kernels else "without", profile.name)
        return table


def hardware_table_path(profile, root: Path | None = None) -> Path | None:
    """Where ``profile.hardware_table`` points: relative paths are read from ``root``, else from the parent of the
    folder the profile came from (the repository root for ``targets/<name>.toml``)."""
    if not profile.hardware_table:
        return None
    rel = Path(profile.hardware_table)
    if rel.is_absolute():
        return rel
    if root is None:
        from edgekit.targets import targets_dir

        root = Path(profile.source).resolve().parent.parent if profile.source else targets_dir().parent
    return Path(root) / rel


# -- the table ------------------------------------------------------------------------------------------------------
def cost_table(layers: list[LayerInfo], profile, options: dict[str, list[str]], *,
               hardware: HardwareTable | None, geometry: dict[str, LayerGeometry] | None = None, batch: int = 1,
               bias_correction: bool = True) -> CostTable:
    """Bytes and latency of every (layer, option) in ``options`` (layer name -> candidate options).

    Latency is the hardware table's median when it measured the layer's signature at this batch size (source
    ``measured:<table>``), else the roofline (source ``roofline``). Without ``geometry`` (see ``layer_geometry``)
    no signature can be formed, so every latency is a roofline estimate.
    """
    geometry = geometry or {}
    use_table = hardware is not None and hardware.batch == batch
    entries: dict[str, dict[str, CostEntry]] = {}
    for layer in layers:
        geo = geometry.get(layer.name)
        sig = layer_signature(layer, geo)
        row = {}
        for option in options.get(layer.name, []):
            size = layer_bytes(layer, option, geometry=geo, bias_correction=bias_correction)
            alias = MEASURED_AS.get(option, option)
            measured = hardware.latency(sig, alias) if use_table else None
            if measured is not None:
                note = "" if alias == option else f" ({alias} kernel)"
                row[option] = CostEntry(size, measured, f"measured:{hardware.label}{note}")
            else:
                row[option] = CostEntry(size, roofline_ms(layer, option, profile, batch, geometry=geo), "roofline")
        if row:
            entries[layer.name] = row
    return CostTable(target=profile.name, entries=entries)
