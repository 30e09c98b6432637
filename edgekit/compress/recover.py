"""Recovery fine-tuning after structural compression (``--recover N``): a short knowledge-distillation pass.

Channel pruning, layer removal and low-rank factorization change an FP32 model's function; a few hundred steps of
distillation from the original model on the calibration data win much of the lost accuracy back.

Method. The compressed ONNX model (the *student*) runs in torch through edgekit's ONNX -> torch interpreter
(``edgekit.agent_torch.onnx_torch.TorchGraph``), with its weighted layers' float initializers held as parameters:
the weight of every Conv, Gemm and MatMul and their biases (Conv/Gemm's third input, the initializer of an Add that
follows a MatMul). Everything else (BatchNorm statistics left in the graph, shape constants, quantization
parameters, activations' ranges) stays frozen. Adam (``lr``) minimises the distortion of the first graph output
against the teacher's on mini-batches of ``batch`` calibration samples, drawn in a seeded random order:

    loss = mean((student - teacher)²) / mean(teacher²)    (+ ``kl_weight`` · KL(softmax(teacher) || softmax(student)))

The first term is the repo's ``"mse"`` distortion (``edgekit.analyze.distortion``), so losses compare with the
sensitivity tables. The teacher's outputs are computed once with ONNX Runtime on the original model
(``teacher_outputs``). Samples are concatenated along axis 0 when the graph's batch dimension is symbolic; a graph
with a fixed batch (or one whose output does not keep the batch) is run one sample at a time, gradients accumulated.

Held-out part and the no-regression rule. The last eighth of the feeds (at least one) is never trained on;
``loss_before`` and ``loss_after`` are the loss over it before and after training. If training made it worse (or
diverged to a non-finite loss), the original weights are returned and ``kept_original`` says so.

The result is a copy of the student with the trained values written back into the same initializers (same names,
shapes, float32), so it exports and quantizes like any other model.

Cost (measured on a shared 2-core CPU box): EfficientNet-Lite0 at 224², batch 8, ~0.7 s per step uncontended
(2-20 s while other jobs ran). With 64 calibration crops, a damaged Lite0's held-out loss fell 1.60 -> 0.16 in
60 steps but only 1.48 -> 0.74 on photographs from other sources: the held-out eighth comes from the same
calibration images, so with little calibration data ``loss_after`` overstates the gain.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import ConfigError

if TYPE_CHECKING:
    import onnx

Feeds = Sequence[Mapping[str, np.ndarray]]
TeacherFn = Callable[[Mapping[str, np.ndarray]], object]
Progress = Callable[[int, int, float], None]

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
HOLDOUT_FRACTION = 8  # the last 1/8 of the feeds (at least one) is held out


class RecoveryError(ConfigError, ValueError):
    """Bad arguments to ``recover``, or a model it cannot fine-tune."""


@dataclass(frozen=True)
class RecoveryResult:
    """``model``: the student with its trained weights (or the original ones, ``kept_original``). ``steps``: the
    optimizer steps taken (fewer than asked when the loss went non-finite). ``loss_before``/``loss_after``: the
    distillation loss on the held-out feeds before and after training (``loss_after`` is the trained weights' loss
    even when they were rejected; ``loss`` is the returned model's). ``trained``: the initializers trained."""

    model: onnx.ModelProto
    steps: int
    loss_before: float
    loss_after: float
    seconds: float
    kept_original: bool = False
    trained: tuple[str, ...] = ()

    @property
    def loss(self) -> float:
        """The held-out loss of the returned model."""
        return self.loss_before if self.kept_original else self.loss_after


# --------------------------------------------------------------------------------------------------- helpers


def _load(model) -> onnx.ModelProto:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes | bytearray):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, str | Path):
        return onnx.load(str(model))
    raise RecoveryError(f"expected an onnx.ModelProto, bytes or a path, got {type(model).__name__}")


def teacher_outputs(model: onnx.ModelProto | bytes | str | Path, feeds: Feeds) -> list[np.ndarray]:
    """The first output of ``model`` (the uncompressed original) for every feed, with ONNX Runtime on the CPU.

    Aligned with ``feeds``; what ``recover`` takes as its teacher."""
    import onnxruntime as ort

    if isinstance(model, str | Path):
        source = str(model)
    else:
        source = model.SerializeToString() if not isinstance(model, bytes | bytearray) else bytes(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    first = sess.get_outputs()[0].name
    out = []
    for k, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        if missing:
            raise RecoveryError(f"feed {k} lacks graph inputs {missing} (inputs: {names})")
        out.append(np.asarray(sess.run([first], {n: np.asarray(feed[n]) for n in names})[0]))
    return out


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """The float initializers ``recover`` trains: weights and biases of Conv, Gemm and MatMul (a MatMul's bias is
    the initializer of an Add that consumes the MatMul's output), in graph order."""
    from onnx import TensorProto

    graph = model.graph
    floats = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    names: list[str] = []

    def add(t: str) -> None:
        if t in floats and t not in names:
            names.append(t)

    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHTED_OPS:
            continue
        if node.op_type == "Conv":
            for t in node.input[1:3]:
                add(t)
        elif node.op_type == "Gemm":
            for t in node.input[1:3]:
                add(t)
        else:  # MatMul: either side may be the weight
            for t in node.input:
                add(t)
            for nxt in consumers.get(node.output[0], []):
                if nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx"):
                    for t in nxt.input:
                        add(t)
    return names


def _batch_is_symbolic(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return True


def _teacher_arrays(teacher: Sequence[np.ndarray] | TeacherFn, feeds: Feeds) -> list[np.ndarray]:
    if callable(teacher):
        arrays = []
        for feed in feeds:
            value = teacher(feed)
            if isinstance(value, Mapping):
                value = next(iter(value.values()))
            elif isinstance(value, list | tuple):
                value = value[0]
            arrays.append(value)
    else:
        arrays = list(teacher)
        if len(arrays) != len(feeds):
            raise RecoveryError(f"{len(arrays)} teacher outputs for {len(feeds)} feeds: they must be aligned")
    return [np.asarray(a, np.float32) for a in arrays]


class _Student:
    """The student graph in torch, the objective, and batched or per-sample execution."""

    def __init__(self, model: onnx.ModelProto, trainable: Sequence[str], kl_weight: float, norm: float) -> None:
        from edgekit.agent_torch.onnx_torch import TorchGraph, UnsupportedOpError

        try:
            self.graph = TorchGraph(model, trainable=trainable)
        except UnsupportedOpError as exc:
            raise RecoveryError(f"cannot fine-tune this model: {exc}",
                                hint="recovery runs the ONNX model through edgekit's ONNX->torch interpreter, "
                                     "which lacks this op; build without --recover (or 0)") from exc
        except (ValueError, RuntimeError) as exc:
            raise RecoveryError(f"cannot fine-tune this model: {exc}") from exc
        self.output = self.graph.output_names[0]
        self.inputs = self.graph.input_names
        self.symbolic = _batch_is_symbolic(model)
        self.kl_weight = float(kl_weight)
        self.norm = norm

    def _run(self, feed: Mapping[str, np.ndarray]):
        try:
            return self.graph.run(feed, outputs=[self.output])[self.output]
        except RuntimeError as exc:
            raise RecoveryError(f"the ONNX->torch interpreter failed on this model: {exc}") from exc

    def run_one(self, feed: Mapping[str, np.ndarray]):
        return self._run({n: np.asarray(feed[n]) for n in self.inputs})

    def run_batched(self, feeds: Feeds, idx: Sequence[int]):
        """The student output for ``feeds[idx]`` concatenated along axis 0, or None where the graph cannot take
        them at once (a fixed batch dimension, or an output that does not keep the batch, e.g. a fixed Reshape;
        then ``symbolic`` turns off and callers go one sample at a time)."""
        if not self.symbolic or len(idx) < 2:
            return None
        cat = {n: np.concatenate([np.asarray(feeds[i][n]) for i in idx], axis=0) for n in self.inputs}
        try:
            out = self._run(cat)
        except RecoveryError:
            out = None
        rows = sum(len(np.asarray(feeds[i][self.inputs[0]])) for i in idx)
        if out is not None and out.ndim and out.shape[0] == rows:
            return out
        self.symbolic = False
        return None

    def objective(self, student, teacher):
        import torch
        import torch.nn.functional as F

        if tuple(student.shape) != tuple(teacher.shape):
            raise RecoveryError(f"student output {self.output!r} has shape {tuple(student.shape)}, the teacher's "
                                f"{tuple(teacher.shape)}: the teacher outputs must be the original model's")
        loss = torch.mean((student - teacher) ** 2) / self.norm
        if self.kl_weight:
            s = student.reshape(len(student), -1)
            t = teacher.reshape(len(teacher), -1)
            kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
            loss = loss + self.kl_weight * kl
        return loss

    def evaluate(self, feeds: Feeds, teacher: list[np.ndarray], idx: Sequence[int], batch: int) -> float:
        """The objective over ``feeds[idx]`` (float64; the mse term is ``analyze.distortion(..., "mse")``)."""
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(idx), batch):
                part = idx[i:i + batch]
                out = self.run_batched(feeds, part)
                outs += [out] if out is not None else [self.run_one(feeds[j]) for j in part]
        outs = [o.detach().cpu().numpy() for o in outs]
        got = np.concatenate(outs, axis=0).astype(np.float64)
        ref = np.concatenate([teacher[i] for i in idx], axis=0).astype(np.float64)
        if got.shape != ref.shape:
            raise RecoveryError(f"student output {self.output!r} has shape {got.shape[1:]} per sample, the "
                                f"teacher's {ref.shape[1:]}: the teacher outputs must be the original model's")
        loss = float(np.mean((ref - got) ** 2) / max(np.mean(ref**2), 1e-30))
        if self.kl_weight:
            r, g = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
            lp = r - r.max(1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(1, keepdims=True))
            lq = g - g.max(1, keepdims=True)
            lq -= np.log(np.exp(lq).sum(1, keepdims=True))
            loss += self.kl_weight * float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
        return loss


def _write_back(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            arr = np.asarray(values[init.name], np.float32)
            if tuple(arr.shape) != tuple(init.dims):
                raise AssertionError(f"{init.name}: trained shape {arr.shape} != {tuple(init.dims)}")
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# ------------------------------------------------------------------------------------------------------ recover


def recover(
    student: onnx.ModelProto,
    teacher_outputs: Sequence[np.ndarray] | TeacherFn,
    feeds: Feeds,
    *,
    steps: int,
    lr: float = 1e-4,
    batch: int = 8,
    seed: int = 0,
    kl_weight: float = 0.0,
    progress: Progress | None = None,
) -> RecoveryResult:
    """Fine-tune ``student``'s weighted layers for ``steps`` Adam steps to match the teacher on ``feeds``.

    ``teacher_outputs``: the original model's first output for every feed (``teacher_outputs(original, feeds)``),
    or a callable ``feed -> output``, evaluated once per feed. ``feeds``: per-sample ``{input: array}`` dicts with a
    leading batch dimension of 1; the last eighth (at least one) is held out for ``loss_before``/``loss_after`` and
    never trained on. ``progress(step, steps, training_loss)`` is called after every step. ``steps=0`` returns an
    unchanged copy (with its held-out loss). See the module docstring for the no-regression rule."""
    import torch

    start = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RecoveryError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise RecoveryError(f"batch must be a positive integer, got {batch!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise RecoveryError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(kl_weight, int | float) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise RecoveryError(f"kl_weight must be a non-negative finite number, got {kl_weight!r}")
    feeds = list(feeds)
    if not feeds:
        raise RecoveryError("recover needs calibration feeds, got none")
    holdout = max(1, len(feeds) // HOLDOUT_FRACTION)
    train_idx = list(range(len(feeds) - holdout))
    held_idx = list(range(len(feeds) - holdout, len(feeds)))
    if steps and not train_idx:
        raise RecoveryError(f"{len(feeds)} feed(s) leave none to train on after holding out {holdout}: "
                            "pass at least 2")
    model = _load(student)
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    for k, feed in enumerate(feeds):
        missing = sorted(inputs - set(feed))
        if missing:
            raise RecoveryError(f"feed {k} lacks graph inputs {missing} (inputs: {sorted(inputs)})")
    teacher = _teacher_arrays(teacher_outputs, feeds)
    trainable = trainable_initializers(model)
    if steps and not trainable:
        raise RecoveryError("the model has no float Conv/Gemm/MatMul weight initializers to fine-tune")

    norm = float(np.mean(np.concatenate([teacher[i].reshape(-1) for i in (train_idx or held_idx)]) ** 2))
    net = _Student(model, trainable, kl_weight, max(norm, 1e-30))
    loss_before = net.evaluate(feeds, teacher, held_idx, batch)
    if steps == 0:
        return RecoveryResult(_copy(model), 0, loss_before, loss_before, time.perf_counter() - start, False,
                              tuple(net.graph.initializer_parameters()))

    params = net.graph.initializer_parameters()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(list(params.values()), lr=float(lr))
        rng = np.random.default_rng(seed)
        queue: list[int] = []
        b = min(batch, len(train_idx))
        taken, finite = 0, True
        t_teacher = [torch.from_numpy(t) for t in teacher]
        for step in range(1, steps + 1):
            while len(queue) < b:
                queue += [train_idx[i] for i in rng.permutation(len(train_idx))]
            idx, queue = queue[:b], queue[b:]
            opt.zero_grad(set_to_none=True)
            out = net.run_batched(feeds, idx)
            if out is not None:
                loss = net.objective(out, torch.cat([t_teacher[i] for i in idx]))
                loss.backward()
                value = float(loss.detach())
            else:  # one sample at a time: accumulate the gradient of the mean
                value = 0.0
                for i in idx:
                    part = net.objective(net.run_one(feeds[i]), t_teacher[i]) / len(idx)
                    part.backward()
                    value += float(part.detach())
            if not math.isfinite(value):
                finite = False
                break
            opt.step()
            taken = step
            if progress is not None:
                progress(step, steps, value)

    loss_after = net.evaluate(feeds, teacher, held_idx, batch) if finite else math.inf
    if not math.isfinite(loss_after):
        finite = False
    kept = not finite or loss_after > loss_before
    if kept:
        out = _copy(model)
    else:
        out = _write_back(model, {n: p.detach().cpu().numpy() for n, p in params.items()})
    return RecoveryResult(out, taken, loss_before, loss_after, time.perf_counter() - start, kept, tuple(params))
