"""Structured channel pruning on ONNX graphs: remove whole channels, so the result is a real, smaller model.

A *channel group* starts at a weighted producer (Conv with group=1, Gemm, or MatMul with an initializer weight) and
follows its output forward through channel-wise nodes (unary activations, pooling, binary ops with a scalar or
per-channel constant or with both operands in the group, depthwise convs, reductions/flattens that keep the channel
axis) up to the weighted consumers that read those channels. If any path leaves the group any other way (a residual
Add, Concat, a graph output, a head-splitting Reshape, LayerNormalization, Softmax, ...) the producer is not prunable.
Pruning channel ``c`` removes producer row ``c`` (weight and bias), the depthwise filters ``c``, the per-channel
constants ``c`` on the path, and consumer input channel ``c``.

Exactness. ``masked_model`` zeroes the producer's weight rows and bias entries of the dropped channels, so those
channels leave the producer as exact zeros. Every channel-wise op maps a constant channel to a constant channel (a
depthwise conv whose input is 0 gives its bias everywhere, padded borders included), so at each consumer a dropped
input channel is a constant ``v_c``. A consumer ``y = sum_c W[:, c] * x_c + b`` therefore receives exactly
``sum_{c dropped} W[:, c] * v_c`` from them, which ``prune_channels`` folds into its bias (summed over the kernel for
a conv without padding; a padded conv is exact only when all ``v_c`` are 0, otherwise a ValueError). The pruned model
computes the masked model's function up to float rounding; ``v_c`` is measured by running the masked model once.

Importance (CFSP / Wanda style): ``score_c = sum over consumers of ||W_consumer[:, c]||_2 * ||X_c||_2`` with ``X_c``
the consumer's input channel ``c`` over the calibration samples.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

UNARY = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "LeakyRelu", "Elu", "Selu",
                   "Celu", "Gelu", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp", "Sqrt", "Identity",
                   "Dropout", "ThresholdedRelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"})


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # = producer layer name
    producer: str  # weighted node whose output channels are pruned
    passthrough: tuple[str, ...]  # depthwise convs carrying the channels one-to-one
    consumers: tuple[str, ...]  # weighted nodes whose input channels are pruned
    channels: int
    layers: tuple[str, ...]  # producer + passthrough + consumers


@dataclass
class _Plan:
    group: ChannelGroup
    producer: int  # node index
    out_axis: int  # producer weight axis holding output channels
    bias: tuple[int, int, int] | None  # (node, input, axis) of the producer's bias vector
    passthrough: list[int] = field(default_factory=list)
    consumers: list[int] = field(default_factory=list)
    constants: list[tuple[int, int, int]] = field(default_factory=list)  # (node, input, axis) per-channel operands
    reshapes: list[int] = field(default_factory=list)  # Reshape nodes whose target ends with the channel count
    tensors: set[str] = field(default_factory=set)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto, shapes: bool = True):
        g = model.graph
        self.model, self.nodes = model, list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.outputs = {o.name for o in g.output}
        self.users: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for ni, n in enumerate(self.nodes):
            for ii, name in enumerate(n.input):
                if name:
                    self.users[name].append((ni, ii))
        self.by_name = {n.name: ni for ni, n in enumerate(self.nodes) if self.is_weighted(n)}
        self.shapes: dict[str, list[int | None]] = {}
        if shapes:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
                if vi.type.tensor_type.HasField("shape"):
                    self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                            for d in vi.type.tensor_type.shape.dim]

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return np.shape(self.const(name)) if name in self.const_nodes else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for a computed tensor."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is None or len(node.attribute) != 1:
            return None
        value = helper.get_attribute_value(node.attribute[0])
        return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)

    def is_weighted(self, n: onnx.NodeProto) -> bool:
        return n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in self.inits \
            and (n.op_type != "MatMul" or len(self.inits[n.input[1]].dims) == 2)


def _channel_operand(shape: tuple[int, ...], axis: int, channels: int) -> tuple[bool, int | None]:
    """Whether a constant of ``shape`` broadcasts only along channel ``axis`` (negative); its own channel axis."""
    own = None
    for i, d in enumerate(shape):
        if i - len(shape) == axis and d == channels:
            own = i
        elif d != 1:
            return False, None
    return True, own


def _walk(g: _Graph, start: int, channels: int, axis: int) -> _Plan | None:
    """Follow the producer's output channels to their consumers; None if they escape the group anywhere."""
    plan = _Plan(group=None, producer=start, out_axis=0, bias=None)  # type: ignore[arg-type]
    seen = {g.nodes[start].output[0]: axis}
    queue, joins = [g.nodes[start].output[0]], []
    while queue:
        t = queue.pop()
        a = seen[t]
        if t in g.outputs:
            return None
        for ni, ii in g.users[t]:
            n, op, nxt = g.nodes[ni], g.nodes[ni].op_type, None
            if any(o in g.users or o in g.outputs for o in n.output[1:]):
                return None
            if g.is_weighted(n):
                wd = g.inits[n.input[1]].dims
                if ii != 0:
                    return None
                if op == "Conv":
                    group = _attr(n, "group", 1)
                    if a != 1 - len(wd):
                        return None
                    if group == 1 and wd[1] == channels:
                        plan.consumers.append(ni)
                    elif group == channels and wd[0] == channels and wd[1] == 1:
                        plan.passthrough.append(ni)
                        nxt = (n.output[0], a)
                    else:
                        return None
                elif op == "MatMul" and a == -1 and wd[0] == channels:
                    plan.consumers.append(ni)
                elif op == "Gemm" and a == -1 and not _attr(n, "transA", 0) \
                        and wd[1 if _attr(n, "transB", 0) else 0] == channels:
                    plan.consumers.append(ni)
                else:
                    return None
            elif op in UNARY or op in POOLS:
                rank = len(g.shapes.get(t) or ())
                if ii != 0 or (op in POOLS and (rank == 0 or a != 1 - rank)):
                    return None
                nxt = (n.output[0], a)
            elif op in BINARY:
                other = n.input[1 - ii]
                shape = g.const_shape(other)
                if shape is None:
                    joins.append((other, a))
                else:
                    ok, own = _channel_operand(shape, a, channels)
                    if not ok:
                        return None
                    if own is not None:
                        plan.constants.append((ni, 1 - ii, own))
                nxt = (n.output[0], a)
            elif op in REDUCE:
                axes = g.const(n.input[1]) if len(n.input) > 1 and n.input[1] else _attr(n, "axes")
                rank = len(g.shapes.get(t) or ())
                if ii != 0 or axes is None or len(axes) == 0 or rank == 0:
                    return None
                axes = [int(x) - rank if x >= 0 else int(x) for x in axes]
                if a in axes:
                    return None
                nxt = (n.output[0], a if _attr(n, "keepdims", 1) else a + sum(x > a for x in axes))
            elif op in ("Flatten", "Reshape"):
                dims = g.shapes.get(t)
                if ii != 0 or not dims:
                    return None
                pos = len(dims) + a
                k = _attr(n, "axis", 1) if op == "Flatten" else pos + 1
                k = k + len(dims) if k < 0 else k
                if k > pos + (op == "Reshape") or any(dims[i] != 1 for i in range(k, len(dims)) if i != pos):
                    return None  # the channel must end up alone on the last axis
                if op == "Reshape":
                    target, out = g.const(n.input[1]), g.shapes.get(n.output[0])
                    if target is not None and len(target) and target[-1] == channels:
                        plan.reshapes.append(ni)
                    elif not (target is not None and len(target) and target[-1] == -1 and out
                              and out[-1] == channels):
                        return None
                nxt = (n.output[0], -1)
            else:
                return None
            if nxt is not None:
                if nxt[0] in seen and seen[nxt[0]] != nxt[1]:
                    return None
                if nxt[0] not in seen:
                    seen[nxt[0]] = nxt[1]
                    queue.append(nxt[0])
    if not plan.consumers or any(seen.get(other) != a for other, a in joins):
        return None
    plan.tensors = set(seen)
    return plan


def _discover(g: _Graph) -> list[_Plan]:
    plans = []
    for ni, n in enumerate(g.nodes):
        if not g.is_weighted(n):
            continue
        wd, has_bias = g.inits[n.input[1]].dims, len(n.input) > 2 and bool(n.input[2])
        if n.op_type == "Conv":
            if _attr(n, "group", 1) != 1:
                continue
            channels, axis, out_axis = wd[0], 1 - len(wd), 0
        elif n.op_type == "Gemm":
            out_axis = 0 if _attr(n, "transB", 0) else 1
            channels, axis = wd[out_axis], -1
        else:
            channels, axis, out_axis = wd[1], -1, 1
        plan = _walk(g, ni, channels, axis)
        if plan is None:
            continue
        plan.out_axis = out_axis
        if has_bias:  # Conv/Gemm bias input: a per-channel vector, or a broadcast scalar (then left alone)
            ok, own = _channel_operand(g.const_shape(n.input[2]) or (), -1, channels)
            if not ok:
                continue
            if own is not None:
                plan.bias = (ni, 2, own)
                plan.constants.append(plan.bias)
        elif n.op_type == "MatMul":  # the bias Add right after the MatMul, found by the walk
            first = g.users[n.output[0]]
            plan.bias = next((c for c in plan.constants if len(first) == 1 and c[0] == first[0][0]
                              and g.nodes[c[0]].op_type == "Add"), None)
        names = lambda idx: tuple(g.nodes[i].name for i in idx)  # noqa: E731
        plan.group = ChannelGroup(name=n.name, producer=n.name, passthrough=names(plan.passthrough),
                                  consumers=names(plan.consumers), channels=int(channels),
                                  layers=(n.name, *names(plan.passthrough), *names(plan.consumers)))
        plans.append(plan)
    return plans


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, in graph order of their producers."""
    return [p.group for p in _discover(_Graph(model))]


def round_channels(keep: int, channels: int, multiple: int) -> int:
    """``keep`` rounded up to a multiple of ``multiple``, at least ``multiple`` (or ``channels`` if fewer), at most
    ``channels``."""
    if multiple < 1 or channels < 1:
        raise ValueError(f"multiple and channels must be at least 1, got multiple={multiple}, channels={channels}")
    return int(min(channels, max(multiple, math.ceil(max(int(keep), 1) / multiple) * multiple)))


def _session(model: onnx.ModelProto, extra: list[str]):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(extra) if t not in have)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _batches(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]):
    """Each feed as is, or one sample at a time when the model's batch dimension is fixed and the feed's differs."""
    fixed = {i.name: i.type.tensor_type.shape.dim[0].dim_value for i in _model_inputs(model)
             if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")}
    for feed in feeds:
        sizes = {np.shape(feed[k])[0] for k in fixed if k in feed and np.ndim(feed[k])}
        b = min((fixed[k] for k in fixed if k in feed), default=0)
        n = sizes.pop() if len(sizes) == 1 else 0
        if b and n > b and n % b == 0:
            for s in range(0, n, b):
                yield {k: (v[s:s + b] if np.ndim(v) and np.shape(v)[0] == n else v) for k, v in feed.items()}
        else:
            yield feed


def _consumer_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type == "Conv" else -1


def _weight_in_axis(node: onnx.NodeProto) -> int:
    """The consumer weight axis that indexes its input channels."""
    if node.op_type == "Conv":
        return 1
    return 1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0


def channel_importance(model: onnx.ModelProto, groups: list[ChannelGroup],
                       feeds: list[dict[str, np.ndarray]], *, centered: bool = False) -> dict[str, np.ndarray]:
    """Per group, one score per channel: sum over consumers of ``||W[:, c]||_2 * ||X_c||_2`` on ``feeds``.

    ``centered``: ``X_c`` minus its mean, for pruning followed by a refit (``compress.refit``) whose bias takes over
    each dropped channel's mean, so only its variation is lost."""
    if not feeds:
        raise ValueError("channel_importance needs at least one calibration feed")
    g = _Graph(model, shapes=False)
    for gr in groups:
        if any(c not in g.by_name for c in gr.consumers):
            raise ValueError(f"group {gr.name!r} does not match this model (unknown consumer)")
    inputs = list(dict.fromkeys(g.nodes[g.by_name[c]].input[0] for gr in groups for c in gr.consumers))
    axis = {g.nodes[g.by_name[c]].input[0]: _consumer_axis(g.nodes[g.by_name[c]]) for gr in groups
            for c in gr.consumers}
    sess = _session(model, inputs)
    sq: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for feed in _batches(model, feeds):
        for name, x in zip(inputs, sess.run(inputs, feed)):
            x = np.moveaxis(np.asarray(x, dtype=np.float64), axis[name], -1).reshape(-1, x.shape[axis[name]])
            sq[name] = sq.get(name, 0) + np.square(x).sum(0)
            sums[name] = sums.get(name, 0) + x.sum(0)
            count[name] = count.get(name, 0) + len(x)
    if centered:
        sq = {n: np.maximum(v - sums[n] ** 2 / count[n], 0.0) for n, v in sq.items()}
    scores = {}
    for gr in groups:
        score = np.zeros(gr.channels)
        for c, norms in _weight_norms(g, gr).items():
            score += norms * np.sqrt(sq[g.nodes[g.by_name[c]].input[0]])
        scores[gr.name] = score
    return scores


def _weight_norms(g: _Graph, gr: ChannelGroup) -> dict[str, np.ndarray]:
    out = {}
    for c in gr.consumers:
        node = g.nodes[g.by_name[c]]
        w = np.moveaxis(g.const(node.input[1]).astype(np.float64), _weight_in_axis(node), 0)
        out[c] = np.linalg.norm(w.reshape(gr.channels, -1), axis=1)
    return out


def consumer_weight_norms(model: onnx.ModelProto, groups: list[ChannelGroup]) -> dict[str, dict[str, np.ndarray]]:
    """Per group, per consumer, the L2 norm of the consumer's weights reading each of the group's channels."""
    g = _Graph(model, shapes=False)
    return {gr.name: _weight_norms(g, gr) for gr in groups}


class _Editor:
    """Collects new values for node inputs of a copy of a model, then writes them back as initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.g = _Graph(self.model, shapes=False)
        self.values: dict[tuple[int, int], np.ndarray] = {}
        self.taken = {i.name for i in self.model.graph.initializer} | {o for n in self.g.nodes for o in n.output}

    def get(self, ni: int, ii: int) -> np.ndarray:
        if (ni, ii) not in self.values:
            self.values[ni, ii] = self.g.const(self.g.nodes[ni].input[ii]).copy()
        return self.values[ni, ii]

    def take(self, ni: int, ii: int, idx: np.ndarray, axis: int) -> None:
        self.values[ni, ii] = np.take(self.get(ni, ii), idx, axis)

    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.taken:
            k, name = k + 1, f"{hint}_{k + 1}"
        self.taken.add(name)
        return name

    def commit(self, stale: set[str] = frozenset()) -> onnx.ModelProto:
        graph = self.model.graph
        for (ni, ii), value in self.values.items():
            node, name = self.g.nodes[ni], self.g.nodes[ni].input[ii]
            if name in self.g.inits and len(self.g.users[name]) == 1:
                self.g.inits[name].CopyFrom(numpy_helper.from_array(value, name))
                continue
            if name in self.g.inits or name in self.g.const_nodes:  # shared or a Constant: a private copy
                node.input[ii] = self.fresh(f"{name}_pruned")
            graph.initializer.append(numpy_helper.from_array(value, node.input[ii]))
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inits = {i.name: i for i in keep}
        vis = [v for v in graph.value_info if v.name not in stale and v.name not in inits]
        del graph.value_info[:]
        graph.value_info.extend(vis)
        for vi in graph.input:  # initializers listed as inputs (old IR versions) take their new shapes
            if vi.name in inits:
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, inits[vi.name].data_type, inits[vi.name].dims))
        old = [vi for vi in graph.input if vi.name not in inits and vi.name not in used and vi.name in self.g.inits]
        for vi in old:
            graph.input.remove(vi)
        return self.model


def _check(plans: dict[str, _Plan], chosen: dict[str, np.ndarray], what: str, allow_empty: bool) -> dict:
    out = {}
    for name, idx in chosen.items():
        if name not in plans:
            known = ", ".join(sorted(plans)[:12]) + (", ..." if len(plans) > 12 else "")
            raise ValueError(f"unknown channel group {name!r}; prunable groups: {known or 'none'}")
        arr, channels = np.asarray(idx), plans[name].group.channels
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{what} for group {name!r} must be a 1-D array of integer channel indices")
        if not arr.size and not allow_empty:
            raise ValueError(f"{what} for group {name!r} is empty: at least one channel must be kept")
        if arr.size and (arr.min() < 0 or arr.max() >= channels):
            raise ValueError(f"{what} for group {name!r} has indices outside [0, {channels})")
        if len(np.unique(arr)) != arr.size:
            raise ValueError(f"{what} for group {name!r} has repeated indices")
        out[name] = np.sort(arr).astype(np.int64)
    return out


def _mask(model: onnx.ModelProto, plans: dict[str, _Plan], drop: dict[str, np.ndarray]) -> onnx.ModelProto:
    ed = _Editor(model)
    for name, idx in drop.items():
        plan = plans[name]
        w = ed.get(plan.producer, 1)
        w[(slice(None),) * plan.out_axis + (idx,)] = 0
        if plan.bias is not None:
            b = ed.get(plan.bias[0], plan.bias[1])
            b[(slice(None),) * plan.bias[2] + (idx,)] = 0
    return ed.commit()


def masked_model(model: onnx.ModelProto, drop: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the producer weight rows and bias entries of the ``drop`` channels set to 0."""
    plans = {p.group.name: p for p in _discover(_Graph(model))}
    return _mask(model, plans, _check(plans, drop, "drop", allow_empty=True))


def _zero_feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    feed = {}
    for i in _model_inputs(model):
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        feed[i.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feed


def _fold(ed: _Editor, ni: int, drop: np.ndarray, v: np.ndarray, group: str, inserts: list) -> None:
    """Add the constant dropped inputs ``v`` (one per dropped channel) of consumer ``ni`` to its bias."""
    node = ed.g.nodes[ni]
    w = ed.get(ni, 1).astype(np.float64)
    if node.op_type == "Conv":
        pads = _attr(node, "pads", []) or []
        if any(pads) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            raise ValueError(f"group {group!r}: dropped channels reach padded conv {node.name!r} as nonzero constants "
                             f"(max {np.abs(v).max():.3g}); their removal would not be exact at the borders")
        delta = w[:, drop].reshape(w.shape[0], drop.size, -1).sum(-1) @ v
    else:
        w_in = w.T if node.op_type == "Gemm" and _attr(node, "transB", 0) else w
        delta = v @ w_in[drop]
    has_bias = node.op_type != "MatMul" and len(node.input) > 2 and bool(node.input[2])
    old = ed.get(ni, 2) if has_bias else 0
    if node.op_type == "Gemm":  # Y = alpha A B + beta C
        alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
        delta, old = alpha * delta / (beta or 1.0), old if beta else 0
        for a in node.attribute:  # beta = 0: the old C never counted, the new one does
            a.f = 1.0 if a.name == "beta" and not beta else a.f
    if node.op_type in ("Gemm", "Conv"):
        if not has_bias:  # a new bias input, written by the editor (and sliced there if this layer is a producer)
            node.input.extend([""] * (3 - len(node.input)))
            node.input[2] = ed.fresh(f"{node.name}.folded_bias")
        ed.values[ni, 2] = (old + delta).astype(np.float32)
    else:  # MatMul: the bias Add right after it, or a new one
        users = ed.g.users[node.output[0]]
        if len(users) == 1 and ed.g.nodes[users[0][0]].op_type == "Add":
            ai, ii = users[0]
            shape = ed.g.const_shape(ed.g.nodes[ai].input[1 - ii])
            if shape is not None and _channel_operand(shape, -1, len(delta)) == (True, len(shape) - 1):
                ed.values[ai, 1 - ii] = (ed.get(ai, 1 - ii) + delta).astype(np.float32)
                return
        inserts.append((ni, delta.astype(np.float32)))


def prune_channels(model: onnx.ModelProto, keep: dict[str, np.ndarray],
                   feeds: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """A new, smaller model keeping channels ``keep[group]`` (sorted indices) of each named group; the removed
    channels' constant contribution is folded into the consumers' biases (exactly ``masked_model``'s function)."""
    plans = {p.group.name: p for p in _discover(_Graph(model))}
    keep = _check(plans, keep, "keep", allow_empty=False)
    drop = {n: np.setdiff1d(np.arange(plans[n].group.channels), k) for n, k in keep.items()}
    drop = {n: d for n, d in drop.items() if d.size}
    if not drop:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    ed = _Editor(model)
    cons = {ni: (name, ed.g.nodes[ni]) for name in drop for ni in plans[name].consumers}
    names = list(dict.fromkeys(node.input[0] for _, node in cons.values()))
    feed = next(iter(_batches(model, feeds[:1]))) if feeds else _zero_feed(model)
    acts = dict(zip(names, _session(_mask(model, plans, drop), names).run(names, feed)))
    inserts: list[tuple[int, np.ndarray]] = []
    for ni, (name, node) in cons.items():  # fold every constant before any slicing
        x = np.moveaxis(np.asarray(acts[node.input[0]], np.float64), _consumer_axis(node), -1)
        xd = x[..., drop[name]].reshape(-1, drop[name].size)
        scale = max(1.0, float(np.abs(x).max(initial=0.0)))
        if np.any(xd.max(0) - xd.min(0) > 1e-5 * scale):
            raise ValueError(f"group {name!r}: dropped channels are not constant at consumer {node.name!r}; "
                             "the group cannot be pruned exactly")
        v = xd.mean(0)
        if np.abs(v).max() > 1e-7 * scale:
            _fold(ed, ni, drop[name], v, name, inserts)
    for name, idx in keep.items():
        plan = plans[name]
        ed.take(plan.producer, 1, idx, plan.out_axis)
        for ni, ii, axis in plan.constants:
            ed.take(ni, ii, idx, axis)
        for ni in plan.passthrough:
            ed.take(ni, 1, idx, 0)
            if len(ed.g.nodes[ni].input) > 2 and ed.g.nodes[ni].input[2]:
                ed.take(ni, 2, idx, 0)
            next(a for a in ed.g.nodes[ni].attribute if a.name == "group").i = idx.size
        for ni in plan.consumers:
            ed.take(ni, 1, idx, _weight_in_axis(ed.g.nodes[ni]))
        if plan.bias is None and (plan.producer, 2) in ed.values:  # a bias created by a fold
            ed.take(plan.producer, 2, idx, -1)
        for ni in plan.reshapes:
            target = ed.get(ni, 1)
            target[-1] = idx.size
    producer_keep = {plans[n].producer: k for n, k in keep.items()}
    stale = set().union(*(plans[n].tensors for n in keep))
    model_out = ed.commit(stale)
    nodes = list(model_out.graph.node)
    for ni, bias in sorted(inserts, reverse=True):  # MatMul consumers without a bias Add get one
        node = nodes[ni]
        bias = bias[producer_keep[ni]] if ni in producer_keep else bias
        out, node.output[0] = node.output[0], ed.fresh(f"{node.output[0]}_nobias")
        bname = ed.fresh(f"{node.name}.folded_bias")
        model_out.graph.initializer.append(numpy_helper.from_array(bias, bname))
        add = helper.make_node("Add", [node.output[0], bname], [out], name=ed.fresh(f"{node.name}_bias"))
        nodes.insert(ni + 1, add)
    del model_out.graph.node[:]
    model_out.graph.node.extend(nodes)
    return model_out


def prune_by_ratio(model: onnx.ModelProto, groups: list[ChannelGroup], importance: dict[str, np.ndarray],
                   ratios: dict[str, float], multiple: int = 1,
                   feeds: list[dict[str, np.ndarray]] | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Keep the ``round_channels(ceil(ratio * C), C, multiple)`` most important channels of each group in
    ``ratios``; returns the pruned model and the kept count per group."""
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, ratio in ratios.items():
        if name not in by_name or name not in importance:
            raise ValueError(f"unknown channel group {name!r} (no group or no importance scores)")
        if not 0 < ratio <= 1:
            raise ValueError(f"keep ratio for group {name!r} must be in (0, 1], got {ratio}")
        channels = by_name[name].channels
        count = round_channels(math.ceil(ratio * channels), channels, multiple)
        keep[name] = np.sort(np.argsort(-np.asarray(importance[name]), kind="stable")[:count])
    return prune_channels(model, keep, feeds), {n: len(k) for n, k in keep.items()}
