"""Channel importance from the training distribution: the BatchNorm statistics a PyTorch model was trained with.

Activation-based importance (``channels.channel_importance``) sees only what the calibration data contains. On the
built-in photos (textures, grey scientific images) it ranked EfficientNet-Lite0's late channels by what those
pictures use, and pruning by it lost far more on other photographs than it measured. A BatchNorm layer's affine
parameters say what the *training* data did: after BatchNorm a channel has mean ``beta`` and standard deviation
``|gamma|`` over the training distribution (the normalisation makes it so, up to the difference between batch and
running statistics). The ONNX export folds BatchNorm into the convolution before it, so the folded convolution's
output channel ``c`` is, on training data, ``z_c ~ N(beta_c, gamma_c^2)`` (the Gaussian is the assumption;
"Data-free parameter pruning", "Adaptive Data-Free Quantization" and ZeroQ make the same one).

- ``record(module, inputs, onnx_path)`` pairs each convolution of a PyTorch module with the BatchNorm that reads its
  output (forward hooks on one example input: the BatchNorm's input *is* the convolution's output tensor) and writes
  ``{conv name: (beta, |gamma|)}`` beside the exported ONNX file (``stats_path``), with the file's SHA-256: ``load``
  ignores a record written for other bytes. The exporter names each ONNX conv after its module
  (``export.onnx.name_weighted_nodes``), which is how the two are matched.
- ``channel_std(model, group, stats)``: a channel group's consumers read ``act(z)`` through elementwise activations
  (``Relu``, ``Clip``, ...) and channel-preserving pools/flattens; its per-channel standard deviation under the
  Gaussian is computed by Gauss-Hermite quadrature. Importance is then ``sum over consumers ||W[:, c]|| * std_c``,
  the centred activation importance with the training distribution's moments in place of the calibration data's.
  A group whose path does not resolve (no BatchNorm, an op this does not model) returns None, and callers use
  activations for it.

``edgekit build --channel-importance batchnorm`` uses it (``structure.channel_stats``); activations stay the default.
Measured (``benchmarks/channel_importance.py``, ``benchmarks/RESULTS.md`` session 26), same widths and refit, top-1
agreement on other photographs: session 25's 1.3x plan for EfficientNet-Lite0 46.9 % by activations, 62.5 % by this;
session 26's 59.4 % and 52.3 %. Which channels a plan narrows decides which ranking wins.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import onnx

from edgekit.compress.channels import _attr, _Graph, consumer_weight_norms
from edgekit.fsutil import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

QUADRATURE_POINTS = 96  # Gauss-Hermite nodes; clip's kinks make the error about 1e-3 relative (tests: 2 %)
PASS_OPS = frozenset({"GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity",
                      "Dropout"})  # keep channel c as channel c (the path is a channel group's, so shapes agree)


_DIGEST = "__onnx_sha256__"  # the ONNX file's SHA-256 the record was written for


def stats_path(onnx_path: Path) -> Path:
    """Where ``record`` keeps the statistics of the ONNX file at ``onnx_path``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".bnstats.npz")


def conv_batchnorm_pairs(module, example: tuple) -> dict[str, object]:
    """``{conv module name: BatchNorm module}`` for every convolution whose output a BatchNorm reads directly, found by
    running ``module`` once on ``example`` with forward hooks."""
    import torch

    convs = {m: n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.affine and m.running_var is not None]
    if not convs or not bns:
        return {}
    produced: dict[int, tuple[str, object]] = {}  # id(output tensor) -> (conv name, the tensor: keeps the id alive)
    pairs: dict[str, object] = {}

    def on_conv(mod, _args, out):
        produced[id(out)] = (convs[mod], out)

    def on_bn(mod, args, _out):
        hit = produced.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            pairs[hit[0]] = mod

    handles = [m.register_forward_hook(on_conv) for m in convs] + [m.register_forward_hook(on_bn) for m in bns]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*example)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return pairs


def record(module, example: tuple, onnx_path: Path) -> Path | None:
    """Write the BatchNorm statistics of ``module``'s convolutions (found by running it on ``example``) beside its
    ONNX export, with the file's SHA-256 (``load`` uses a record only for those bytes); None (and any stale file
    removed) when the module has no convolution followed by BatchNorm."""
    path = stats_path(onnx_path)
    pairs = conv_batchnorm_pairs(module, example)
    if not pairs:
        path.unlink(missing_ok=True)
        return None
    arrays = {_DIGEST: np.frombuffer(bytes.fromhex(sha256_file(onnx_path)), np.uint8)}
    for name, bn in pairs.items():
        arrays[f"{name}|mean"] = bn.bias.detach().double().numpy().astype(np.float32)
        arrays[f"{name}|std"] = np.abs(bn.weight.detach().double().numpy()).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load(onnx_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """``{conv name: (mean, std)}`` recorded for the ONNX file at ``onnx_path``, or None without a record, with an
    unreadable one, or with one written for other bytes than the file now holds (a warning for the last two)."""
    path = stats_path(onnx_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if _DIGEST not in z or z[_DIGEST].tobytes().hex() != sha256_file(onnx_path):
                log.warning("BatchNorm statistics %s were recorded for another version of %s: not used", path.name,
                            Path(onnx_path).name)
                return None
            names = sorted({k.rsplit("|", 1)[0] for k in z.keys() if k != _DIGEST})
            return {n: (z[f"{n}|mean"].astype(np.float64), z[f"{n}|std"].astype(np.float64)) for n in names}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("BatchNorm statistics %s unreadable (%s): channel importance from activations", path.name, exc)
        return None


def _activation(node: onnx.NodeProto, const):
    """The elementwise function of ``node``, or None for an op this module does not model."""
    op = node.op_type
    if op == "Relu":
        return lambda z: np.maximum(z, 0.0)
    if op == "Clip":
        def bound(i, attr, default):
            if len(node.input) > i and node.input[i]:
                v = const(node.input[i])
                return None if v is None else float(v)
            return float(_attr(node, attr, default))
        lo, hi = bound(1, "min", -np.inf), bound(2, "max", np.inf)
        if lo is None or hi is None:
            return None
        return lambda z: np.clip(z, lo, hi)
    if op == "LeakyRelu":
        alpha = float(_attr(node, "alpha", 0.01))
        return lambda z: np.where(z >= 0, z, alpha * z)
    if op == "Sigmoid":
        return lambda z: 1.0 / (1.0 + np.exp(-z))
    if op == "HardSwish":
        return lambda z: z * np.clip(z / 6.0 + 0.5, 0.0, 1.0)
    if op == "HardSigmoid":
        a, b = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
        return lambda z: np.clip(a * z + b, 0.0, 1.0)
    if op == "Tanh":
        return np.tanh
    return None


def gaussian_moments(mean: np.ndarray, std: np.ndarray, fn=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``fn(z)`` per channel for ``z ~ N(mean, std^2)`` (Gauss-Hermite quadrature;
    ``fn`` None is the identity)."""
    x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_POINTS)
    w = w / w.sum()
    z = np.asarray(mean, np.float64)[:, None] + np.asarray(std, np.float64)[:, None] * x[None, :]
    a = z if fn is None else fn(z)
    m1 = a @ w
    m2 = (a * a) @ w
    return m1, np.sqrt(np.maximum(m2 - m1 * m1, 0.0))


def _compose(fns: list):
    def composed(z):
        for f in fns:
            z = f(z)
        return z
    return composed


class _Index:
    """What the walk back from a consumer needs: nodes by name, each tensor's producer, constant values."""

    def __init__(self, model: onnx.ModelProto):
        graph = _Graph(model, shapes=False)  # its constant lookup: initializers and Constant nodes
        self.nodes = {n.name: n for n in graph.nodes}
        self.producer = {o: n for n in graph.nodes for o in n.output}
        self.const = graph.const


def channel_std(model: onnx.ModelProto | _Index, consumer: str, channels: int,
                stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """Per input channel of layer ``consumer``, the standard deviation of what it reads on the training distribution
    (after a global pool: of the values pooled, a proxy), or None when the path back to a recorded convolution is not
    one this module models."""
    ix = model if isinstance(model, _Index) else _Index(model)
    if consumer not in ix.nodes:
        return None
    fns = []
    t = ix.nodes[consumer].input[0]
    while t in ix.producer:
        node = ix.producer[t]
        if node.op_type == "Conv":
            if node.name not in stats or len(stats[node.name][0]) != channels:
                return None
            mean, std = stats[node.name]
            return gaussian_moments(mean, std, _compose(fns[::-1]) if fns else None)[1]  # nearest the conv first
        if node.op_type in PASS_OPS:
            t = node.input[0]
            continue
        fn = _activation(node, ix.const)
        if fn is None:
            return None
        fns.append(fn)
        t = node.input[0]
    return None


def importance(model: onnx.ModelProto, groups, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """``{group name: score per channel}`` for the channel groups (``channels.ChannelGroup``) every consumer of which
    resolves to recorded statistics: ``sum over consumers ||W[:, c]||_2 * std_c``. Groups that do not resolve are
    left out."""
    ix = _Index(model)
    weights = consumer_weight_norms(model, groups)
    out = {}
    for g in groups:
        score = np.zeros(g.channels)
        for consumer, norms in weights[g.name].items():
            std = channel_std(ix, consumer, g.channels, stats)
            if std is None:
                break
            score += norms * std
        else:
            out[g.name] = score
    return out
