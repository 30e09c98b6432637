"""The per-layer option rows of the joint space (``edgekit.joint``) other than plain precisions: what a layer costs
narrowed to fewer channels, and its N:M sparse, low-rank (``<p>+r<R>``) and EoRA (``<w>+e<R>``) options, each with
its bytes and latency (from the cost table, scaled where the hardware table has not measured the shape) and its
distortion (measured on the edited graph, or scaled from the precision's measured one).

``Entry`` is one row: a choice of options for a unit's layers and what it costs and distorts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from edgekit.cost import HardwareTable, LayerGeometry, cost_table, roofline_ms
from edgekit.inventory import LayerInfo
from edgekit.tables import CostEntry

RANK_FRACTIONS = (0.5, 0.25)  # ranks tried, as fractions of the break-even rank NK/(N+K)
RANK_MULTIPLE = 16
MIN_RANK_DIM = 128
RANK_BASES = ("fp32", "w8a8", "w8a8d")  # precisions a factorized layer's two factors may take


@dataclass
class Entry:
    choice: dict[str, str]  # layer -> option
    distortion: float
    bytes: int
    latency_ms: float



# -- narrowed layers --------------------------------------------------------------------------------------------------
def narrowed(layer: LayerInfo, geo: LayerGeometry | None, cin: int | None, cout: int | None
             ) -> tuple[LayerInfo, LayerGeometry | None]:
    """The layer with ``cin`` input and ``cout`` output channels (None: unchanged): shapes, params and MACs."""
    w = list(layer.weight_shape)
    depthwise = layer.kind == "depthwise_conv"
    out_ax, in_ax = 0, 1  # Conv [O, I/g, kh, kw]; Gemm with transB (the exporter's form) [N, K]
    if layer.op_type == "MatMul" or (layer.op_type == "Gemm" and geo is not None and not geo.attr("transB", 0)):
        out_ax, in_ax = 1, 0  # [K, N]
    if depthwise:  # one filter per channel: in and out are the same channels
        w[0] = cout or cin or w[0]
    else:
        w[out_ax], w[in_ax] = cout or w[out_ax], cin or w[in_ax]
    old, new = int(np.prod(layer.weight_shape)), int(np.prod(w))
    bias = layer.params - old  # one per output channel, when present
    new_bias = bias * w[out_ax] // layer.weight_shape[out_ax] if bias else 0
    info = replace(layer, weight_shape=tuple(w), params=new + new_bias, macs=layer.macs * new // max(old, 1))
    if geo is None:
        return info, None
    ins, outs = list(geo.input_shape), list(geo.output_shape)
    axis = 0 if layer.op_type == "Conv" else -1
    if ins and (cin or (depthwise and cout)):
        ins[axis] = cin or cout
    if outs and (cout or (depthwise and cin)):
        outs[axis] = cout or cin
    attrs = dict(geo.attrs)
    if depthwise:
        attrs["group"] = w[0]
    return info, replace(geo, weight_shape=tuple(w), input_shape=tuple(ins), output_shape=tuple(outs),
                         attrs=tuple(sorted(attrs.items())))


def narrowed_cost(original: LayerInfo, geo: LayerGeometry | None, layer: LayerInfo, new_geo: LayerGeometry | None,
                  options, profile, hardware: HardwareTable | None, base: dict[str, CostEntry], *,
                  bias_correction: bool = True) -> dict[str, CostEntry]:
    """Cost entries of ``layer`` (a narrowed ``original``, or one factor of it) under ``options``. A latency the
    hardware table has not measured is the original's measured latency scaled by the roofline ratio."""
    row = cost_table([layer], profile, {layer.name: list(options)}, hardware=hardware,
                     geometry={layer.name: new_geo} if new_geo is not None else None,
                     bias_correction=bias_correction).entries.get(layer.name, {})
    out = {}
    for o, e in row.items():
        ref = base.get(o)
        if e.source == "roofline" and ref is not None and ref.source.startswith("measured"):
            scale = e.latency_ms / max(roofline_ms(original, o, profile, geometry=geo), 1e-12)
            out[o] = CostEntry(e.bytes, ref.latency_ms * scale, "scaled:" + ref.source.removeprefix("measured:"))
        else:
            out[o] = e
    return out


SPARSE_PATTERNS = ("2:4", "4:8")


def sparse_eligible(layer: LayerInfo, geo: LayerGeometry | None) -> bool:
    """N:M zeros run along the reduction axis: linear layers and 1x1 convolutions (k×k kernels interleave it)."""
    if layer.op_type == "Conv":
        return layer.kind == "conv" and tuple(layer.weight_shape[2:]) == (1,) * (len(layer.weight_shape) - 2) and \
            (geo is None or geo.attr("group", 1) == 1)
    return layer.op_type in ("MatMul", "Gemm")


def sparse_cost(layer: LayerInfo, geo, option: str, dense_bytes: int, dense_ms: float, profile, pattern: str
                ) -> tuple[int, float]:
    """Bytes and latency of ``option`` with N:M weights: half the weight values plus log2(M)-bit indices per kept
    value; latency scaled from the dense one by the roofline with the profile's sparse peak (no sparse peak listed:
    compute as dense, only the bytes shrink)."""
    from edgekit.cost import ACTIVATION_BYTES, _precision, activation_elements

    n, m = (int(x) for x in pattern.split(":"))
    weight = int(np.prod(layer.weight_shape))
    bits = 32 if option == "fp32" else int(option[1]) if option[1].isdigit() else 8
    kept = weight * n // m
    size = dense_bytes - weight * bits // 8 + kept * bits // 8 + math.ceil(kept * math.log2(m) / 8)
    peaks = profile.hardware.peak_gops
    prec = _precision(option)
    dense_peak = peaks.get(prec) or peaks["fp32"]
    sparse_peak = peaks.get(f"{prec}_sparse", dense_peak)
    n_in, n_out = activation_elements(layer, geo)
    act = (n_in + n_out) * ACTIVATION_BYTES.get(option, 4)
    bandwidth = profile.hardware.bandwidth_gbs * 1e9

    def roof(nbytes: int, peak: float) -> float:
        return max(2.0 * layer.macs / (peak * 1e9), (nbytes + act) / bandwidth) * 1e3

    return int(size), float(dense_ms * roof(size, sparse_peak) / max(roof(dense_bytes, dense_peak), 1e-12))


def rank_candidates(layer: LayerInfo, geo: LayerGeometry | None) -> list[int]:
    """Ranks worth trying: fractions of the break-even rank NK/(N+K), rounded to RANK_MULTIPLE; none for small or
    non-linear layers (1x1 convolutions included, outside channel groups)."""
    w = layer.weight_shape
    if layer.op_type == "Conv" and (len(w) != 4 or w[2:] != (1, 1) or layer.kind == "depthwise_conv"):
        return []
    if layer.op_type not in ("MatMul", "Gemm", "Conv"):
        return []
    n, k = (w[0], int(np.prod(w[1:]))) if layer.op_type == "Conv" else (w[1], w[0]) if layer.op_type == "MatMul" \
        else ((w[0], w[1]) if geo is not None and geo.attr("transB", 0) else (w[1], w[0]))
    if min(n, k) < MIN_RANK_DIM:
        return []
    even = n * k / (n + k)
    return sorted({max(RANK_MULTIPLE, int(round(f * even / RANK_MULTIPLE)) * RANK_MULTIPLE) for f in RANK_FRACTIONS})


def _rank_entries(model, layer: LayerInfo, geometry, profile, options, sens, cost, hardware, feeds, measured, struct,
                  bias_correction) -> list[Entry]:
    from edgekit.compress import graphedit
    from edgekit.structure import layer_inputs

    geo = geometry.get(layer.name)
    ranks = rank_candidates(layer, geo)
    bases = [o for o in options[layer.name] if o in RANK_BASES and o in sens.values[layer.name]]
    if not ranks or not bases:
        return []
    x = layer_inputs(model, [layer.name], feeds)[layer.name]
    out = []
    for r in ranks:
        a, b = graphedit.lowrank_factors(model, layer.name, r, x)
        d = measured(graphedit.factorize(model, layer.name, a, b))
        struct["ranks"].setdefault(layer.name, {})[r] = d
        total = factor_cost(layer, geo, r, bases, profile, hardware, cost.entries[layer.name], bias_correction)
        out += [Entry({layer.name: f"{o}+r{r}"}, d + float(sens.values[layer.name][o]), total[o][0], total[o][1])
                for o in bases]
    return out


def factor_cost(layer: LayerInfo, geo, rank: int, options, profile, hardware, base_row, bias_correction: bool
                ) -> dict[str, tuple[int, float]]:
    """Bytes and latency of a rank-``rank`` pair of layers standing in for ``layer`` (K→R without bias, R→N with the
    layer's bias), under each option."""
    total: dict[str, list] = {o: [0, 0.0] for o in options}
    for i, (cin, cout) in enumerate(((None, rank), (rank, None))):
        part, pgeo = narrowed(replace(layer, name=f"{layer.name}.lr{i + 1}"), geo, cin, cout)
        if i == 0:  # the first factor has no bias
            part = replace(part, params=int(np.prod(part.weight_shape)))
            pgeo = replace(pgeo, has_bias=False) if pgeo is not None else None
        row = narrowed_cost(layer, geo, part, pgeo, options, profile, hardware, base_row,
                            bias_correction=bias_correction)
        for o in options:
            total[o][0] += row[o].bytes
            total[o][1] += row[o].latency_ms
    return {o: (int(b), float(t)) for o, (b, t) in total.items()}


EORA_RANKS = (16, 32)  # ranks of the compensation paths offered beside weight-only layers


def _eora_entries(layer: LayerInfo, geo, quantizer, options, sens, cost, profile, hardware, bias_correction, struct
                  ) -> list[Entry]:
    """``<w>+e<R>`` options of a weight-only layer: the EoRA path fitted to the error of the low-bit weight the
    quantizer gives it. Distortion: the option's measured distortion scaled by the local output error left, as the
    weight-only table scales its options (``wonly.local_error``): tr(ΔW·H·ΔWᵀ) after over before the path."""
    from edgekit.compress.lowrank import eora
    from edgekit.wonly import weight_only

    if quantizer is None or layer.name not in quantizer.nodes or layer.op_type not in ("MatMul", "Gemm"):
        return []
    w = quantizer.weights[layer.name].astype(np.float64)
    n, k = w.shape
    ranks = [r for r in EORA_RANKS if r <= min(n, k) // 4]
    wonly = [o for o in options[layer.name] if weight_only(o) and o in sens.values[layer.name]]
    if not ranks or not wonly:
        return []
    h = quantizer.hessians()[layer.name].astype(np.float64)
    path = {r: factor_cost(layer, geo, r, ["fp32"], profile, hardware, cost.entries[layer.name], False)["fp32"]
            for r in ranks}
    base = cost.entries[layer.name]
    out = []
    for o in wonly:
        delta = w - quantizer.qweight(layer.name, o).dequantize()
        before = float(np.einsum("nk,kj,nj->", delta, h, delta))
        for r in ranks:
            u, v = eora(w, w - delta, h, r)
            rest = delta - u.astype(np.float64) @ v.astype(np.float64)
            after = float(np.einsum("nk,kj,nj->", rest, h, rest))
            d = float(sens.values[layer.name][o]) * (after / before if before > 0 else 1.0)
            struct["eora"].setdefault(layer.name, {})[f"{o}+e{r}"] = d
            out.append(Entry({layer.name: f"{o}+e{r}"}, d, base[o].bytes + path[r][0],
                             base[o].latency_ms + path[r][1]))
    return out
