"""The structural half of a plan: channel pruning, low rank, N:M sparsity and removal, applied to the FP32 graph before
it is quantized.

``apply_structure(fp32, plan, calib)`` reads every layer's option (``edgekit.plan.parse_option``) and edits the float
ONNX graph in this order:

1. ``+ch<N>``: each channel group (``compress.channels.channel_groups``, found on the original graph, as the tables
   were) whose producer says ``+ch<N>`` keeps its N most important channels (``group_importance``: centred
   activation-aware importance on calibration data, or with ``importance="batchnorm"`` the training distribution's
   BatchNorm statistics where the export recorded them, ``compress.bnstats``); the constant a dropped channel still
   feeds forward is folded into the consumers' biases, then the consumers are refit by ridge least squares to the
   original model's outputs on ``refit_split(calib)``'s calibration samples (``compress.refit``: training-free, as
   the joint tables measured it; the others, whole photographs where the data says which crops share one, are held
   out to measure on);
2. ``drop``: the residual branches (``compress.graphedit.removable_units``) whose every layer says ``drop`` are
   removed (after pruning: removing a branch can turn a layer that fed it into a prunable producer, which the
   plan's ``+ch`` on that layer, written for the original graph, does not mean);
3. ``+r<R>``: the layer becomes two layers ``<layer>.lr1`` / ``<layer>.lr2`` of rank R, fitted in the eigenspace of the
   layer's calibration inputs (``compress.lowrank.activation_aware_factors``);
4. ``sparse2:4+`` / ``sparse4:8+``: the weight is pruned to the N:M pattern with SparseGPT's error compensation.

Then an optional recovery fine-tune (``compress.recover``, ``recover_steps``) distils the original model into the
edited one on the calibration data. What is returned is an ordinary float model and a precision-only plan over its
layers, which ``mixed.apply_plan`` quantizes like any other.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import ConfigError
from edgekit.plan import LayerChoice, Plan, parse_option

log = logging.getLogger(__name__)

IMPORTANCE_SAMPLES = 16  # calibration samples for channel importance, low-rank eigenspaces and SparseGPT Hessians
REFIT_SAMPLES = 64  # calibration samples a pruned group's consumers are refit on (7x7 maps: 3,136 rows per layer)
MIN_HELD_OUT = 16  # fewest calibration samples past the refit's that count as a held-out set


def sample_feeds(calib: Dataset, n: int = IMPORTANCE_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds (leading batch dimension 1) from the first ``n`` calibration samples."""
    d = calib.take(n)
    count = len(next(iter(d.inputs.values())))
    return [{k: v[i:i + 1] for k, v in d.inputs.items()} for i in range(count)]


def refit_split(calib: Dataset) -> tuple[Dataset, Dataset | None]:
    """The calibration samples pruned layers are refit on, and those held out to measure on (None when too few).

    Samples with ``groups`` (crops of a few photographs): whole groups are held out, evenly spaced over the groups,
    as few as give ``MIN_HELD_OUT`` samples; the others are refit on (at most ``REFIT_SAMPLES``). A refit to some
    crops of a picture also fits its other crops, so held-out crops of the *same* pictures flattered refit
    structures by up to 20x (EfficientNet-Lite0's late 1x1 layers: relative MSE 0.003 on such crops, 0.07 on new
    photographs) and the joint allocator over-pruned. Otherwise: the first ``REFIT_SAMPLES`` when ``MIN_HELD_OUT``
    more remain; else all but ``MIN_HELD_OUT`` (from ``2 * MIN_HELD_OUT`` samples on); else every sample, none
    held out."""
    n = len(calib)
    if calib.groups is not None:
        ids = list(dict.fromkeys(calib.groups.tolist()))  # in order of first appearance
        g = len(ids)
        for h in range(1, g):
            held = {ids[(2 * j + 1) * g // (2 * h)] for j in range(h)}
            mask = np.isin(calib.groups, sorted(held))
            if mask.sum() >= MIN_HELD_OUT:
                if n - mask.sum() >= MIN_HELD_OUT:
                    fit = np.flatnonzero(~mask)[:REFIT_SAMPLES]
                    return calib.subset(fit), calib.subset(np.flatnonzero(mask))
                break
    if n >= REFIT_SAMPLES + MIN_HELD_OUT:
        return calib.take(REFIT_SAMPLES), calib.skip(REFIT_SAMPLES)
    if n >= 2 * MIN_HELD_OUT:
        return calib.take(n - MIN_HELD_OUT), calib.skip(n - MIN_HELD_OUT)
    return calib.take(REFIT_SAMPLES), None


def refit_feeds(calib: Dataset) -> tuple[list[dict[str, np.ndarray]], list[int] | None]:
    """Per-sample feeds of ``refit_split``'s refit samples and their groups (None without groups), for
    ``compress.refit``."""
    fit = refit_split(calib)[0]
    return sample_feeds(fit, len(fit)), None if fit.groups is None else fit.groups.tolist()


def held_out(calib: Dataset, n: int | None = None) -> tuple[Dataset, bool]:
    """Calibration samples the refit (``refit_split``) did not see, at most ``n`` of them, and True; or, when too
    few are left, the first ``n`` (all) samples and False. Distortions of refit structures measured on the refit's
    own samples flatter them (the least squares fit those very outputs)."""
    rest = refit_split(calib)[1]
    if rest is not None:
        return (rest.take(n) if n else rest), True
    return (calib.take(n) if n else calib), False


def layer_inputs(model, layers: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The input activations of ``layers`` over ``feeds``, as rows ``[samples·positions, K]`` (K = the layer's input
    features: last axis for MatMul/Gemm, channel axis for Conv)."""
    import onnx
    import onnxruntime as ort

    nodes = {n.name: n for n in model.graph.node}
    tensors = {layer: nodes[layer].input[0] for layer in layers}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for t in dict.fromkeys(tensors.values()):
        if t not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    channels_first = {t for layer, t in tensors.items() if nodes[layer].op_type == "Conv"}  # NCHW: features on axis 1
    rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors.values()}
    for feed in feeds:
        out = dict(zip(names, sess.run(None, feed), strict=True))
        for t in rows:
            a = np.asarray(out[t], dtype=np.float32)
            rows[t].append(np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) if t in channels_first
                           else a.reshape(-1, a.shape[-1]))
    return {layer: np.concatenate(rows[t]) for layer, t in tensors.items()}


IMPORTANCE = ("activations", "batchnorm")  # how channels are ranked (``--channel-importance``)


def channel_stats(fp32_path: Path, importance: str) -> dict | None:
    """The BatchNorm statistics to rank channels by (``compress.bnstats.load``) when ``importance`` is "batchnorm"
    (None, with a warning, when the export recorded none); None for "activations". Raises ConfigError otherwise."""
    from edgekit.compress import bnstats

    if importance not in IMPORTANCE:
        raise ConfigError(f"channel importance must be one of {', '.join(IMPORTANCE)}, not {importance!r}")
    if importance == "activations":
        return None
    stats = bnstats.load(fp32_path)
    if stats is None:
        log.warning("no BatchNorm statistics were recorded for %s (an ONNX model, or no BatchNorm): channels are "
                    "ranked by their calibration activations", Path(fp32_path).name)
    return stats


def group_importance(model, groups: list, feeds: list[dict[str, np.ndarray]], stats: dict | None) -> dict:
    """Per channel group, one importance score per channel: from the training distribution's BatchNorm statistics
    where ``stats`` (``compress.bnstats.load``) covers the group, else from the centred calibration activations
    (``compress.channels.channel_importance``). Scores rank channels within a group only, so groups may mix sources."""
    from edgekit.compress import bnstats, channels

    scores = bnstats.importance(model, groups, stats) if stats else {}
    rest = [g for g in groups if g.name not in scores]
    if rest:
        scores |= channels.channel_importance(model, rest, feeds, centered=True)
    return scores


def _groups_to_prune(model, parts: dict) -> tuple[dict, dict[str, int]]:
    """The channel groups the plan narrows ({name: ChannelGroup}) and their kept counts; a group's count is what its
    producer's ``+ch<N>`` says, and its depthwise layers and pure consumers must agree."""
    from edgekit.compress.channels import channel_groups

    groups = {g.name: g for g in channel_groups(model)}
    keep: dict[str, int] = {}
    producers = {g.producer for g in groups.values()}
    for g in groups.values():
        n = parts[g.producer].channels if g.producer in parts else None
        if n is None:
            continue
        if not 0 < n <= g.channels:
            raise ConfigError(f"layer {g.producer!r} asks to keep {n} channels of a group of {g.channels}")
        for member in (*g.passthrough, *(c for c in g.consumers if c not in producers)):
            if member in parts and parts[member].channels not in (n, None):
                raise ConfigError(f"layers {g.producer!r} and {member!r} are one channel group but the plan keeps "
                                  f"{n} and {parts[member].channels} channels", hint="give every layer of the group "
                                  "the same +ch<N>")
        if n < g.channels:
            keep[g.name] = n
    asked = {layer for layer, p in parts.items() if p.channels is not None}
    covered = {layer for g in groups.values() if g.producer in parts and parts[g.producer].channels is not None
               for layer in g.layers}
    stray = sorted(asked - covered)
    if stray:
        raise ConfigError(f"layers {stray[:5]} ask for +ch<N> but are in no prunable channel group of this graph",
                          hint="channel groups are found from the graph: a producer, depthwise layers and consumers "
                               "with nothing else reading the channels (no residual Add, Concat or reshape)")
    return {name: groups[name] for name in keep}, keep


def apply_structure(fp32_path: Path, plan: Plan, calib: Dataset, *, recover_steps: int = 0, progress=None,
                    importance: str = "activations"):
    """Edit the float graph as ``plan``'s structural modifiers say; returns (ModelProto, precision-only Plan over the
    edited graph's layers, summary dict). Raises ConfigError when the plan does not fit the graph."""
    import onnx

    from edgekit.compress import graphedit, refit

    original = onnx.load(str(fp32_path))
    model = original
    parts = {c.layer: parse_option(c.option) for c in plan.layers}
    feeds = sample_feeds(calib)
    summary: dict = {"dropped": [], "pruned": {}, "factorized": {}, "sparse": {}}

    groups, counts = _groups_to_prune(model, parts)
    if groups:
        scores = group_importance(model, list(groups.values()), feeds, channel_stats(fp32_path, importance))
        keep = {name: np.sort(np.argsort(-scores[name], kind="stable")[:n]) for name, n in counts.items()}
        fit_feeds, sources = refit_feeds(calib)
        model, fits = refit.prune_and_refit(model, keep, fit_feeds, groups=list(groups.values()), sources=sources)
        summary["pruned"] = {name: [int(groups[name].channels), int(n)] for name, n in counts.items()}
        summary["refit"] = {layer: {k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()}
                            for layer, st in fits.items()}

    dropped = {layer for layer, p in parts.items() if p.base == "drop"}
    if dropped:
        units = graphedit.removable_units(model)
        chosen = [u for u in units if set(u.layers) and set(u.layers) <= dropped]
        covered = {layer for u in chosen for layer in u.layers}
        if covered != dropped:
            raise ConfigError(f"layers {sorted(dropped - covered)[:5]} say drop but are not a whole removable residual "
                              "branch", hint="drop every layer of a block, attention or FFN sub-layer, or none")
        model = graphedit.remove_units(model, [u.name for u in chosen])
        summary["dropped"] = [u.name for u in chosen]

    ranked = {layer: p.rank for layer, p in parts.items() if p.rank is not None}
    if ranked:
        inputs = layer_inputs(model, list(ranked), feeds)
        for layer, rank in ranked.items():
            a, b = graphedit.lowrank_factors(model, layer, rank, inputs[layer])
            model = graphedit.factorize(model, layer, a, b)
            summary["factorized"][layer] = rank

    sparse = {layer: p.sparsity for layer, p in parts.items() if p.sparsity is not None}
    if sparse:
        model = _sparsify(model, sparse, layer_inputs(model, list(sparse), feeds))
        summary["sparse"] = dict(sparse)

    if recover_steps:
        from edgekit.compress.recover import recover, teacher_outputs

        every = max(1, recover_steps // 10)

        def report(step: int, steps: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                log.info("recovery fine-tune: step %d of %d, distillation loss %.4g", step, steps, loss)

        data = sample_feeds(calib, len(calib))  # every calibration sample; recover() holds the last 1/8 out
        result = recover(model, teacher_outputs(original, data), data, steps=recover_steps,
                         progress=progress or report)
        model = result.model
        summary["recover"] = {"steps": result.steps, "loss_before": result.loss_before,
                              "loss_after": result.loss_after, "kept_original": result.kept_original,
                              "seconds": round(result.seconds, 1)}
    return model, _precision_plan(plan, parts, summary), summary


def add_eora(model, plan: Plan, calib: Dataset, ctx, *, model_sha256: str):
    """Beside every layer whose option says ``+e<R>``, a float rank-R path fitted (``compress.lowrank.eora``) to the
    error of the low-bit weight the plan's weight-only quantizer gives that layer *in this graph*. The exporter later
    quantizes the layer with the same quantizer (deterministic, same inputs: the path reads the layer's input and adds
    after it), so the path repairs exactly the weight that ships. Returns (model, {layer: rank})."""
    from edgekit.compress import graphedit
    from edgekit.compress.lowrank import eora
    from edgekit.inventory import layer_inventory
    from edgekit.wonly import LowBitQuantizer, WeightOnlyConfig, weight_only

    ranks = {c.layer: parse_option(c.option).eora for c in plan.layers if parse_option(c.option).eora}
    if not ranks:
        return model, {}
    bad = [layer for layer in ranks if weight_only(parse_option(plan.option_for(layer)).base) is None]
    if bad:
        raise ConfigError(f"+e<R> compensates a weight-only layer's quantization error; {bad[:3]} are not "
                          "weight-only", hint="use it with w4g32, w4g128, w2g64 ...")
    infos = [layer for layer in layer_inventory(model) if layer.name in ranks]
    quantizer = LowBitQuantizer(model, infos, calib, WeightOnlyConfig.from_dict(plan.activations.get("weight_only")),
                                model_sha256=model_sha256, ctx=ctx)
    hessians = quantizer.hessians()
    for layer, rank in ranks.items():
        wq = quantizer.qweight(layer, parse_option(plan.option_for(layer)).base).dequantize()
        u, v = eora(quantizer.weights[layer], wq, hessians[layer], rank)
        model = graphedit.add_compensation(model, layer, v, u)
    return model, ranks


def _precision_plan(plan: Plan, parts: dict, summary: dict) -> Plan:
    choices = []
    for c in plan.layers:
        p = parts[c.layer]
        if p.base == "drop":
            continue
        if p.eora is not None:
            choices += [LayerChoice(c.layer, p.base, c.reason)]
            choices += [LayerChoice(f"{c.layer}.comp{i}", "fp32", f"fp32: EoRA path of {c.layer}") for i in (1, 2)]
        elif p.rank is not None:
            choices += [LayerChoice(f"{c.layer}.lr{i}", p.base, f"{p.base}: factor {i} of {c.layer}") for i in (1, 2)]
        else:
            choices.append(LayerChoice(c.layer, p.base, c.reason))
    return replace(plan, layers=tuple(choices), notes=(*plan.notes, f"structure: {summary}"))


def _sparsify(model, sparse: dict[str, str], inputs: dict[str, np.ndarray]):
    """Prune each layer's weight to its N:M pattern with SparseGPT (Hessian from the layer's calibration inputs)."""
    import onnx
    from onnx import numpy_helper

    from edgekit.compress.sparsity import sparsegpt
    from edgekit.compress.wquant import hessian
    from edgekit.export.lowbit import weight_matrix
    from edgekit.wsim import to_graph_layout

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    for layer, pattern in sparse.items():
        node = nodes[layer]
        n, m = (int(x) for x in pattern.removeprefix("sparse").split(":"))
        if node.op_type == "Conv":
            shape = tuple(inits[node.input[1]].dims)
            if shape[2:] != (1,) * (len(shape) - 2) or next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
                raise ConfigError(f"{layer}: N:M sparsity is applied to linear layers and 1x1 convolutions only")
            w = numpy_helper.to_array(inits[node.input[1]]).reshape(shape[0], -1).astype(np.float32)
        else:
            w = weight_matrix(node, inits)  # [N, K]
        pruned = sparsegpt(w, hessian(inputs[layer]), nm=(n, m))
        init = inits[node.input[1]]
        original = numpy_helper.to_array(init)
        new = pruned.reshape(original.shape) if node.op_type == "Conv" else to_graph_layout(node, pruned)
        init.CopyFrom(numpy_helper.from_array(new.astype(original.dtype), init.name))
    return out
