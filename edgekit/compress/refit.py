"""Training-free repair of a structurally edited graph: refit the layers after an edit by least squares.

After channels are pruned (or a branch is removed), a layer downstream reads fewer or different inputs. The layer's
new weights and bias are the ridge least-squares solution that makes its output on the *edited* graph's inputs match
its output in the *original* graph on the same calibration samples (He et al., "Channel Pruning for Accelerating Very
Deep Neural Networks"; ThiNet)::

    [W' b'] = argmin  || X' W'^T + b' - Y ||^2  +  lam * || [W' b'] - [W0 b0] ||^2

``X'`` the layer's input rows in the edited graph (one row per sample and spatial position), ``Y`` its output rows in
the original graph, ``[W0 b0]`` its weights as the edit left them (kept columns, folded bias): the ridge pulls toward
them where the data say little (a classifier after global pooling sees one row per sample). ``lam`` is ``alpha`` times
the mean diagonal of ``X'^T X'``, chosen per layer from ``ALPHAS`` by the error on held-out calibration samples (every
``VALIDATION_EVERY``-th one; or, when ``sources`` says which samples share a source, such as crops of one photograph,
the samples of every ``VALIDATION_EVERY``-th source, since other crops of a fitted picture are fitted too; the final
solve then uses all of them), so a layer with few rows per feature is not fit to its calibration samples.
Layers are refit in graph order, each on inputs computed with the layers before it
already refit, so every refit also absorbs the error left upstream.

Refittable layers: ``Conv`` with a 1x1 kernel and ``group=1``; ``Gemm`` and ``MatMul`` with an initializer weight (a
``MatMul``'s bias is the ``Add`` after it when there is one; without one only the weight is refit). The function
accumulates the normal equations sample by sample, so memory is ``O(K^2)`` whatever the number of positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge strengths tried (times the mean diagonal of X^T X)
VALIDATION_EVERY = 4  # every 4th calibration sample is held out to choose among them (with at least 4 samples)
MIN_ROWS_PER_FEATURE = 2  # fewer calibration rows than this per input feature: the layer keeps its weights


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def refittable(node: onnx.NodeProto, inits: dict) -> bool:
    """Whether ``refit`` can solve for this node's weight."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return False
    if node.op_type == "Conv":
        w = inits[node.input[1]]
        return _attr(node, "group", 1) == 1 and len(w.dims) == 4 and tuple(w.dims[2:]) == (1, 1)
    if node.op_type == "Gemm":
        return not _attr(node, "transA", 0)
    return node.op_type == "MatMul" and len(inits[node.input[1]].dims) == 2


def _bias_add(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict) -> tuple[onnx.NodeProto, int] | None:
    """For a MatMul: the Add of a per-feature constant right after it (node, index of the constant input)."""
    users = [n for n in model.graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        ci = 1 - list(add.input).index(node.output[0])
        if add.input[ci] in inits and len(inits[add.input[ci]].dims) == 1:
            return add, ci
    return None


def _rows(a: np.ndarray, channels_first: bool) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) if channels_first else a.reshape(-1, a.shape[-1])


def _session(model: onnx.ModelProto, tensors: list[str]):
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _weights(node: onnx.NodeProto, inits: dict, bias_site) -> tuple[np.ndarray, np.ndarray | None]:
    """(W as [out, in], bias or None) of a refittable node."""
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    if node.op_type == "Conv":
        w = w[:, :, 0, 0]
    elif node.op_type == "MatMul" or not _attr(node, "transB", 0):
        w = w.T
    if node.op_type == "Gemm":
        w = w * _attr(node, "alpha", 1.0)
    b = None
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if node.op_type == "Gemm":
            b = b * _attr(node, "beta", 1.0)
    elif bias_site is not None:
        add, ci = bias_site
        b = numpy_helper.to_array(inits[add.input[ci]]).astype(np.float64)
    return w, b


def _store(model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None, bias_site) -> None:
    """Write the solved W [out, in] and bias back in the node's own layout (fresh initializers, so shared ones are
    untouched)."""
    inits = {i.name: i for i in model.graph.initializer}
    old = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == "Conv":
        new = w.reshape(old.shape)
    elif node.op_type == "MatMul" or not _attr(node, "transB", 0):
        new = w.T
    else:
        new = w
    if node.op_type == "Gemm":
        new = new / _attr(node, "alpha", 1.0)
    name = f"{node.name}.refit_w"
    model.graph.initializer.append(numpy_helper.from_array(new.astype(np.float32), name))
    node.input[1] = name
    if b is None:
        return
    bname = f"{node.name}.refit_b"
    if node.op_type in ("Conv", "Gemm"):
        scale = _attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        model.graph.initializer.append(numpy_helper.from_array((b / (scale or 1.0)).astype(np.float32), bname))
        node.input.extend([""] * (3 - len(node.input)))
        node.input[2] = bname
    else:
        add, ci = bias_site
        model.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), bname))
        add.input[ci] = bname


def _sq_error(theta: np.ndarray, gram: np.ndarray, cross: np.ndarray, ysq: float) -> float:
    """||X theta - Y||^2 over all rows, from the normal equations (X^T X, X^T Y, ||Y||^2)."""
    return float(np.einsum("ij,ij->", theta, gram @ theta) - 2 * np.einsum("ij,ij->", theta, cross) + ysq)


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def refit(original: onnx.ModelProto, edited: onnx.ModelProto, layers: list[str], feeds: list[dict[str, np.ndarray]],
          *, kept_outputs: dict[str, np.ndarray] | None = None, alphas: tuple[float, ...] = ALPHAS,
          sources: Sequence[int] | None = None) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """A copy of ``edited`` whose ``layers`` (node names present in both graphs, refittable in ``edited``) are refit
    to reproduce their outputs in ``original`` on ``feeds``; returns it with, per layer, the relative output error
    before and after (``{"before": e0, "after": e1}``, ``e = ||Y' - Y|| / ||Y||`` on the same samples).

    ``kept_outputs[layer]`` names the original output features a layer still computes when the edit also narrowed
    its output (a layer that is both a pruned group's consumer and another group's producer). Layers whose refit
    would not lower the error keep their weights. ``sources`` (one id per feed) makes the ridge strength's validation
    hold out whole sources (``validation_mask``). Raises ValueError for a layer that is missing or not refittable.
    """
    if not feeds:
        raise ValueError("refit needs at least one calibration sample")
    validate = validation_mask(len(feeds), sources)
    out = onnx.ModelProto()
    out.CopyFrom(edited)
    o_nodes = {n.name: n for n in original.graph.node}
    order = {n.name: i for i, n in enumerate(out.graph.node)}
    inits = {i.name: i for i in out.graph.initializer}
    for layer in layers:
        if layer not in order or layer not in o_nodes:
            raise ValueError(f"refit: layer {layer!r} is not in both graphs")
        if not refittable(out.graph.node[order[layer]], inits):
            raise ValueError(f"refit: layer {layer!r} ({out.graph.node[order[layer]].op_type}) is not refittable "
                             "(1x1 Conv with group 1, Gemm or MatMul with an initializer weight)")
    layers = sorted(dict.fromkeys(layers), key=order.__getitem__)
    if not layers:
        return out, {}
    o_inits = {i.name: i for i in original.graph.initializer}

    def target(layer: str) -> str:  # the layer's affine output in the original: after its bias Add, if any
        node = o_nodes[layer]
        site = _bias_add(original, node, o_inits) if node.op_type == "MatMul" else None
        return site[0].output[0] if site else node.output[0]

    targets_t = {layer: target(layer) for layer in layers}
    sess = _session(original, list(dict.fromkeys(targets_t.values())))
    names = [o.name for o in sess.get_outputs()]
    targets = [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds]
    stats: dict[str, dict] = {}
    for layer in layers:
        nodes = {n.name: n for n in out.graph.node}
        node = nodes[layer]
        inits = {i.name: i for i in out.graph.initializer}
        site = _bias_add(out, node, inits) if node.op_type == "MatMul" else None
        w0, b0 = _weights(node, inits, site)
        has_bias = b0 is not None
        cf = node.op_type == "Conv"
        s = _session(out, [node.input[0]])
        k = w0.shape[1] + has_bias
        # normal equations of two folds: every VALIDATION_EVERY-th sample is held out to choose the ridge strength
        eq = [[np.zeros((k, k)), np.zeros((k, w0.shape[0])), 0.0, 0] for _ in range(2)]
        held = bool(validate.any())
        for i, (f, t) in enumerate(zip(feeds, targets, strict=True)):
            x = _rows(s.run([node.input[0]], f)[0], cf)
            y = _rows(t[targets_t[layer]], cf)
            if kept_outputs and layer in kept_outputs:
                y = y[:, kept_outputs[layer]]
            if has_bias:
                x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
            fold = eq[int(validate[i])]
            fold[0] += x.T @ x
            fold[1] += x.T @ y
            fold[2] += float((y * y).sum())
            fold[3] += len(x)
        (g_fit, c_fit, y_fit, r_fit), (g_val, c_val, y_val, r_val) = eq
        theta0 = np.concatenate([w0.T, b0[None, :]], axis=0) if has_bias else w0.T

        def solve(gram: np.ndarray, cross: np.ndarray, a: float, theta0=theta0, k=k) -> np.ndarray:
            lam = a * float(np.mean(np.diag(gram))) + 1e-12
            return np.linalg.solve(gram + lam * np.eye(k), cross + lam * theta0)

        if held:  # the ridge strength with the least error on the held-out samples; none if no strength beats theta0
            errs = {a: _sq_error(solve(g_fit, c_fit, a), g_val, c_val, y_val) for a in alphas}
            chosen = min(errs, key=errs.__getitem__)
            e0, e1, norm = _sq_error(theta0, g_val, c_val, y_val), errs[chosen], y_val
        else:
            chosen = alphas[len(alphas) // 2]
            e0 = _sq_error(theta0, g_fit, c_fit, y_fit)
            e1, norm = _sq_error(solve(g_fit, c_fit, chosen), g_fit, c_fit, y_fit), y_fit
        rows, norm = r_fit + r_val, max(norm, 1e-30)
        stats[layer] = {"before": float(np.sqrt(max(e0, 0) / norm)), "after": float(np.sqrt(max(e1, 0) / norm)),
                        "rows": rows, "alpha": chosen, "held_out": held}
        if rows < MIN_ROWS_PER_FEATURE * k or e1 >= e0:  # too few rows to trust (it would fit them), or no gain
            stats[layer]["after"] = stats[layer]["before"]
            stats[layer]["kept"] = True
            continue
        theta = solve(g_fit + g_val, c_fit + c_val, chosen)
        w = theta[:-1].T if has_bias else theta.T
        b = theta[-1] if has_bias else None
        _store(out, node, w, b, site)
    _drop_unused(out)
    return out, stats


def validation_mask(n: int, sources: Sequence[int] | None = None) -> np.ndarray:
    """Which of ``n`` samples validate the ridge strength: every ``VALIDATION_EVERY``-th one (none below
    ``VALIDATION_EVERY`` samples); with ``sources`` of at least two distinct ids, all samples of every
    ``VALIDATION_EVERY``-th source in order of first appearance (at least one source, never all)."""
    if sources is not None:
        src = np.asarray(sources)
        if src.shape != (n,):
            raise ValueError(f"refit: {len(src)} sources for {n} samples")
        ids = list(dict.fromkeys(src.tolist()))
        if len(ids) >= 2:
            held = ids[VALIDATION_EVERY - 1::VALIDATION_EVERY] or ids[-1:]
            return np.isin(src, held)
    return (np.arange(n) % VALIDATION_EVERY == VALIDATION_EVERY - 1) if n >= VALIDATION_EVERY else np.zeros(n, bool)


def prune_and_refit(model: onnx.ModelProto, keep: dict[str, np.ndarray], feeds: list[dict[str, np.ndarray]], *,
                    groups=None, alphas: tuple[float, ...] = ALPHAS,
                    sources: Sequence[int] | None = None) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """Prune channel groups (``compress.channels.prune_channels``: keep ``keep[group]``) and refit their consumers to
    the original model's outputs on ``feeds`` (``sources``: see ``refit``); returns the model and the refit stats per
    layer. ``groups``: the model's channel groups when the caller already has them."""
    from edgekit.compress import channels

    groups = {g.name: g for g in (groups if groups is not None else channels.channel_groups(model))}
    pruned = channels.prune_channels(model, keep, feeds[:1])
    inits = {i.name: i for i in pruned.graph.initializer}
    nodes = {n.name: n for n in pruned.graph.node}
    layers = [c for name in keep for c in groups[name].consumers if c in nodes and refittable(nodes[c], inits)]
    kept_outputs = {groups[name].producer: np.asarray(idx) for name, idx in keep.items()}
    return refit(model, pruned, layers, feeds, kept_outputs=kept_outputs, alphas=alphas, sources=sources)
