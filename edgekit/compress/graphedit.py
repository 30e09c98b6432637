"""Structural edits of an FP32 ONNX graph (issue 6): removing residual units, low-rank factorization, EoRA paths.

A *layer* is a weighted node, named by its ONNX node name: a ``Conv``, a ``Gemm``, or a ``MatMul`` whose second input
is an initializer. Every edit returns a new model (the input is copied, never mutated) that passes
``onnx.checker.check_model`` and runs in ONNX Runtime.

**Removing units** (FinerCut-style). A removable unit is a residual ``Add(branch, skip)`` whose branch is computed
from the skip alone, plus initializers/constants and weight-free side inputs that do not depend on the skip (the
attention-mask subgraph of a transformer, shape constants). ``removable_units`` lists them in graph order; a unit is
named after the common dotted prefix of its layers (``"_blocks.3"``) for conv nets, ``"<first layer>:attention"`` /
``"<first layer>:ffn"`` for transformer sublayers, else after its ``Add`` node. ``remove_units`` replaces each use
of the ``Add``'s output with the skip tensor and eliminates dead code: the branch's nodes and initializers go, while
nodes still used elsewhere (a mask shared by later layers) and the graph's inputs and outputs stay.

**Low rank.** A layer computes ``y = W_eff x`` with ``W_eff`` ``[N, K]`` (outputs x inputs), the convention of
``edgekit.compress.lowrank``: ``W.T`` for a ``MatMul`` weight ``W`` ``[K, N]``; ``alpha * W`` (``transB=1``) or
``alpha * W.T`` (``transB=0``) for a ``Gemm``; ``W[:, :, 0, 0]`` for a 1x1 ``Conv``. Factors are ``a`` ``[r, K]``
and ``b`` ``[N, r]`` with ``W_eff ~ b @ a`` -- lowrank's ``(U, V)`` is ``(b, a)``.

- ``factorize`` replaces the layer by ``{layer}.lr1`` (``x -> a x``) then ``{layer}.lr2`` (``-> b (a x)`` plus the
  original bias): ``MatMul(x, a.T)`` then ``MatMul(., b.T)`` (a bias ``Add`` after it stays); ``Gemm`` then ``Gemm``
  with the original ``C``/``beta`` and the original ``transA``/``transB`` layout; 1x1 ``Conv`` with the original
  strides/pads then 1x1 ``Conv`` with the bias. Their weights are initializers ``{layer}.lr1.weight`` /
  ``{layer}.lr2.weight``, so that quantizers see two ordinary layers.
- ``add_compensation`` adds the parallel path ``{layer}.comp1`` / ``{layer}.comp2`` on the layer's input and an
  ``Add`` (``{layer}.comp_add``) on its output: the layer then computes ``(W_eff + b @ a) x`` -- EoRA's repair of a
  weight that is later replaced by a quantized one.
- ``lowrank_factors`` reads a layer's weight and returns ``(a, b)`` from lowrank's ``svd_factors``, or its
  ``activation_aware_factors`` when rows of the layer's input activations are given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.compress.lowrank import activation_aware_factors, svd_factors

_LINEAR = ("Conv", "Gemm", "MatMul")


# ----------------------------------------------------------------------------------------------------- graph helpers

def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _node_id(node: onnx.NodeProto) -> str:
    """A node's name, or its first output where the exporter left the name empty."""
    return node.name or node.output[0]


def _used_names(node: onnx.NodeProto) -> set[str]:
    """Tensors a node reads, including outer-scope names read by its subgraphs (If/Loop/Scan bodies)."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names |= _used_names(sub)
    return names


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _is_layer(node: onnx.NodeProto, inits: set[str]) -> bool:
    return node.op_type in _LINEAR and len(node.input) > 1 and node.input[1] in inits


def _live(graph: onnx.GraphProto, inputs_of: dict[int, list[str]] | None = None) -> list[bool]:
    """Which nodes the graph outputs need; ``inputs_of`` overrides some nodes' inputs (a removal being simulated)."""
    needed = {o.name for o in graph.output}
    live = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output if o):
            live[i] = True
            needed |= set(inputs_of[i]) if inputs_of and i in inputs_of else _used_names(node)
    return live


def eliminate_dead_code(graph: onnx.GraphProto) -> None:
    """Drop nodes no graph output needs, then initializers and value_info nothing reads any more (inputs stay)."""
    live = _live(graph)
    nodes = [n for n, keep in zip(graph.node, live) if keep]
    del graph.node[:]
    graph.node.extend(nodes)
    read = set().union(*(_used_names(n) for n in nodes)) | {o.name for o in graph.output}
    _keep_initializers(graph, read)
    produced = {o for n in nodes for o in n.output} | {i.name for i in graph.input}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _keep_initializers(graph: onnx.GraphProto, read: set[str], among: set[str] | None = None) -> None:
    """Drop the initializers (of ``among``, default all) that are not in ``read``."""
    dropped = {i.name for i in graph.initializer if i.name not in read and (among is None or i.name in among)}
    if not dropped:
        return
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in dropped]  # old-IR models list initializers as inputs too
    del graph.input[:]
    graph.input.extend(inputs)


# ---------------------------------------------------------------------------------------------------- part 1: units

@dataclass(frozen=True)
class RemovableUnit:
    """A residual branch that can be cut: ``add``'s output becomes ``skip`` and ``layers`` disappear with it."""

    name: str
    kind: str  # "residual_block" | "attention" | "ffn"
    add: str
    skip: str
    layers: tuple[str, ...]


def _common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


def removable_units(model: onnx.ModelProto) -> list[RemovableUnit]:
    """The residual units of ``model`` in graph order (see the module docstring for what qualifies)."""
    graph = model.graph
    nodes = list(graph.node)
    consts = _constant_names(graph)
    inits = {i.name for i in graph.initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    # A tensor is weight-free when no layer is among its ancestors (graph inputs, constants, the mask subgraph).
    weighted = {i.name: False for i in graph.input} | dict.fromkeys(consts, False)
    for n in nodes:
        w = _is_layer(n, inits) or any(weighted.get(t, True) for t in _used_names(n))
        weighted.update(dict.fromkeys(n.output, w))
    live_before = _live(graph)
    found: list[RemovableUnit] = []
    for idx, node in enumerate(nodes):
        if node.op_type != "Add" or len(node.input) != 2 or any(t in consts for t in node.input):
            continue
        for branch, skip in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            unit = _unit_at(graph, idx, branch, skip, producer, weighted, inits, live_before)
            if unit is not None:
                found.append(unit)
                break
    names = [u.name for u in found]  # two units with one name (same prefix): both fall back to their Add's name
    return [u if names.count(u.name) == 1 else RemovableUnit(u.add, u.kind, u.add, u.skip, u.layers) for u in found]


def _unit_at(graph: onnx.GraphProto, idx: int, branch: str, skip: str, producer: dict[str, int],
             weighted: dict[str, bool], inits: set[str], live_before: list[bool]) -> RemovableUnit | None:
    """The unit formed by ``Add`` node ``idx`` with this choice of operands, or None."""
    if branch == skip or branch not in producer:
        return None
    # The branch's nodes: ancestors of `branch` that depend on `skip` (its ancestors cannot: the graph is a DAG).
    ancestors, stack = set(), [producer[branch]]
    while stack:
        i = stack.pop()
        if i in ancestors:
            continue
        ancestors.add(i)
        stack += [producer[t] for t in _used_names(graph.node[i]) if t != skip and t in producer]
    body: set[int] = set()
    for i in sorted(ancestors):  # node order is topological
        if any(t == skip or (t in producer and producer[t] in body) for t in _used_names(graph.node[i])):
            body.add(i)
    if producer[branch] not in body:
        return None
    made = {o for i in body for o in graph.node[i].output}
    side = {t for i in body for t in _used_names(graph.node[i])} - made - {skip}
    if any(weighted.get(t, True) for t in side):  # an input computed by layers outside the branch: not a unit
        return None
    live_after = _live(graph, {idx: [skip]})
    dead = [i for i, (before, after) in enumerate(zip(live_before, live_after)) if before and not after]
    layers = tuple(_node_id(graph.node[i]) for i in dead if _is_layer(graph.node[i], inits))
    if not layers:
        return None
    ops = {graph.node[i].op_type for i in body}
    n_linear = sum(graph.node[i].op_type in ("MatMul", "Gemm") for i in dead if _is_layer(graph.node[i], inits))
    kind = "attention" if "Softmax" in ops else "ffn" if n_linear >= 2 else "residual_block"
    add = _node_id(graph.node[idx])
    name = f"{layers[0]}:{kind}" if kind != "residual_block" else (_common_prefix(layers) or add)
    return RemovableUnit(name, kind, add, skip, layers)


def remove_units(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the named units (names from ``removable_units(model)``), dead code eliminated.

    Raises ValueError for a name that is not a unit of this model (one removed earlier no longer is) or is listed
    twice."""
    names = list(names)
    units = {u.name: u for u in removable_units(model)}
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"unit(s) listed more than once: {twice}")
    unknown = [n for n in names if n not in units]
    if unknown:
        raise ValueError(f"unknown unit(s) {unknown} (a unit removed earlier is no longer in the graph); "
                         f"this model's units: {list(units)}")
    out = _copy(model)
    graph = out.graph
    by_id = {_node_id(n): n for n in graph.node}
    outputs = {o.name for o in graph.output}
    subst: dict[str, str] = {}
    for name in names:
        add, skip = by_id[units[name].add], units[name].skip
        if add.output[0] in outputs:  # the graph's interface keeps its name: Identity(skip)
            add.op_type = "Identity"
            del add.input[:]
            add.input.append(skip)
        else:
            subst[add.output[0]] = skip
    for node in graph.node:  # consumers read the skip directly (chains of removed units resolve transitively)
        for j, t in enumerate(node.input):
            while t in subst:
                t = subst[t]
            node.input[j] = t
    nested = set().union(*(_used_names(n) - set(n.input) for n in graph.node)) & subst.keys()
    if nested:
        raise ValueError(f"tensors {sorted(nested)} are read inside subgraphs; removing their units is unsupported")
    eliminate_dead_code(graph)
    onnx.checker.check_model(out)
    return out


# ------------------------------------------------------------------------------------------------ part 2: low rank

@dataclass
class _Layer:
    index: int
    node: onnx.NodeProto
    weight: np.ndarray  # as stored
    w_eff: np.ndarray  # [N, K]


def _layer(model: onnx.ModelProto, layer: str) -> _Layer:
    graph = model.graph
    matches = [i for i, n in enumerate(graph.node) if n.name == layer]
    if not matches:
        raise ValueError(f"no node named {layer!r} in the graph")
    node = graph.node[matches[0]]
    inits = {i.name: i for i in graph.initializer}
    if node.op_type not in _LINEAR or len(node.input) < 2 or node.input[1] not in inits:
        raise ValueError(f"{layer!r} is a {node.op_type} without an initializer weight; low rank supports Conv, "
                         "Gemm and MatMul layers whose weight is an initializer")
    w = numpy_helper.to_array(inits[node.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        if w.ndim != 2:
            raise ValueError(f"{layer!r}: a MatMul weight of shape {w.shape}; only 2-D weights are supported")
        w_eff = w.T
    elif node.op_type == "Gemm":
        w_eff = float(attrs.get("alpha", 1.0)) * (w if attrs.get("transB", 0) else w.T)
    else:
        if attrs.get("group", 1) != 1:
            raise ValueError(f"{layer!r} is a grouped Conv (group={attrs['group']}); only group=1 can be factorized")
        if any(s != 1 for s in w.shape[2:]):
            raise ValueError(f"{layer!r} is a {'x'.join(map(str, w.shape[2:]))} Conv; only 1x1 convs are supported")
        w_eff = w.reshape(w.shape[0], w.shape[1])
    return _Layer(matches[0], node, w, np.asarray(w_eff, np.float32))


def layer_weight(model: onnx.ModelProto, layer: str) -> np.ndarray:
    """The layer's linear map ``W_eff`` ``[N, K]`` (float32), in lowrank's convention."""
    return _layer(model, layer).w_eff


def _path(model: onnx.ModelProto, lay: _Layer, a: np.ndarray, b: np.ndarray, names: tuple[str, str],
          x: str, y: str, bias: list[str]) -> list[onnx.NodeProto]:
    """Nodes ``names[0]``: x -> a x and ``names[1]``: -> b (a x) (+ the bias inputs), in ``lay``'s op and layout;
    adds their weights to the model."""
    n, k = lay.w_eff.shape
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
        raise ValueError(f"{lay.node.name!r} maps {k} inputs to {n} outputs: factors must be a [r, {k}] and "
                         f"b [{n}, r] (W ~ b @ a; lowrank's (U, V) is (b, a)), got a {a.shape} and b {b.shape}")
    node, dtype = lay.node, lay.weight.dtype
    attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    mid = f"{names[0]}.out"
    taken = {t for nd in model.graph.node for t in (*nd.input, *nd.output, nd.name)} | {
        i.name for i in model.graph.initializer}
    clash = sorted(taken & {*names, mid, f"{names[0]}.weight", f"{names[1]}.weight"})
    if clash:
        raise ValueError(f"names {clash} are already used in the graph")
    if node.op_type == "MatMul":
        w1, w2 = a.T, b.T
        first = helper.make_node("MatMul", [x, f"{names[0]}.weight"], [mid], name=names[0])
        second = helper.make_node("MatMul", [mid, f"{names[1]}.weight"], [y], name=names[1])
    elif node.op_type == "Gemm":
        t = attrs.get("transB", 0)
        w1, w2 = (a, b) if t else (a.T, b.T)
        first = helper.make_node("Gemm", [x, f"{names[0]}.weight"], [mid], name=names[0],
                                 transA=attrs.get("transA", 0), transB=t)
        extra = {"beta": attrs["beta"]} if bias and "beta" in attrs else {}
        second = helper.make_node("Gemm", [mid, f"{names[1]}.weight", *bias], [y], name=names[1], transB=t, **extra)
    else:
        ones = [1] * (lay.weight.ndim - 2)
        w1, w2 = a.reshape(*a.shape, *ones), b.reshape(*b.shape, *ones)
        keep = {key: v for key, v in attrs.items() if key in ("strides", "pads", "auto_pad", "dilations")}
        first = helper.make_node("Conv", [x, f"{names[0]}.weight"], [mid], name=names[0], kernel_shape=ones, **keep)
        second = helper.make_node("Conv", [mid, f"{names[1]}.weight", *bias], [y], name=names[1], kernel_shape=ones)
    model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w1, dtype), f"{names[0]}.weight"),
                                    numpy_helper.from_array(np.ascontiguousarray(w2, dtype), f"{names[1]}.weight")])
    return [first, second]


def _splice(graph: onnx.GraphProto, index: int, new: list[onnx.NodeProto]) -> None:
    nodes = list(graph.node)
    nodes[index:index + 1] = new
    del graph.node[:]
    graph.node.extend(nodes)


def factorize(model: onnx.ModelProto, layer: str, a: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose ``layer`` computes ``b @ a`` (``a`` ``[r, K]``, ``b`` ``[N, r]``) as two layers
    ``{layer}.lr1`` and ``{layer}.lr2`` (see the module docstring); the old weight goes unless something else reads
    it. ValueError for a layer that is not a MatMul, a Gemm or a 1x1 group-1 Conv, or for factors of the wrong shape."""
    out = _copy(model)
    lay = _layer(out, layer)
    node = lay.node
    new = _path(out, lay, a, b, (f"{layer}.lr1", f"{layer}.lr2"), node.input[0], node.output[0], list(node.input[2:3]))
    _splice(out.graph, lay.index, new)
    read = set().union(*(_used_names(n) for n in out.graph.node)) | {o.name for o in out.graph.output}
    _keep_initializers(out.graph, read, {node.input[1]})
    onnx.checker.check_model(out)
    return out


def add_compensation(model: onnx.ModelProto, layer: str, a: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose ``layer`` output gains ``b @ (a @ x)``: the layer then computes ``W_eff + b @ a``
    (EoRA compensation once ``W`` is replaced by a compressed weight). The path is ``{layer}.comp1`` ->
    ``{layer}.comp2`` on the layer's input and an ``Add`` ``{layer}.comp_add`` after the layer, which takes over the
    layer's output name; the layer now writes ``{output}.main``."""
    out = _copy(model)
    lay = _layer(out, layer)
    node = lay.node
    y = node.output[0]
    main, comp = f"{y}.main", f"{layer}.comp2.out"
    names = (f"{layer}.comp1", f"{layer}.comp2")
    taken = {t for nd in out.graph.node for t in (*nd.output, nd.name)}
    if taken & {main, comp, f"{layer}.comp_add"}:
        raise ValueError(f"{layer!r} already has a compensation path (names {sorted(taken & {main, comp})} taken)")
    new = _path(out, lay, a, b, names, node.input[0], comp, [])
    node.output[0] = main
    add = helper.make_node("Add", [main, comp], [y], name=f"{layer}.comp_add")
    _splice(out.graph, lay.index, [*new, node, add])
    onnx.checker.check_model(out)
    return out


def lowrank_factors(model: onnx.ModelProto, layer: str, rank: int, inputs: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(a [r, K], b [N, r])`` for ``factorize(model, layer, a, b)``: lowrank's ``svd_factors`` of the layer's
    ``W_eff``, or its ``activation_aware_factors`` when ``inputs`` (rows of the layer's input activations,
    ``[..., K]``; for a Conv, channels last) are given. Note the order: lowrank returns ``(U, V) = (b, a)``."""
    w = layer_weight(model, layer)
    if inputs is None:
        u, v = svd_factors(w, rank)
    else:
        x = np.asarray(inputs, np.float64)
        if x.ndim < 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{layer!r} takes {w.shape[1]} inputs; the activations have shape {x.shape}")
        x = x.reshape(-1, w.shape[1])
        u, v = activation_aware_factors(w, x.T @ x, rank)
    return v, u
