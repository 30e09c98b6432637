"""Test-time adaptation by entropy minimization (TENT / EATA) of the agent's per-channel affine corrections.

The agent's adaptation state is, per norm layer (a Conv with a BatchNorm folded into it), a correction of that
Conv's output tensor ``y' = scale[c] * y + shift[c]`` (``edgekit.agent.normtable``). The forward-only tier estimates
``scale``/``shift`` from statistics; this module is the gradient tier, used where torch is present: it runs the
artifact in torch (``edgekit.agent_torch.onnx_torch.TorchGraph``, QDQ graphs as fake-quant with a straight-through
gradient), takes the gradient of the prediction entropy with respect to ``scale`` and ``shift`` only, and returns
updated values, which the agent then writes into the ONNX Runtime session as before.

- TENT (Wang et al., ICLR 2021): minimize the mean softmax entropy ``E(x) = -sum_k p_k log p_k`` over the batch.
- EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting"): only *reliable* samples,
  ``E(x) < e_margin`` (default ``0.4 ln K``), contribute, each weighted by ``1 / exp(E(x) - e_margin)`` (the more
  confident, the heavier). Optionally (``d_margin``) *redundant* samples are dropped too: those whose softmax has a
  cosine of ``d_margin`` or more with a running mean of the softmax of earlier selected samples (the paper's 0.05;
  the running mean, ``0.9 * m + 0.1 * mean(p)``, is returned in ``info["probs_mean"]`` to pass back on the next
  call). EATA's anti-forgetting regularizer is available as ``anchor``: an L2 pull of the parameters towards the
  source model (scale 1, shift 0), i.e. the Fisher regularizer with a uniform Fisher; off by default.

Each call starts a fresh optimizer (SGD with momentum 0.9, or Adam) from the given values and takes ``steps``
steps on the one batch. Scales are kept within ``SCALE_BOUNDS`` (the bounds the agent applies). Steps whose loss is
not finite are not taken.

This module imports without torch; ``adapt_entropy`` raises ``TorchRequiredError`` (a ``ConfigError`` and an
``ImportError``) when torch is missing. The converted graph is cached per model (sha256 of its bytes), so repeated
calls on the same model do not rebuild it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from edgekit.errors import ConfigError

METHODS = ("tent", "eata")
OPTIMIZERS = ("sgd", "adam")
SCALE_BOUNDS = (0.05, 20.0)  # as edgekit.agent.normtable: beyond them a correction is a collapse, not a shift
EATA_MARGIN_FRACTION = 0.4  # e_margin = 0.4 ln K (the paper's choice)
PROBS_MOMENTUM = 0.9  # running mean of selected softmax outputs (EATA's redundancy filter)
CACHE_SIZE = 2  # converted graphs kept

_cache: OrderedDict[str, object] = OrderedDict()
_cache_lock = threading.Lock()


class TorchRequiredError(ConfigError, ImportError):
    """Gradient-based adaptation needs torch, which this device does not have."""


def _require_torch():
    try:
        import torch
    except ImportError as exc:
        raise TorchRequiredError(
            "entropy-minimization adaptation (TENT/EATA) needs torch, which is not installed here",
            hint="install torch on the device, or use the forward-only (statistics) adaptation") from exc
    return torch


def _model_bytes(model) -> bytes:
    if isinstance(model, bytes | bytearray):
        return bytes(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise ConfigError(f"model must be an onnx.ModelProto or its serialized bytes, not {type(model).__name__}")


def torch_graph(model):
    """The ``TorchGraph`` of ``model`` (ModelProto or bytes), converted once per distinct model and cached."""
    _require_torch()
    from edgekit.agent_torch.onnx_torch import TorchGraph

    data = _model_bytes(model)
    key = hashlib.sha256(data).hexdigest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    graph = TorchGraph(data)
    graph.eval()
    with _cache_lock:
        _cache[key] = graph
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return graph


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _entropy(torch, logits):
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1), logp.exp()


def adapt_entropy(
    model,
    layers: Sequence[Mapping],
    scale: Mapping[str, np.ndarray],
    shift: Mapping[str, np.ndarray],
    batch: np.ndarray | Mapping[str, np.ndarray],
    *,
    method: str = "eata",
    lr: float = 1e-3,
    steps: int = 1,
    e_margin: float | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    optimizer: str = "sgd",
    d_margin: float | None = None,
    probs_mean: np.ndarray | None = None,
    anchor: float = 0.0,
    key: str = "tensor",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Take ``steps`` entropy-minimization steps on ``batch`` for the per-channel affine corrections of ``layers``.

    ``model``: the artifact (``onnx.ModelProto`` or bytes). ``layers``: entries with at least ``"tensor"`` (the
    Conv output tensor) and ``"channels"``. ``scale``/``shift``: current values keyed by ``layer[key]`` (the tensor
    name by default; ``key="name"`` keys them by Conv node name as ``normtable.overrides`` does); a layer missing
    from them starts at the identity (1, 0). ``batch``: the model input (one-input models) or a name -> array feed.
    ``output_name``: the logits (default: the first graph output; classes on the last axis).

    ``method``: ``"tent"`` (every sample) or ``"eata"`` (samples with entropy below ``e_margin``, default
    ``0.4 ln K``, weighted by ``exp(e_margin - E)``; with ``d_margin``, minus samples whose softmax has a cosine of
    ``d_margin`` or more with ``probs_mean``). ``optimizer``: ``"sgd"`` (momentum 0.9) or ``"adam"``. ``anchor``:
    weight of an L2 pull towards scale 1, shift 0.

    Returns ``(scale, shift, info)``: float32 arrays for every layer, keyed like the inputs, and ``info`` with
    ``loss`` (of the last step taken), ``selected`` (samples used in the first step), ``samples``,
    ``entropy_before``/``entropy_after`` (mean over the batch), ``steps`` (taken), ``e_margin`` and ``probs_mean``
    (EATA's running mean, to pass back).
    """
    if method not in METHODS:
        raise ConfigError(f"adaptation method must be one of {', '.join(METHODS)}, not {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    if steps < 0 or not lr > 0:
        raise ConfigError(f"need steps >= 0 and lr > 0 (got steps={steps}, lr={lr})")
    torch = _require_torch()
    graph = torch_graph(model)
    feeds = _feeds(graph, batch, input_name)
    out_name = output_name or graph.output_names[0]
    if out_name not in graph.dynamic_tensors:
        raise ConfigError(f"output {out_name!r} is not computed by the model")

    keys, affine, params = [], {}, []
    for layer in layers:
        tensor, channels = layer["tensor"], int(layer["channels"])
        k = layer[key]
        if tensor not in graph.dynamic_tensors:
            raise ConfigError(f"norm layer tensor {tensor!r} is not computed from the model's inputs")
        s0 = np.asarray(scale.get(k, np.ones(channels)), np.float32).reshape(-1)
        t0 = np.asarray(shift.get(k, np.zeros(channels)), np.float32).reshape(-1)
        if s0.size != channels or t0.size != channels:
            raise ConfigError(f"norm layer {k!r}: {channels} channels, but scale/shift hold {s0.size}/{t0.size}")
        s = torch.nn.Parameter(torch.from_numpy(s0.copy()))
        t = torch.nn.Parameter(torch.from_numpy(t0.copy()))
        keys.append(k)
        affine[tensor] = (s, t)
        params += [s, t]

    def result(info: dict):
        new_scale = {k: affine[la["tensor"]][0].detach().numpy().astype(np.float32).copy()
                     for k, la in zip(keys, layers, strict=True)}
        new_shift = {k: affine[la["tensor"]][1].detach().numpy().astype(np.float32).copy()
                     for k, la in zip(keys, layers, strict=True)}
        return new_scale, new_shift, info

    if params:
        opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd"
               else torch.optim.Adam(params, lr=lr))
    pm = None if probs_mean is None else torch.as_tensor(np.asarray(probs_mean, np.float32))
    info: dict = {"method": method, "loss": 0.0, "selected": 0, "steps": 0, "e_margin": None, "layers": len(keys)}
    with torch.enable_grad():
        for step in range(max(steps, 1)):
            logits = graph.run(feeds, affine=affine, outputs=[out_name])[out_name]
            logits = logits.reshape(-1, logits.shape[-1]).float()
            ent, probs = _entropy(torch, logits)
            if step == 0:
                n_classes = logits.shape[-1]
                margin = float(e_margin) if e_margin is not None else EATA_MARGIN_FRACTION * math.log(n_classes)
                info.update(samples=int(logits.shape[0]), entropy_before=float(ent.detach().mean()),
                            e_margin=margin if method == "eata" else None)
            if steps == 0 or not params:
                break
            if method == "tent":
                mask = torch.ones_like(ent, dtype=torch.bool)
                weight = torch.ones_like(ent)
            else:
                mask = ent.detach() < margin
                if d_margin is not None and pm is not None:
                    cos = torch.nn.functional.cosine_similarity(probs.detach(), pm.reshape(1, -1), dim=1)
                    mask &= cos.abs() < d_margin
                weight = torch.exp(margin - ent.detach())
            selected = int(mask.sum())
            if step == 0:
                info["selected"] = selected
                if method == "eata" and selected:
                    mean_p = probs.detach()[mask].mean(0)
                    pm = mean_p if pm is None else PROBS_MOMENTUM * pm + (1 - PROBS_MOMENTUM) * mean_p
            if selected == 0:
                break
            loss = (ent[mask] * weight[mask]).mean()
            if anchor:
                loss = loss + anchor * sum(((s - 1) ** 2).sum() + (t ** 2).sum() for s, t in affine.values())
            if not torch.isfinite(loss):
                info["skipped"] = "non-finite loss"
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for s, _ in affine.values():
                    s.clamp_(*SCALE_BOUNDS)
            info["loss"] = float(loss.detach())
            info["steps"] = step + 1
        with torch.no_grad():
            logits = graph.run(feeds, affine=affine, outputs=[out_name])[out_name]
            ent, _ = _entropy(torch, logits.reshape(-1, logits.shape[-1]).float())
            info["entropy_after"] = float(ent.mean())
    if not all(np.isfinite(p.detach().numpy()).all() for p in params):
        raise ConfigError("entropy adaptation produced non-finite parameters", hint="lower lr")
    info["probs_mean"] = None if pm is None else pm.numpy().astype(np.float32)
    return result(info)


def _feeds(graph, batch, input_name: str | None) -> dict:
    if isinstance(batch, Mapping):
        missing = [n for n in graph.input_names if n not in batch]
        if missing:
            raise ConfigError(f"the batch lacks model inputs {missing}")
        return {n: np.asarray(batch[n]) for n in graph.input_names}
    if input_name is None:
        if len(graph.input_names) != 1:
            raise ConfigError(f"the model has inputs {graph.input_names}: pass input_name or a name -> array batch")
        input_name = graph.input_names[0]
    if input_name not in graph.input_names:
        raise ConfigError(f"the model has no input {input_name!r} (inputs: {graph.input_names})")
    return {input_name: np.asarray(batch)}
