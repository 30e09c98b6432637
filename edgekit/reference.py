"""What the build ships for the agent besides the model: the reference sketch for drift detection
(``sketch.json``) and the table of normalization layers the agent may adapt (``adapt.json``).

Both are measured on the exported artifact itself, with the same functions the agent runs on the device
(``edgekit.agent.scores``, ``edgekit.agent.normtable``), so the device compares like with like.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgekit.agent import normtable
from edgekit.agent.monitor import SKETCH_FILE, SKETCH_SCHEMA
from edgekit.agent.normtable import NormLayer
from edgekit.agent.scores import reference_values, sample_scores
from edgekit.data import Dataset

log = logging.getLogger(__name__)


def norm_convs(module, example: tuple) -> list[str]:
    """Names of the Conv modules of ``module`` whose output goes straight into a BatchNorm (found by running it)."""
    import torch

    conv_out: dict[int, str] = {}
    found: list[str] = []
    hooks = []
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.modules.conv._ConvNd):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: conv_out.__setitem__(id(o), name)))
        elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i: found.append(conv_out[id(i[0])]) if id(i[0]) in conv_out else None))
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(found))


_PASS_THROUGH = ("DequantizeLinear", "QuantizeLinear", "Identity", "Reshape", "Flatten", "Squeeze")
_CLASSIFIER_OPS = ("Gemm", "MatMul", "MatMulNBits", "MatMulInteger")


def feature_tensor(model) -> str | None:
    """The input of the classifier layer behind the first output (the penultimate features), if there is one."""
    prod = {o: n for n in model.graph.node for o in n.output}
    name = model.graph.output[0].name
    for _ in range(16):
        node = prod.get(name)
        if node is None:
            return None
        if node.op_type in _CLASSIFIER_OPS:
            return node.input[0]
        if node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def _runtime(path: Path | bytes):
    if isinstance(path, Path) and path.suffix == ".tflite":
        from edgekit.agent.backends import LiteRtRuntime

        return LiteRtRuntime(path)
    from edgekit.agent.runtime import OrtRuntime

    return OrtRuntime(path)


def sketch(artifact: Path, data: Dataset, task: str | None, batch: int) -> dict:
    """Reference distributions of every per-sample score on held-out data, as the artifact computes them."""
    rt = _runtime(artifact)
    parts: dict[str, list[np.ndarray]] = {}
    preds: list[np.ndarray] = []
    first = rt.output_names[0]
    for feeds in data.batches(batch):
        out = rt.run(feeds)
        logits = out[first] if task == "classification" else None
        for k, v in sample_scores(feeds, logits).items():
            parts.setdefault(k, []).append(np.asarray(v))
        if logits is not None:
            preds.append(np.asarray(logits).argmax(axis=-1).ravel())
    scores = {k: reference_values(np.concatenate(v)) for k, v in parts.items()}
    classes = None
    if preds:
        k = int(np.asarray(rt.run(next(data.batches(1)))[first]).shape[-1])
        counts = np.bincount(np.concatenate(preds), minlength=k)
        classes = [round(float(c) / counts.sum(), 6) for c in counts]
    feature = None
    if task == "classification" and Path(artifact).suffix != ".tflite":
        import onnx

        feature = feature_tensor(onnx.load(str(artifact)))
    return {"schema_version": SKETCH_SCHEMA, "task": task, "samples": len(data), "source": data.source,
            "scores": scores, "classes": classes, "feature": feature}


def adapt_table(artifact: Path, conv_names: list[str], calib: Dataset, batch: int) -> list[NormLayer]:
    """The adaptable norm layers of the artifact with their source output statistics on calibration data."""
    import onnx

    if not conv_names:
        return []
    model = onnx.load(str(artifact))
    found = normtable.locate(model, conv_names)
    if not found:
        return []
    rt = _runtime(normtable.stats_model(model, found).SerializeToString())
    names = [f"edgekit_{k}_{i}" for i in range(len(found)) for k in ("mean", "msq")]
    sums = None
    n = 0
    for feeds in calib.batches(batch):
        b = len(next(iter(feeds.values())))
        outs = rt.session.run(names, feeds)
        part = [np.asarray(o, np.float64) * b for o in outs]
        sums = part if sums is None else [a + p for a, p in zip(sums, part)]
        n += b
    stats = normtable.stats_outputs({k: v / n for k, v in zip(names, sums)}, len(found))
    layers = []
    for entry, (mean, var) in zip(found, stats):
        layers.append(NormLayer(**entry, src_mean=tuple(float(round(x, 7)) for x in mean),
                                src_std=tuple(float(round(x, 7)) for x in np.sqrt(var + 1e-12))))
    log.info("%d of %d BatchNorm-folded convolutions are adaptable on the device", len(layers), len(conv_names))
    return layers


def write(stage: Path, sketch_doc: dict, layers: list[NormLayer], calib_samples: int) -> dict:
    """Write the files into the bundle folder; returns the manifest's ``reference`` entry."""
    (Path(stage) / SKETCH_FILE).write_text(json.dumps(sketch_doc, indent=1) + "\n")
    entry = {"sketch": SKETCH_FILE, "adapt": None}
    if layers:
        normtable.save_table(Path(stage) / normtable.ADAPT_FILE, layers, samples=calib_samples)
        entry["adapt"] = normtable.ADAPT_FILE
    return entry
