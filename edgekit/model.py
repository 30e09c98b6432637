"""Load a model from what the user names: ``builtin:NAME``, ``module:factory``, a ``torch.export`` ``.pt2``, or
``.onnx``.

The result says what the model is (torch module or ONNX file), its inputs and outputs, its preprocessing when
known, and a content hash used for lineage and caching.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.context import Context
from edgekit.errors import ConfigError, ModelLoadError
from edgekit.fsutil import sha256_file
from edgekit.iospec import ONNX_DTYPES, Preprocessing, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for export. Exactly one of ``module`` (torch) or ``onnx_path`` is set."""

    name: str
    source: str
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    sha256: str
    module: Any = None
    onnx_path: Path | None = None
    preprocessing: Preprocessing | None = None
    task: str = "generic"  # "classification" enables top-1 agreement / accuracy
    default_calib: str | None = None
    default_eval: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def framework(self) -> str:
        return "onnx" if self.onnx_path is not None else "torch"


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``; raises ConfigError on anything else."""
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not a comma-separated list of integers") from None
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"--input-shape {text!r} must be positive integers, e.g. 1,3,224,224")
    return dims


def torch_state_hash(module) -> str:
    """Hash of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_model(
    spec: str,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    input_dtypes: dict[str, str] | None = None,
    ctx: Context,
) -> LoadedModel:
    """Resolve ``spec`` into a LoadedModel. Errors say what was wrong and how to name a model.

    ``input_dtypes`` (input name → dtype) types a torch model's inputs, e.g. int64 token ids; default float32.
    """
    if spec.startswith("builtin:"):
        if input_shapes:  # a built-in's input is fixed: a different shape given would be silently ignored
            from edgekit.zoo import get_builtin

            fixed = [tuple(i.shape[1:]) for i in get_builtin(spec.removeprefix("builtin:")).inputs]
            if [tuple(s[1:]) for s in input_shapes] != fixed:
                raise ConfigError(f"{spec} takes inputs of shape {', '.join(map(str, fixed))} per sample, not "
                                  f"{', '.join(str(tuple(s[1:])) for s in input_shapes)}", hint="drop --input-shape")
        return _load_builtin(spec.removeprefix("builtin:"), ctx)
    path = Path(spec)
    if spec.endswith(".onnx"):
        return _load_onnx(path, input_shapes)
    if spec.endswith(".pt2"):
        return _load_pt2(path, input_shapes, input_dtypes)
    if ":" in spec and not path.exists():
        return _load_factory(spec, input_shapes, input_dtypes)
    raise ConfigError(
        f"cannot tell what kind of model {spec!r} is",
        hint="name a model as builtin:NAME, package.module:factory, file.pt2 (torch.export) or file.onnx",
    )


def _load_builtin(name: str, ctx: Context) -> LoadedModel:
    from edgekit.zoo import get_builtin

    entry = get_builtin(name)
    module = entry.make(ctx)
    return LoadedModel(
        name=entry.name,
        source=f"builtin:{entry.name}",
        inputs=entry.inputs,
        output_names=entry.output_names,
        sha256=torch_state_hash(module),
        module=module,
        preprocessing=entry.preprocessing,
        task=entry.task,
        default_calib=entry.calib_data,
        default_eval=entry.eval_data,
    )


def _forward_names(module, count: int) -> list[str] | None:
    """The names of ``forward``'s first ``count`` positional parameters (``input_ids``, ``attention_mask`` ...)."""
    import inspect

    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    return [p.name for p in params[:count]] if len(params) >= count else None


def _torch_inputs(input_shapes: list[tuple[int, ...]] | None, spec: str, module=None,
                  dtypes: dict[str, str] | None = None) -> tuple[TensorSpec, ...]:
    """Input specs of a torch model: names from ``forward``'s signature (else ``input``/``input_N``), dtypes from
    ``dtypes`` (by name; e.g. read from the calibration .npz) else float32, the first dimension a dynamic batch."""
    if not input_shapes:
        raise ConfigError(
            f"{spec}: a PyTorch model needs its input shape", hint="pass --input-shape 1,3,224,224"
        )
    names = (_forward_names(module, len(input_shapes)) if module is not None else None) or (
        ["input"] if len(input_shapes) == 1 else [f"input_{i}" for i in range(len(input_shapes))])
    dtypes = dtypes or {}
    return tuple(TensorSpec(n, ("batch", *s[1:]), dtypes.get(n, "float32")) for n, s in zip(names, input_shapes))


def example_inputs(inputs: tuple[TensorSpec, ...]):
    """One sample per input for tracing: zeros for floats, ones for integers (valid token ids and masks)."""
    import torch

    return tuple(
        (torch.ones if spec.np_dtype.kind in "iu" else torch.zeros)((1, *spec.sample_shape),
                                                                     dtype=getattr(torch, spec.dtype))
        for spec in inputs
    )


def batch_size(inputs: tuple[TensorSpec, ...], default: int) -> int:
    """The batch to run a model with: its static batch when it has one, else ``default``."""
    first = inputs[0].shape[0] if inputs and inputs[0].shape else "batch"
    return first if isinstance(first, int) else default


def _guess_task(module, inputs: tuple[TensorSpec, ...]) -> str:
    """A model whose single output is 2-D (batch, classes) with more than one class is treated as a classifier, unless
    its rows have unit length (an embedding)."""
    import torch

    try:
        with torch.no_grad():
            out = module(*example_inputs(inputs))
    except Exception as exc:
        raise ModelLoadError(f"the model failed on a zero input of the given shape: {exc}") from exc
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1:
        norms = torch.linalg.vector_norm(out.float(), dim=1)
        if torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            return "embedding"  # unit-length rows: a sentence/image embedding, compared by cosine
        return "classification"
    return "generic"


def _load_factory(spec: str, input_shapes, input_dtypes=None) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"model {spec!r}: expected package.module:factory")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`, user modules in the working folder resolve
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {mod_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"module {mod_name!r} has no callable {attr!r}")
    import torch

    try:
        net = factory()
    except Exception as exc:
        raise ModelLoadError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, torch.nn.Module):
        raise ModelLoadError(f"{spec}() returned {type(net).__name__}, not a torch.nn.Module")
    net = net.eval()
    inputs = _torch_inputs(input_shapes, spec, net, input_dtypes)
    return LoadedModel(
        name=attr,
        source=spec,
        inputs=inputs,
        output_names=("output",),
        sha256=torch_state_hash(net),
        module=net,
        task=_guess_task(net, inputs),
    )


def _not_found(path: Path) -> str:
    return f"model path {path} is a folder, not a model file" if path.is_dir() else f"model file not found: {path}"


def _load_pt2(path: Path, input_shapes, input_dtypes=None) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(_not_found(path))
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.export.load would log a traceback before raising
        raise ModelLoadError(f"{path} is not a torch.export program (a .pt2 file is a zip archive)",
                             hint="save one with torch.export.save(torch.export.export(model, args), path)")
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable torch.export program: {exc}") from exc
    net = program.module()
    shapes, static_batch = [], False
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is None:
                break
            static_batch = static_batch or isinstance(val.shape[0], int)
            shapes.append(tuple(int(d) if isinstance(d, int) else 1 for d in val.shape))
    inputs = _torch_inputs(input_shapes or shapes or None, str(path), net, input_dtypes)
    if static_batch:  # exported without a dynamic batch dimension: keep the batch it was exported with
        log.info("%s was exported with a static batch; keeping it", path)
        inputs = tuple(TensorSpec(i.name, s[:1] + i.shape[1:], i.dtype) for i, s in zip(inputs, shapes))
    return LoadedModel(
        name=path.stem,
        source=str(path),
        inputs=inputs,
        output_names=("output",),
        sha256=sha256_file(path),
        module=net,
        task=_guess_task(net, inputs),
    )




def _load_onnx(path: Path, input_shapes) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(_not_found(path))
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {exc}") from exc
    # weights in side files (torch's exporter default) are part of the model: they must exist, and count in the hash
    data_files = sorted({entry.value for init in proto.graph.initializer
                         if init.data_location == onnx.TensorProto.EXTERNAL
                         for entry in init.external_data if entry.key == "location"})
    missing = [f for f in data_files if not (path.parent / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path} keeps its weights in {', '.join(missing)}, which is not beside it",
                             hint="keep the .onnx.data file(s) next to the .onnx, or re-export with "
                                  "external_data=False")
    try:
        onnx.checker.check_model(str(path))  # by path: external data is checked beside the model
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {exc}") from exc
    digest = sha256_file(path)
    if data_files:
        h = hashlib.sha256(digest.encode())
        for f in data_files:
            h.update(sha256_file(path.parent / f).encode())
        digest = h.hexdigest()
    init_names = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in init_names]
    if input_shapes is not None and len(input_shapes) != len(graph_inputs):
        raise ConfigError(f"--input-shape given {len(input_shapes)} times but {path} has {len(graph_inputs)} inputs")
    inputs = []
    for k, gi in enumerate(graph_inputs):
        tt = gi.type.tensor_type
        dtype = ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise ModelLoadError(f"input {gi.name!r} of {path} has an unsupported element type {tt.elem_type}")
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if input_shapes is not None:
            given = input_shapes[k]
            if len(given) != len(dims):
                raise ConfigError(
                    f"--input-shape {given} has rank {len(given)}; input {gi.name!r} has rank {len(dims)}"
                )
            dims = [dims[0], *given[1:]]
        inputs.append(TensorSpec(gi.name, tuple(dims), dtype))
    outputs = tuple(o.name for o in proto.graph.output)
    task = "generic"
    if len(proto.graph.output) == 1:
        odims = proto.graph.output[0].type.tensor_type.shape.dim
        if len(odims) == 2 and odims[1].HasField("dim_value") and odims[1].dim_value > 1:
            task = "classification"
    return LoadedModel(
        name=path.stem,
        source=str(path),
        inputs=tuple(inputs),
        output_names=outputs,
        sha256=digest,
        onnx_path=path,
        task=task,
    )


def with_preprocessing(model: LoadedModel, pre: Preprocessing | None) -> LoadedModel:
    return model if pre is None else replace(model, preprocessing=pre)
