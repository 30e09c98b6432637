"""Export to ONNX: torch modules through ``torch.onnx.export`` (dynamo, falling back to the legacy exporter with a
logged reason); ONNX inputs are checked and copied. Weighted nodes are renamed after the module owning their weight,
and the exporter's debug metadata (stack traces with this host's paths, FX node text) is dropped from the nodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from edgekit.errors import ExportError
from edgekit.fsutil import sha256_file
from edgekit.inventory import WEIGHTED_OPS
from edgekit.iospec import ONNX_DTYPES, Artifact, TensorSpec
from edgekit.model import LoadedModel, example_inputs

log = logging.getLogger(__name__)

OPSET = 18


def export_onnx(model: LoadedModel, out_path: Path) -> Artifact:
    """Write ``model`` as an FP32 ONNX file at ``out_path`` and describe it."""
    import onnx

    out_path = Path(out_path)
    if model.onnx_path is not None:  # loaded with any external weights, written as one self-contained file
        try:
            onnx.save(onnx.load(str(model.onnx_path)), str(out_path))
        except Exception as exc:
            raise ExportError(f"cannot rewrite {model.onnx_path} as one file: {exc}",
                              hint="models over 2 GB need external data, which this exporter does not write yet") \
                from exc
    else:
        _export_torch(model, out_path)
    proto = onnx.load(str(out_path))
    renamed = name_weighted_nodes(proto)
    stripped = strip_export_debug(proto)
    if renamed or stripped:
        onnx.save(proto, str(out_path))
    _record_batchnorm(model, out_path)  # for the final bytes: the record carries their hash
    return describe(out_path, proto)


def _record_batchnorm(model: LoadedModel, out_path: Path) -> None:
    """The training distribution's BatchNorm statistics beside the export, for channel importance
    (``compress.bnstats``); a stale record of an earlier export at this path is removed."""
    from edgekit.compress import bnstats

    bnstats.stats_path(out_path).unlink(missing_ok=True)
    if model.onnx_path is not None or model.module is None:
        return
    try:
        bnstats.record(model.module, example_inputs(model.inputs), out_path)
    except Exception as exc:  # noqa: BLE001 - an optional aid: importance falls back to calibration activations
        log.warning("BatchNorm statistics not recorded (%s: %s); channel importance will use calibration activations",
                    type(exc).__name__, exc)


def describe(path: Path, proto=None, runtime: str = "onnxruntime", custom_ops: tuple[str, ...] = ()) -> Artifact:
    """An Artifact for an ONNX file (inputs/outputs read from the graph)."""
    import onnx

    proto = proto if proto is not None else onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}

    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        if tt.elem_type not in ONNX_DTYPES:
            raise ExportError(f"tensor {vi.name!r} of {path} has an unsupported element type {tt.elem_type}")
        return TensorSpec(vi.name, dims, ONNX_DTYPES[tt.elem_type])

    return Artifact(
        path=Path(path),
        format="onnx",
        sha256=sha256_file(path),
        inputs=tuple(spec(i) for i in proto.graph.input if i.name not in inits),
        outputs=tuple(spec(o) for o in proto.graph.output),
        runtime=runtime,
        custom_ops=custom_ops,
    )


def name_weighted_nodes(proto) -> int:
    """Rename each Conv/Gemm/MatMul with an initializer weight ``a.b.weight`` to ``a.b``; returns how many."""
    inits = {i.name for i in proto.graph.initializer}
    taken = {n.name for n in proto.graph.node}
    count = 0
    for node in proto.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = node.input[1]
        if not w.endswith(".weight"):
            continue
        name = w.removesuffix(".weight")
        if name == node.name or name in taken:
            continue
        taken.discard(node.name)
        node.name = name
        taken.add(name)
        count += 1
    return count


# node metadata the torch/onnxscript exporters attach for debugging: Python stack traces (with the build host's
# paths), FX node text and module scopes. Nothing reads them at run time, every edit of the graph would have to carry
# them along consistently, and they make the same model's file differ by checkout path; on a small model they were
# 15 % of an INT8 artifact and threw the size budget's byte model off by that much (only some passes dropped them).
DEBUG_METADATA_PREFIXES = ("pkg.torch.onnx.", "pkg.onnxscript.")
DEBUG_METADATA_KEYS = frozenset({"namespace"})


def all_nodes(proto) -> list:
    """Every node of a ModelProto: its graph's, its subgraphs' (If/Loop/Scan bodies) and its functions'."""

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from nodes(sub)

    return [n for g in [proto.graph, *proto.functions] for n in nodes(g)]


def strip_export_debug(proto) -> int:
    """Drop the exporters' debug metadata (``DEBUG_METADATA_*``) from every node (subgraphs and functions included);
    other metadata stays. Returns how many entries were dropped."""
    dropped = 0
    for node in all_nodes(proto):
        keep = [m for m in node.metadata_props
                if m.key not in DEBUG_METADATA_KEYS and not m.key.startswith(DEBUG_METADATA_PREFIXES)]
        if len(keep) != len(node.metadata_props):
            dropped += len(node.metadata_props) - len(keep)
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    return dropped


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters log warnings about optional packages (torchvision ops) that say nothing about this model."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core")
    old = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in old:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in old:
            lg.setLevel(level)


def _export_torch(model: LoadedModel, out_path: Path) -> None:
    import torch

    args = example_inputs(model.inputs)
    names = [s.name for s in model.inputs]
    outs = list(model.output_names)
    dynamic = all(isinstance(s.shape[0], str) for s in model.inputs)
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dyn = tuple({0: batch} for _ in args) if dynamic else None
        with _quiet_exporter():
            torch.onnx.export(
                model.module, args, str(out_path), dynamo=True, external_data=False, opset_version=OPSET,
                input_names=names, output_names=outs, dynamic_shapes=dyn, verbose=False,
            )
        return
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to the legacy exporter
        log.warning("dynamo ONNX export failed (%s: %s); falling back to the legacy TorchScript exporter",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model.module, args, str(out_path), dynamo=False, opset_version=17, input_names=names,
                output_names=outs,
                dynamic_axes={n: {0: "batch"} for n in names + outs} if dynamic else None,
            )
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {model.source} failed with both exporters: {type(exc).__name__}: {exc}",
            hint="check that the model runs under torch.export, or export it to .onnx yourself and pass that",
        ) from exc
