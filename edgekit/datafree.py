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

import logging

import numpy as np

from edgekit.data import Dataset
from edgekit.errors import CalibrationError
from edgekit.iospec import TensorSpec

log = logging.getLogger(__name__)


def synthesize(module, inputs: tuple[TensorSpec, ...], n: int = 32, *, steps: int = 60, lr: float = 0.2,
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
                   source=f"data-free (BatchNorm statistics, {steps} steps)")


PROBE_SAMPLES = 16


def probe_samples(module, inputs: tuple[TensorSpec, ...], n: int = PROBE_SAMPLES, *, seed: int = 0,
                  track=None) -> Dataset | None:
    """``n`` BatchNorm-statistics inputs (``synthesize``) to measure structural edits on, or None (with the reason
    logged) for a model they cannot be made for: no torch module, not one float input, no BatchNorm."""
    if module is None:
        return None
    try:
        return synthesize(module, inputs, n=n, seed=seed, track=track)
    except CalibrationError as exc:
        log.info("no BatchNorm-statistics probe samples: %s", exc.message)
        return None
