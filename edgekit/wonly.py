"""Weight-only (w<b>g<G>) and dynamic-int8 (w8a8d) options: quantize each (layer, option) with the quantizer that
ships, measure its sensitivity by feeding the weights (``edgekit.wsim``), and write the chosen ones into the graph.

GPTQ quantizes Linear/MatMul/Gemm weights (Hessians from the calibration inputs of each layer, with padded positions
left out when the model has an attention-mask input); embeddings, which have no input Hessian, get MSE-clipped
round-to-nearest. Quantized weights are cached on disk by (model, data, layer, option, settings), so a rebuild with
another budget does not quantize again. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekit import __version__
from edgekit.compress.wquant import GPTQPrep, QWeight, gptq, gptq_prepare, refit_scales, rtn
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import ConfigError
from edgekit.inventory import LayerInfo
from edgekit.tables import SensitivityTable
from edgekit.wsim import FeedSimulator, int8_per_channel, to_graph_layout

log = logging.getLogger(__name__)

_WONLY_RE = re.compile(r"^w([2348])g(\d+)(s?)$")
FEED_OPTIONS_DYNAMIC = ("w8a8d",)


def weight_only(option: str) -> tuple[int, int, bool] | None:
    """``(bits, group, symmetric)`` of a weight-only option, else None."""
    m = _WONLY_RE.match(option)
    return (int(m[1]), int(m[2]), bool(m[3])) if m else None


def is_feed_option(option: str) -> bool:
    """Options simulated by feeding weights (weight-only and dynamic int8)."""
    return option in FEED_OPTIONS_DYNAMIC or weight_only(option) is not None


@dataclass(frozen=True)
class WeightOnlyConfig:
    """How weight-only options are quantized and run (recorded in the plan as ``activations['weight_only']``)."""

    method: str = "gptq"  # gptq | rtn (embeddings always rtn)
    act_order: bool = True
    damp: float = 0.01
    clip: bool = True  # MSE-optimal clipping of each group's range
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute (fast on CPUs), 0 = float compute
    # per-layer least-squares refit of the group scales after rounding (compress.wquant.refit_scales): 2-5 % less
    # layer output error, but ~5 s per 1536-input layer and option on 2 cores, so off unless asked for
    refit_scales: bool = False
    calib_samples: int = 128  # Hessians need rows: K = 1536 inputs want more than a few hundred tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> WeightOnlyConfig:
        if not d:
            return cls()
        try:
            cfg = cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the plan's weight-only settings are malformed: {exc}") from None
        if cfg.method not in ("gptq", "rtn") or cfg.accuracy_level not in (0, 1, 2, 3, 4) or cfg.calib_samples < 1:
            raise ConfigError(f"the plan's weight-only settings are out of range: {d}")
        return cfg


class LowBitQuantizer:
    """Quantizes (layer, option) pairs of one float model for the feed simulator and the exporter."""

    def __init__(self, fp32, layers: Sequence[LayerInfo], calib: Dataset, config: WeightOnlyConfig, *,
                 model_sha256: str, ctx: Context, dynamic: Iterable[str] = ()) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.config = config
        self.calib = calib.take(config.calib_samples)
        self.ctx = ctx
        self.sim = FeedSimulator(fp32, layers, dynamic=dynamic, collect=True)
        self.nodes = self.sim.nodes
        # [N, K] (rows = outputs); the layout change is its own inverse
        self.weights = {n: to_graph_layout(node, self.sim.float_weights[n]) for n, node in self.nodes.items()}
        self._hessians: dict[str, np.ndarray] | None = None
        self._memo: dict[tuple[str, str], QWeight] = {}
        self._preps: dict[str, GPTQPrep] = {}
        self._prefix = json.dumps([model_sha256, self.calib.sha256(), config.to_dict(), __version__])

    # -- Hessians ---------------------------------------------------------------------------------------------
    def hessians(self) -> dict[str, np.ndarray]:
        if self._hessians is None:
            linear = [n for n, node in self.nodes.items() if node.op_type != "Gather"]
            log.info("collecting input Hessians of %d layers on %d calibration samples", len(linear), len(self.calib))
            self._hessians = self.sim.hessians(self.calib, linear)
        return self._hessians

    # -- quantization -----------------------------------------------------------------------------------------
    def _cache_path(self, layer: str, option: str) -> Path:
        key = hashlib.sha256(json.dumps([self._prefix, layer, option]).encode()).hexdigest()[:32]
        return self.ctx.cache("lowbit") / f"{key}.npz"

    def qweight(self, layer: str, option: str) -> QWeight:
        """The low-bit weight of ``layer`` under weight-only ``option`` (memoised, cached on disk)."""
        parsed = weight_only(option)
        if parsed is None:
            raise ConfigError(f"{option!r} is not a weight-only option")
        key = (layer, option)
        if key in self._memo:
            return self._memo[key]
        path = self._cache_path(layer, option)
        qw = _load(path)
        if qw is None:
            bits, group, sym = parsed
            w = self.weights[layer]
            if self.nodes[layer].op_type == "Gather" or self.config.method == "rtn":
                imp = None if self.nodes[layer].op_type == "Gather" else np.diag(self.hessians()[layer])
                qw = rtn(w, bits, group, symmetric=sym, clip=self.config.clip, importance=imp)
            else:
                if layer not in self._preps:
                    self._preps[layer] = gptq_prepare(self.hessians()[layer], damp=self.config.damp,
                                                      act_order=self.config.act_order)
                qw = gptq(w, None, bits, group, symmetric=sym, clip=self.config.clip, prep=self._preps[layer])
            if self.config.refit_scales and self.nodes[layer].op_type != "Gather":
                qw = refit_scales(qw, w, self.hessians()[layer])
            _save(path, qw)
        self._memo[key] = qw
        return qw

    def sim_weight(self, layer: str, option: str) -> np.ndarray:
        """What the simulator feeds for ``layer`` under a feed option (graph layout)."""
        if option == "w8a8d":
            return to_graph_layout(self.nodes[layer], int8_per_channel(self.weights[layer]))
        return to_graph_layout(self.nodes[layer], self.qweight(layer, option).dequantize())

    def feeds(self, choice: dict[str, str]) -> tuple[dict[str, np.ndarray], set[str]]:
        """Simulator weights and dynamic gates for a (partial) assignment; non-feed options stay float."""
        weights = {n: self.sim_weight(n, o) for n, o in choice.items() if is_feed_option(o) and n in self.nodes}
        return weights, {n for n, o in choice.items() if o == "w8a8d"}


def _save(path: Path, qw: QWeight) -> None:
    import io

    from edgekit.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    arrays = {"q": qw.q, "scales": qw.scales, "meta": np.array([qw.bits, qw.group, qw.k])}
    if qw.zeros is not None:
        arrays["zeros"] = qw.zeros
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path) -> QWeight | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            bits, group, k = (int(x) for x in z["meta"])
            return QWeight(q=z["q"], scales=z["scales"], zeros=z["zeros"] if "zeros" in z else None, bits=bits,
                           group=group, k=k)
    except Exception as exc:  # noqa: BLE001 - a bad cache entry is quantized again, never trusted
        log.warning("ignoring unreadable cached weights %s: %s", path, exc)
        return None


def anchor_options(options: Sequence[str]) -> dict[str, str]:
    """For each weight-only option of a layer, the option of the same bit-width measured through the model (the
    middle group size of that width, e.g. ``w4g64`` among w4g32/64/128); the others are scaled from it. Scaling
    stays within a bit-width: across widths the output distortion is far from proportional to the local error
    (a classifier's KL grows much faster than linearly once 2-bit errors flip predictions)."""
    by_bits: dict[int, list[str]] = {}
    for o in options:
        parsed = weight_only(o)
        if parsed:
            by_bits.setdefault(parsed[0], []).append(o)
    out = {}
    for group in by_bits.values():
        group = sorted(group, key=lambda o: weight_only(o)[1])
        anchor = group[len(group) // 2]
        out.update({o: anchor for o in group})
    return out


def local_error(quantizer: LowBitQuantizer, layer: str, option: str) -> float:
    """The layer's own output error under a weight-only option: ``tr(ΔW·H·ΔWᵀ)`` with the input Hessian for
    Linear layers (the expected squared error of the layer output), ``‖ΔW‖²`` for embeddings."""
    delta = (quantizer.qweight(layer, option).dequantize() - quantizer.weights[layer]).astype(np.float64)
    if quantizer.nodes[layer].op_type == "Gather":
        return float(np.sum(delta**2))
    return float(np.sum((delta @ quantizer.hessians()[layer]) * delta))


def measure_feed_sensitivity(quantizer: LowBitQuantizer, options: dict[str, list[str]], data: Dataset, *,
                             metric: str, ctx: Context, model_sha256: str, additivity_samples: int = 8,
                             full: bool = False) -> SensitivityTable:
    """Sensitivity of every feed option (weight-only, dynamic int8) of every layer, one layer at a time, and an
    additivity check over random multi-layer assignments of all options; cached like the static table.

    Measured through the model: dynamic int8, and per layer and bit-width one weight-only *anchor* option
    (``anchor_options``). The other group sizes of that width are scaled from the anchor by their local output error
    (``local_error``): for one layer, the model's output distortion grows in proportion to the energy of the
    perturbation of that layer's output. That cuts the model runs from (layers × options) to one per bit-width;
    the additivity check, which draws every option, measures the scaled entries as well. ``full=True`` measures
    every option instead.
    """
    from edgekit.analyze import cache_key, distortion

    feed = {n: [o for o in opts if is_feed_option(o)] for n, opts in options.items()}
    feed = {n: o for n, o in feed.items() if o}
    key = cache_key(model_sha256, data, feed, {"feed": quantizer.config.to_dict(), "full": full,
                                               "anchors": "per-bit-width"}, metric)
    cached = ctx.cache("sensitivity") / f"feed-{key}.json"
    if cached.exists():
        try:
            table = SensitivityTable.load(cached)
            if set(table.values) == set(feed):
                log.info("weight-only sensitivity table from cache (%s)", cached.name)
                return table
        except Exception as exc:  # noqa: BLE001
            log.warning("ignoring unreadable cached sensitivity table %s: %s", cached, exc)
    sim = quantizer.sim
    ref = sim.output(data)
    values: dict[str, dict[str, float]] = {}
    anchors = {n: anchor_options(opts) for n, opts in feed.items()}
    measured = [(n, o) for n, opts in feed.items() for o in opts
                if full or not weight_only(o) or anchors[n][o] == o]
    for n, o in ctx.track(measured, "sensitivity (weight-only, dynamic int8)", total=len(measured)):
        weights, gates = quantizer.feeds({n: o})
        values.setdefault(n, {"fp32": 0.0})[o] = distortion(ref, sim.output(data, weights, gates), metric)
    scaled: dict[str, dict[str, str]] = {}
    for n, opts in feed.items():
        for o in [o for o in opts if o not in values.get(n, {})]:
            anchor = anchors[n][o]
            base = local_error(quantizer, n, anchor)
            ratio = local_error(quantizer, n, o) / base if base > 0 else 1.0
            values[n][o] = values[n][anchor] * ratio
            scaled.setdefault(n, {})[o] = anchor
    additivity = _additivity(quantizer, feed, values, data, ref, metric, additivity_samples, ctx.seed)
    additivity["scaled_from_anchor"] = scaled
    table = SensitivityTable(model_sha256=model_sha256, data_sha256=data.sha256(), metric=metric, values=values,
                             additivity=additivity)
    table.save(cached)
    return table


def _additivity(quantizer, feed, values, data, ref, metric, samples: int, seed: int) -> dict:
    """The additivity check over random layer subsets, each layer with a random one of its feed options."""
    from edgekit.analyze import additivity, distortion

    rng = np.random.default_rng(seed + 1)

    def measure(subset: list[str]) -> tuple[float, float]:
        choice = {n: feed[n][int(rng.integers(len(feed[n])))] for n in subset}
        weights, gates = quantizer.feeds(choice)
        return (sum(values[n][o] for n, o in choice.items()),
                distortion(ref, quantizer.sim.output(data, weights, gates), metric))

    return additivity(sorted(feed), measure, samples, seed, what="weight-only")


def measured_scorer(quantizer: LowBitQuantizer, data: Dataset, metric: str):
    """``evaluate(choice) -> distortion`` of a whole assignment, measured by one simulator run (for ``evo``)."""
    from edgekit.analyze import distortion

    ref = quantizer.sim.output(data)

    def evaluate(choice: dict[str, str]) -> float:
        weights, gates = quantizer.feeds(choice)
        return distortion(ref, quantizer.sim.output(data, weights, gates), metric)

    return evaluate
