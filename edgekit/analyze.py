"""Sensitivity: how much the model output moves when one layer is compressed, measured on calibration data.

For every layer and option the model is run with only that layer compressed (a simulated mixed model from
``compress.qdq.insert``, built from the *real* quantizer's output) and its output compared with the float model's:
KL divergence of the softmax for classifiers, normalised MSE otherwise. The additivity check then measures random
multi-layer combinations and compares them with the sum of their single-layer distortions: additive distortions
make the knapsack solvers exact; poor additivity sends ``auto`` to the evolutionary solver. Tables are cached by
(model, data, options, quantizer settings), so a rebuild with another budget does not measure again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekit import __version__
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.inventory import LayerInfo, graph_batch_size
from edgekit.tables import SensitivityTable

log = logging.getLogger(__name__)

BATCH = 16


def distortion(ref: np.ndarray, out: np.ndarray, metric: str) -> float:
    """Mean KL(softmax(ref) || softmax(out)) over samples (``kl``), or MSE / mean square of ref (``mse``)."""
    return float(np.mean(sample_distortions(ref, out, metric)))


def sample_distortions(ref: np.ndarray, out: np.ndarray, metric: str) -> np.ndarray:
    """``distortion`` per sample (its mean is ``distortion``): KL(softmax(ref_i) || softmax(out_i)) for ``kl``;
    for ``mse`` each sample's mean squared error over the mean square of all of ``ref``."""
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    out = out.astype(np.float64).reshape(len(out), -1)
    if metric == "kl":
        lp = ref - ref.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        lq = out - out.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        return np.sum(np.exp(lp) * (lp - lq), axis=1)
    return np.mean((ref - out) ** 2, axis=1) / max(np.mean(ref**2), 1e-30)


def _run(model_proto, data: Dataset) -> np.ndarray:
    from edgekit.agent.runtime import OrtRuntime

    rt = OrtRuntime(model_proto.SerializeToString())
    return next(iter(rt.run_batches(data.batches(graph_batch_size(model_proto, BATCH))).values()))


def cache_key(model_sha256: str, data: Dataset, options: dict, quantizer: dict, metric: str) -> str:
    blob = json.dumps([model_sha256, data.sha256(), options, quantizer, metric, __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def measure_sensitivity(
    fp32_path: Path, quantized_path: Path, layers: Sequence[LayerInfo], calib: Dataset, *, metric: str,
    model_sha256: str, quantizer: dict, ctx: Context, options: dict[str, Sequence[str]] | None = None,
    additivity_samples: int = 8, extra: dict[str, Path] | None = None,
) -> SensitivityTable:
    """The sensitivity table of ``layers`` for the ``options`` each may take (default: fp32 and w8a8 everywhere);
    cached under the context's cache folder. ``extra`` maps further static options (``w4a8``) to a model in which
    every layer takes that option: their rows are cut from it as ``w8a8``'s are from ``quantized_path``."""
    options = {layer.name: list(options[layer.name]) if options else ["fp32", "w8a8"] for layer in layers}
    import onnx

    from edgekit.compress.qdq import insert

    key = cache_key(model_sha256, calib, options, quantizer, metric)
    cached = ctx.cache("sensitivity") / f"{key}.json"
    if cached.exists():
        try:
            table = SensitivityTable.load(cached)
            if set(table.values) == {layer.name for layer in layers}:
                log.info("sensitivity table from cache (%s)", cached.name)
                return table
        except Exception as exc:  # noqa: BLE001 - a bad cache entry is measured again, never trusted
            log.warning("ignoring unreadable cached sensitivity table %s: %s", cached, exc)
    fp32 = onnx.load(str(fp32_path))
    q_full = onnx.load(str(quantized_path))
    ref = _run(fp32, calib)
    others = {option: onnx.load(str(path)) for option, path in (extra or {}).items()}
    values: dict[str, dict[str, float]] = {}
    for layer in ctx.track(list(layers), "sensitivity", total=len(layers)):
        row = {"fp32": 0.0}
        if "w8a8" in options[layer.name]:
            row["w8a8"] = distortion(ref, _run(insert(fp32, q_full, [layer.name]), calib), metric)
        for option, q_model in others.items():
            if option in options[layer.name]:
                row[option] = distortion(ref, _run(insert(fp32, q_model, [layer.name]), calib), metric)
        values[layer.name] = row
    additivity = check_additivity(fp32, q_full, values, calib, ref, metric, additivity_samples, ctx.seed)
    table = SensitivityTable(model_sha256=model_sha256, data_sha256=calib.sha256(), metric=metric, values=values,
                             additivity=additivity)
    table.save(cached)
    return table


def check_additivity(fp32, q_full, values, calib, ref, metric, samples: int, seed: int) -> dict:
    """Joint distortion of random layer subsets vs the sum of their single-layer distortions."""
    from edgekit.compress.qdq import insert

    names = [n for n, row in values.items() if "w8a8" in row]

    def measure(subset: list[str]) -> tuple[float, float]:
        return (sum(values[n]["w8a8"] for n in subset),
                distortion(ref, _run(insert(fp32, q_full, sorted(subset)), calib), metric))

    return additivity(names, measure, samples, seed, what="static int8")


def additivity(names: Sequence[str], measure, samples: int, seed: int, *, what: str) -> dict:
    """Draw ``samples`` random subsets of ``names`` (2 to half of them) and compare, for each,
    ``measure(subset) -> (sum of single-layer distortions, measured joint distortion)``: Pearson correlation and
    mean relative error, plus the points (for the report's scatter)."""
    names = list(names)
    if len(names) < 2 or samples <= 0:
        return {"samples": 0}
    rng = np.random.default_rng(seed)
    predicted, measured, sizes = [], [], []
    for _ in range(samples):
        k = int(rng.integers(2, max(3, len(names) // 2 + 1)))
        subset = rng.choice(names, size=min(k, len(names)), replace=False).tolist()
        pred, meas = measure(subset)
        predicted.append(pred)
        measured.append(meas)
        sizes.append(len(subset))
    p, m = np.asarray(predicted), np.asarray(measured)
    r = float(np.corrcoef(p, m)[0, 1]) if np.std(p) > 0 and np.std(m) > 0 else float("nan")
    rel = float(np.mean(np.abs(m - p) / np.maximum(m, 1e-12)))
    log.info("%s additivity: pearson %.3f, mean relative error %.1f%% over %d mixes", what, r, 100 * rel, samples)
    return {"samples": samples, "pearson": r, "mean_rel_error": rel, "subset_sizes": sizes,
            "predicted": [float(x) for x in p], "measured": [float(x) for x in m]}
