"""Cloud adaptation (issue 9, part 1): distill a teacher, adapted to what devices uploaded, into the deployed model's
normalization affine parameters.

Devices see a shift (new camera, weather, sensor ageing) and upload a budgeted selection of their inputs. This module
turns those uploads into a better deployed model without labels, in the spirit of CEMA ("Towards Robust and Efficient
Cloud-Edge Elastic Model Adaptation via Selective Entropy Distillation"): a stronger model in the cloud adapts to the
uploads, and the edge model is distilled from it, only on the samples the teacher is sure of.

1. **Split.** The uploads are split, by a hash of each sample's bytes, into a training part and a held-out part
   (``holdout``) that nothing is fitted on.
2. **Teacher.** The registered FP32 model (the build's original, or a larger one). Every Conv output is re-normalized
   to the statistics it has on the source data (the fleet's replay set), layer by layer in graph order, each layer
   measured with the corrections before it applied: BatchNorm statistics re-estimated on all training uploads at
   once, where a device only ever sees its own recent window. Without a replay set the teacher is used as it is.
3. **Student.** The deployed model (int8 Q/DQ graph in torch: ``agent_torch.onnx_torch.TorchGraph``, fake-quant with
   a straight-through gradient) with a per-channel ``scale``/``shift`` on each norm layer's output (the BatchNorm-
   folded Convs of the bundle's ``adapt.json``): DiffFit-style bias + scale adapters that the int8 graph absorbs into
   its weight scales and int32 biases (``normtable.overrides``), so the adapted model is exactly as fast. They start
   from the same statistics re-estimation (the bundle's source statistics against the uploads') and are then trained
   with Adam on ``KL(teacher || student)`` at temperature ``temperature`` over the training uploads whose teacher
   entropy is below ``entropy_margin · ln K`` (selective distillation: uncertain samples teach noise), each weighted by
   ``exp(margin - entropy)``, plus ``replay_weight`` times the same loss against the *unadapted* teacher on the replay
   set (the replay buffer: the source domain is not forgotten).
4. **Evaluation.** On the held-out uploads: KL to the adapted teacher and top-1 agreement with it, before (the
   deployed model) and after; on the replay set: agreement with the original teacher (what the source domain keeps).
   ``improved`` is true only if the held-out KL falls by at least ``min_gain`` (relative) and the agreement does not
   drop. Labels, when the caller has some, are only reported, never used.

Runs on the CPU in seconds for small models; torch is needed (the service's host has it, devices do not).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edgekit.errors import ConfigError

EPS = 1e-5


@dataclass
class AdaptJobConfig:
    steps: int = 150
    lr: float = 0.02
    batch: int = 64
    temperature: float = 2.0
    entropy_margin: float = 0.6  # share of ln K: teacher outputs less certain than this are not distilled
    replay_weight: float = 0.2
    holdout: float = 0.2
    min_gain: float = 0.05  # relative decrease of the held-out KL to call it an improvement
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0 or self.batch < 1 or not self.temperature > 0:
            raise ConfigError("need steps >= 0, lr > 0, batch >= 1 and temperature > 0")
        if not 0 < self.holdout < 1 or not 0 < self.entropy_margin <= 1 or self.replay_weight < 0:
            raise ConfigError("holdout is in (0, 1), entropy_margin in (0, 1], replay_weight >= 0")


@dataclass
class AdaptOutcome:
    scale: dict[str, np.ndarray]  # per norm layer (Conv node name): the correction the release absorbs
    shift: dict[str, np.ndarray]
    improved: bool
    metrics: dict = field(default_factory=dict)
    heldout_teacher_logits: np.ndarray | None = None  # what a decoded release is checked against

    def summary(self) -> dict:
        return {"improved": self.improved, **self.metrics}


def split(samples: np.ndarray, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out), by a hash of each sample's bytes: the same sample always lands on the same side."""
    keys = np.array([int(hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest()[:8], 16) / 0xFFFFFFFF
                     for s in samples])
    held = keys < holdout
    if held.all() or not held.any():  # tiny sets: at least one on each side
        order = np.argsort(keys)
        held = np.zeros(len(samples), bool)
        held[order[: max(1, int(round(holdout * len(samples))))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("cloud adaptation needs torch", hint="pip install torch==2.13.0 (CPU build)") from exc
    return torch


def _logits(graph, x, affine, out: str, batch: int = 256):
    torch = _torch()
    parts = []
    for i in range(0, len(x), batch):
        parts.append(graph.run({graph.input_names[0]: torch.from_numpy(x[i:i + batch])}, affine=affine,
                               outputs=[out])[out].reshape(min(batch, len(x) - i), -1).float())
    return torch.cat(parts)


def _channel_stats(y) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - torch tensor (N, C, ...)
    dims = [0] + list(range(2, y.ndim))
    mean = y.mean(dim=dims)
    var = ((y - mean.reshape([1, -1] + [1] * (y.ndim - 2))) ** 2).mean(dim=dims)
    return mean.double().numpy(), var.double().numpy()


def renormalize(graph, tensors: Sequence[str], target: np.ndarray, source_stats: Sequence[tuple] | None = None,
                source: np.ndarray | None = None) -> dict[str, tuple]:
    """Per-channel (scale, shift) torch tensors for each of ``tensors`` (graph order) that give the ``target``
    inputs the channel statistics of the source: ``source_stats`` [(mean, std)] or measured on ``source`` inputs.
    Layer by layer, each measured with the corrections of the layers before it."""
    torch = _torch()
    affine: dict[str, tuple] = {}
    inp = graph.input_names[0]
    with torch.no_grad():
        if source_stats is None:
            ys = graph.run({inp: torch.from_numpy(source)}, outputs=list(tensors))
            source_stats = [(m, np.sqrt(v)) for m, v in (_channel_stats(ys[t]) for t in tensors)]
        for tensor, (src_mean, src_std) in zip(tensors, source_stats, strict=True):
            y = graph.run({inp: torch.from_numpy(target)}, affine=affine, outputs=[tensor])[tensor]
            mean, var = _channel_stats(y)
            s = np.clip(np.asarray(src_std, np.float64) / np.sqrt(var + EPS), 0.05, 20.0)
            t = np.asarray(src_mean, np.float64) - s * mean
            affine[tensor] = (torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    return affine


def _kl(torch, teacher_logits, student_logits, temperature: float):
    """Per-sample KL(teacher || student) at ``temperature`` (times T², the usual gradient scale)."""
    p = torch.softmax(teacher_logits / temperature, -1)
    return (p * (torch.log_softmax(teacher_logits / temperature, -1) - torch.log_softmax(
        student_logits / temperature, -1))).sum(-1) * temperature ** 2


def _agreement(a, b) -> float:  # noqa: ANN001 - torch tensors
    return float((a.argmax(-1) == b.argmax(-1)).float().mean()) if len(a) else float("nan")


def adapt(student_model: bytes, layers: Sequence, teacher_model: bytes, uploads: np.ndarray,
          replay: np.ndarray | None = None, cfg: AdaptJobConfig | None = None,
          labels: np.ndarray | None = None) -> AdaptOutcome:
    """Distill the adapted teacher into ``layers`` (``normtable.NormLayer``s of the student) on ``uploads`` (model
    inputs, stacked on axis 0); ``replay``: source-domain inputs. See the module docstring."""
    torch = _torch()
    from edgekit.agent_torch.onnx_torch import TorchGraph

    cfg = cfg or AdaptJobConfig()
    uploads = np.ascontiguousarray(uploads, np.float32)
    if uploads.ndim < 2 or len(uploads) < 8:
        raise ConfigError(f"cloud adaptation needs at least 8 uploaded samples, not {len(uploads)}")
    if not layers:
        raise ConfigError("the deployed model has no norm layers to adapt (its bundle has no adapt.json layers)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train, held = split(uploads, cfg.holdout)
    teacher = TorchGraph(teacher_model).eval()
    student = TorchGraph(student_model).eval()
    t_out, s_out = teacher.output_names[0], student.output_names[0]
    if len(teacher.input_names) != 1 or len(student.input_names) != 1:
        raise ConfigError("cloud adaptation needs single-input models (the teacher and the deployed model)",
                          hint="models with several inputs (token ids + masks) are not adapted by this job yet")

    # 2. the teacher, re-normalized to the uploads
    if replay is not None and len(replay):
        replay = np.ascontiguousarray(replay, np.float32)
        convs = [o for o in _conv_outputs(teacher_model) if o in teacher.dynamic_tensors]
        t_affine = renormalize(teacher, convs, uploads[train], source=replay)
    else:
        t_affine = {}
    with torch.no_grad():
        t_train = _logits(teacher, uploads[train], t_affine, t_out)
        t_held = _logits(teacher, uploads[held], t_affine, t_out)
        t_replay = _logits(teacher, replay, {}, t_out) if replay is not None and len(replay) else None
        s_held0 = _logits(student, uploads[held], {}, s_out)

    # 3. the student: statistics first, then selective distillation
    tensors = [la.tensor for la in layers]
    init = renormalize(student, tensors, uploads[train],
                       source_stats=[(np.asarray(la.src_mean), np.asarray(la.src_std)) for la in layers])
    params = {t: (torch.nn.Parameter(s.clone()), torch.nn.Parameter(b.clone())) for t, (s, b) in init.items()}
    k = t_train.shape[-1]
    ent = -(torch.softmax(t_train, -1) * torch.log_softmax(t_train, -1)).sum(-1)
    margin = cfg.entropy_margin * math.log(k)
    selected = (ent < margin).numpy()
    weight = torch.exp(margin - ent).clamp(max=math.e)
    chosen = np.flatnonzero(selected)
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=cfg.lr)
    losses = []
    x_train = uploads[train]
    for _ in range(cfg.steps if len(chosen) else 0):
        idx = rng.choice(chosen, size=min(cfg.batch, len(chosen)), replace=False)
        s_logits = _logits(student, x_train[idx], params, s_out)
        w = weight[idx]
        loss = (_kl(torch, t_train[idx], s_logits, cfg.temperature) * w).sum() / w.sum()
        if t_replay is not None and cfg.replay_weight:
            r = rng.choice(len(replay), size=min(cfg.batch, len(replay)), replace=False)
            loss = loss + cfg.replay_weight * _kl(torch, t_replay[r], _logits(student, replay[r], params, s_out),
                                                  cfg.temperature).mean()
        if not torch.isfinite(loss):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s, _ in params.values():
                s.clamp_(0.05, 20.0)
        losses.append(float(loss.detach()))

    # 4. held-out evaluation
    with torch.no_grad():
        s_held = _logits(student, uploads[held], params, s_out)
        kl_before = float(_kl(torch, t_held, s_held0, 1.0).mean())
        kl_after = float(_kl(torch, t_held, s_held, 1.0).mean())
        metrics = {
            "uploads": len(uploads), "train": len(train), "held_out": len(held), "distilled": int(len(chosen)),
            "steps": len(losses), "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses
            else None, "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
            "heldout_agreement_before": _agreement(s_held0, t_held), "heldout_agreement_after": _agreement(s_held,
                                                                                                            t_held),
            "heldout_agreement_base_after": _agreement(s_held, s_held0),
            "teacher_adapted": bool(t_affine), "config": asdict(cfg),
        }
        if t_replay is not None:
            metrics["replay_agreement_before"] = _agreement(_logits(student, replay, {}, s_out), t_replay)
            metrics["replay_agreement_after"] = _agreement(_logits(student, replay, params, s_out), t_replay)
        if labels is not None:
            y = torch.as_tensor(np.asarray(labels)[held])
            metrics["heldout_accuracy_before"] = float((s_held0.argmax(-1) == y).float().mean())
            metrics["heldout_accuracy_after"] = float((s_held.argmax(-1) == y).float().mean())
            metrics["heldout_accuracy_teacher"] = float((t_held.argmax(-1) == y).float().mean())
    improved = (kl_after <= kl_before * (1 - cfg.min_gain)
                and metrics["heldout_agreement_after"] >= metrics["heldout_agreement_before"])
    by_tensor = {la.tensor: la.name for la in layers}
    scale = {by_tensor[t]: p[0].detach().double().numpy() for t, p in params.items()}
    shift = {by_tensor[t]: p[1].detach().double().numpy() for t, p in params.items()}
    return AdaptOutcome(scale, shift, improved, metrics, t_held.double().numpy())


def _conv_outputs(model_bytes: bytes) -> list[str]:
    """The output tensor of every Conv of an ONNX model, in graph order."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    return [n.output[0] for n in model.graph.node if n.op_type == "Conv"]


def heldout_metrics(teacher: np.ndarray, student: np.ndarray) -> dict:
    """Mean KL(teacher || student) at temperature 1 and top-1 agreement, in numpy (for models run in ONNX Runtime):
    the same measures ``adapt`` reports as ``heldout_kl_*`` and ``heldout_agreement_*``."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(np.asarray(teacher, np.float64)), log_softmax(np.asarray(student, np.float64))
    return {"kl": float((np.exp(lt) * (lt - ls)).sum(-1).mean()),
            "agreement": float((teacher.argmax(-1) == student.argmax(-1)).mean()), "held_out": len(teacher)}


def stack_samples(payloads: Sequence[bytes], input_name: str) -> np.ndarray:
    """Uploaded samples (the agent's ``.npz`` payloads) stacked on axis 0; unreadable ones are skipped."""
    import io

    arrays = []
    for data in payloads:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                a = z[input_name] if input_name in z.files else z[z.files[0]]
        except (ValueError, OSError, KeyError, IndexError):
            continue
        arrays.append(np.asarray(a, np.float32).reshape((-1,) + a.shape[1:])[:1])
    if not arrays:
        return np.zeros((0,), np.float32)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        common = max(shapes, key=lambda s: sum(a.shape == s for a in arrays))
        arrays = [a for a in arrays if a.shape == common]
    return np.concatenate(arrays)
