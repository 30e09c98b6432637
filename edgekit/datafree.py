"""Data-free calibration: synthesize inputs whose statistics at every BatchNorm layer match that layer's running
statistics (the idea behind "Adaptive Data-Free Quantization" and ZeroQ), for models built without access to data.

The synthesized set calibrates activation ranges only. Verification still needs real held-out data, and the report
says the calibration was data-free.

``probe_samples`` makes a few such inputs for a second use: the joint allocator measures structural edits on them
beside its held-out calibration samples (``edgekit.joint``). Calibration data shows a model only what it contains; on
the built-in photos (textures, grey scientific images) pruning EfficientNet-Lite0's last blocks to half width looked
20x less harmful than it is on other photographs (relative MSE 0.004 against 0.07), and samples that match the
training distribution's BatchNorm statistics showed it (0.09).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import CalibrationError
from edgekit.fsutil import atomic_write_bytes
from edgekit.iospec import TensorSpec

log = logging.getLogger(__name__)


PROBE_STEPS = 60  # synthesize's default: what the probe samples are made with


def _source(steps: int) -> str:
    return f"data-free (BatchNorm statistics, {steps} steps)"


def synthesize(module, inputs: tuple[TensorSpec, ...], n: int = 32, *, steps: int = PROBE_STEPS, lr: float = 0.2,
               seed: int = 0, track=None) -> Dataset:
    """``n`` inputs optimised so the per-channel mean and variance entering each BatchNorm match its running stats."""
    import torch

    if len(inputs) != 1 or inputs[0].np_dtype.kind != "f":
        raise CalibrationError("data-free calibration works for models with one float input",
                               hint="pass --calib with real samples")
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    if not bns:
        raise CalibrationError("data-free calibration needs BatchNorm statistics, and this model has no BatchNorm",
                               hint="pass --calib with real (or representative) samples")
    stats: list[tuple] = []

    def hook(bn, args, _out):
        x = args[0]
        dims = [d for d in range(x.ndim) if d != 1]
        stats.append((x.mean(dim=dims), x.var(dim=dims, unbiased=False), bn.running_mean, bn.running_var))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *inputs[0].sample_shape), generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    was_training = module.training
    module.eval()
    grads = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in grads:  # only the inputs are optimised
        p.requires_grad_(False)
    loss_value = float("nan")
    try:
        for _ in (track(range(steps), "data-free calibration", total=steps) if track else range(steps)):
            stats.clear()
            opt.zero_grad()
            module(x)
            if not stats:
                raise CalibrationError("no BatchNorm layer runs in this model's forward pass",
                                       hint="pass --calib with real samples")
            loss = sum(((m - rm) ** 2).mean() / (rv.mean() + 1e-5) + ((v - rv) ** 2).mean() / (rv.mean() ** 2 + 1e-5)
                       for m, v, rm, rv in stats) / len(stats)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        module.train(was_training)
    log.info("data-free calibration: %d inputs, BatchNorm statistics loss %.4f after %d steps", n, loss_value, steps)
    arr = x.detach().numpy().astype(np.float32)
    return Dataset(name="data-free", inputs={inputs[0].name: arr}, labels=None,
                   source=_source(steps))


PROBE_SAMPLES = 16


def probe_samples(module, inputs: tuple[TensorSpec, ...], n: int = PROBE_SAMPLES, *, seed: int = 0,
                  track=None, cache: Path | None = None, model_sha256: str | None = None) -> Dataset | None:
    """``n`` BatchNorm-statistics inputs (``synthesize``) to measure structural edits on, or None (with the reason
    logged) for a model they cannot be made for: no torch module, not one float input, no BatchNorm.

    With a ``cache`` folder and the model's ``model_sha256`` the samples are kept there (``probe_cache_path``) and
    read back by the next call for the same model, inputs, count, seed and edgekit version (they take about a
    minute for EfficientNet-Lite0, on every ``--space joint`` build)."""
    if module is None:
        return None
    path = None if cache is None or model_sha256 is None else probe_cache_path(cache, model_sha256, inputs, n, seed)
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                arr = z["input"]
            if arr.shape == (n, *inputs[0].sample_shape) and arr.dtype == np.float32:
                log.info("BatchNorm-statistics probe samples from cache (%s)", path.name)
                return Dataset(name="data-free", inputs={inputs[0].name: arr}, labels=None,
                               source=_source(PROBE_STEPS))
        except (OSError, ValueError, KeyError) as exc:
            log.info("probe cache %s unreadable (%s): making the samples again", path.name, exc)
    try:
        probe = synthesize(module, inputs, n=n, seed=seed, track=track)
    except CalibrationError as exc:
        log.info("no BatchNorm-statistics probe samples: %s", exc.message)
        return None
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, input=probe.inputs[inputs[0].name])
        atomic_write_bytes(path, buf.getvalue())
    return probe


def probe_cache_path(cache: Path, model_sha256: str, inputs: tuple[TensorSpec, ...], n: int, seed: int) -> Path:
    """Where ``probe_samples`` keeps the samples of one model: named by a digest of everything they depend on."""
    from edgekit import __version__

    blob = json.dumps([model_sha256, [(i.name, list(i.sample_shape), str(i.np_dtype)) for i in inputs], n, seed,
                       PROBE_STEPS, __version__])
    return Path(cache) / f"probe-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.npz"
