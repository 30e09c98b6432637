"""Verification: run an artifact with its runtime on held-out data and compare it with the original model.

Per output: SQNR (dB), mean cosine similarity, max-abs error, and top-1 agreement for classifiers; accuracy of
both when labels exist. Pass/fail against the target profile's tolerances for the plan's precision.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import VerificationFailed
from edgekit.iospec import Artifact

log = logging.getLogger(__name__)

_SQNR_CAP = 200.0  # dB reported for bit-identical outputs (keeps JSON finite)
BATCH = 16


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    max_abs: float
    top1_agreement: float | None = None
    # top-1 agreement per source of the samples (Dataset.groups / group_names, e.g. each photograph of the built-in
    # photos), in the sources' order: where a failure concentrates (one photograph can hold most of the disagreement)
    top1_by_group: dict[str, float] | None = None


@dataclass(frozen=True)
class VerificationReport:
    artifact_sha256: str
    runtime: str
    samples: int
    data_source: str
    tolerance_class: str
    tolerances: dict
    outputs: tuple[OutputMetrics, ...]
    accuracy_reference: float | None = None
    accuracy: float | None = None
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.accuracy_reference is None:
            return None
        return self.accuracy_reference - self.accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outputs"] = [asdict(o) for o in self.outputs]
        d["failures"] = list(self.failures)
        d["passed"] = self.passed
        d["accuracy_drop"] = self.accuracy_drop
        return d

    def summary(self) -> str:
        if not self.outputs:
            return f"no comparable outputs ({'; '.join(self.failures)}) — FAIL"
        o = self.outputs[0]
        parts = [f"SQNR {o.sqnr_db:.1f} dB", f"cosine {o.cosine:.4f}"]
        if o.top1_agreement is not None:
            parts.append(f"top-1 agreement {o.top1_agreement:.1%}")
        if o.top1_by_group:
            worst = min(o.top1_by_group, key=o.top1_by_group.get)
            parts.append(f"lowest on {worst} ({o.top1_by_group[worst]:.1%})")
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.1%} (original {self.accuracy_reference:.1%})")
        return ", ".join(parts) + f" on {self.samples} samples — {'PASS' if self.passed else 'FAIL'}"

    def save(self, path: Path) -> Path:
        from edgekit.fsutil import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0:
        return _SQNR_CAP
    if signal == 0.0:
        return -_SQNR_CAP
    return min(_SQNR_CAP, 10.0 * math.log10(signal / noise))


def sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Each sample's cosine between ``out`` and ``ref`` (rows along the first axis; two zero rows agree: 1)."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))


def mean_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    return float(sample_cosines(ref, out).mean())


def compare(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, classification: bool,
    labels: np.ndarray | None, tolerances, tolerance_class: str, artifact: Artifact, data_source: str,
    groups: np.ndarray | None = None, group_names: tuple[str, ...] | None = None,
) -> VerificationReport:
    """Compare candidate outputs with the reference and judge them against ``tolerances`` (a targets.Tolerances).

    With ``groups`` (one source id per sample, ``Dataset.groups``) a classification output's top-1 agreement is also
    reported per source (named by ``group_names`` where given); it informs, the tolerances judge the whole set."""
    outputs, failures = [], []
    acc_ref = acc = None
    for name, ref in reference.items():
        if name not in candidate:
            failures.append(f"output {name!r} missing from the artifact")
            continue
        out = candidate[name]
        if out.shape != ref.shape:
            failures.append(f"output {name!r} has shape {out.shape}, the original {ref.shape}")
            continue
        if not np.all(np.isfinite(out)):
            failures.append(f"output {name!r} contains NaN or Inf")
        agree = None
        if classification and ref.ndim == 2:
            agree = float((out.argmax(1) == ref.argmax(1)).mean())
            if labels is not None and acc is None:
                acc_ref = float((ref.argmax(1) == labels).mean())
                acc = float((out.argmax(1) == labels).mean())
        by_group = None
        if agree is not None and groups is not None and len(groups) == len(ref):
            by_group = agreement_by_group(ref.argmax(1) == out.argmax(1), groups, group_names)
        m = OutputMetrics(name, sqnr_db(ref, out), mean_cosine(ref, out), float(np.max(np.abs(ref - out))), agree,
                          by_group)
        outputs.append(m)
        if m.sqnr_db < tolerances.min_sqnr_db:
            failures.append(f"{name}: SQNR {m.sqnr_db:.1f} dB < {tolerances.min_sqnr_db} dB")
        if m.cosine < tolerances.min_cosine:
            failures.append(f"{name}: cosine {m.cosine:.4f} < {tolerances.min_cosine}")
        if agree is not None and tolerances.min_top1_agreement is not None and agree < tolerances.min_top1_agreement:
            failures.append(f"{name}: top-1 agreement {agree:.1%} < {tolerances.min_top1_agreement:.0%}")
    if acc is not None and tolerances.max_accuracy_drop is not None and acc_ref - acc > tolerances.max_accuracy_drop:
        failures.append(f"accuracy dropped {acc_ref - acc:.1%} (> {tolerances.max_accuracy_drop:.1%} allowed)")
    return VerificationReport(
        artifact_sha256=artifact.sha256, runtime=artifact.runtime, samples=len(next(iter(reference.values()))),
        data_source=data_source, tolerance_class=tolerance_class, tolerances=tolerances.model_dump(),
        outputs=tuple(outputs), accuracy_reference=acc_ref, accuracy=acc, failures=tuple(failures),
    )


def agreement_by_group(agree: np.ndarray, groups: np.ndarray, names: tuple[str, ...] | None = None,
                       ) -> dict[str, float] | None:
    """Share of agreeing samples per group id, keyed by name (``names[id]``) or by the id as text, in id order; None
    for fewer than two groups (nothing to break down)."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        return None
    key = (lambda g: names[g]) if names is not None else str
    return {key(int(g)): round(float(np.mean(agree[groups == g])), 4) for g in ids}


def run_artifact(artifact: Artifact, data: Dataset, ctx: Context) -> dict[str, np.ndarray]:
    """Run an artifact over the whole dataset: a ``tflite`` one in LiteRT (float32 in and out, quantized I/O
    converted by ``LiteRtRuntime``), anything else in ONNX Runtime."""
    from edgekit.model import batch_size

    if artifact.format == "tflite":
        from edgekit.agent.backends import LiteRtRuntime

        rt = LiteRtRuntime(artifact.path)
    else:
        from edgekit.agent.runtime import OrtRuntime

        rt = OrtRuntime(artifact.path)
    bs = batch_size(artifact.inputs, BATCH)
    return rt.run_batches(ctx.track(data.batches(bs), "verifying", total=math.ceil(len(data) / bs)))


def run_reference(model, data: Dataset, ctx: Context) -> dict[str, np.ndarray]:
    """Outputs of the original model (torch module, or the source ONNX in ONNX Runtime)."""
    from edgekit.model import batch_size

    bs = batch_size(model.inputs, BATCH)
    if model.onnx_path is not None:
        from edgekit.agent.runtime import OrtRuntime

        return OrtRuntime(model.onnx_path).run_batches(data.batches(bs))
    import torch

    parts: list[np.ndarray] = []
    with torch.no_grad():
        for feeds in ctx.track(data.batches(bs), "reference", total=math.ceil(len(data) / bs)):
            out = model.module(*[torch.from_numpy(feeds[s.name]) for s in model.inputs])
            if isinstance(out, dict):  # e.g. a Hugging Face ModelOutput: its first field
                out = next(iter(out.values()))
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                from edgekit.errors import ModelLoadError

                raise ModelLoadError(f"the model returned {type(out).__name__}, not a tensor",
                                     hint="wrap it so forward() returns a tensor (or a tuple of tensors)")
            parts.append(out.detach().numpy())
    return {model.output_names[0]: np.concatenate(parts)}


def verify_artifact(
    artifact: Artifact, data: Dataset, reference: dict[str, np.ndarray], *, tolerances, tolerance_class: str,
    classification: bool, ctx: Context,
) -> VerificationReport:
    candidate = run_artifact(artifact, data, ctx)
    # the artifact may name its outputs differently from the original: pair them by position
    if set(candidate) != set(reference) and len(candidate) == len(reference):
        candidate = dict(zip(reference, candidate.values()))
    return compare(
        reference, candidate, classification=classification, labels=data.labels, tolerances=tolerances,
        tolerance_class=tolerance_class, artifact=artifact, data_source=data.source, groups=data.groups,
        group_names=data.group_names,
    )


def require_pass(report: VerificationReport) -> None:
    if not report.passed:
        raise VerificationFailed(
            "verification failed: " + "; ".join(report.failures), report=report,
            hint="pass --allow-unverified to bundle it anyway, or use a less aggressive --precision",
        )
