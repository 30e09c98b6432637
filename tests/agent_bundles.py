"""Small bundles for the agent's tests (built once per test session from tests/fixtures_models.py)."""

from __future__ import annotations

import numpy as np

from tests.fixtures_models import INPUT_SHAPE


def inputs(n: int, seed: int = 0, *, shift: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """Random inputs in the fixtures' layout; ``shift``/``gain`` make a covariate-shifted stream."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *INPUT_SHAPE[1:])) * gain + shift).astype(np.float32)


def build_bundles(root, key=None) -> dict:
    """``v1``: tiny_bn_cnn INT8; ``v2``: the same model FP32 (agrees with v1); ``bad``: other weights (disagrees).
    Returns {name: .ekb path}."""
    from edgekit.build import BuildRequest, build
    from edgekit.context import Context

    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.npz"
    np.savez(calib, input=inputs(64, seed=1))
    specs = {"v1": ("fixtures_models:tiny_bn_cnn", "int8", 1), "v2": ("fixtures_models:tiny_bn_cnn", "fp32", 2),
             "bad": ("fixtures_models:tiny_bn_cnn_other", "int8", 3)}
    out = {}
    for name, (model, precision, version) in specs.items():
        req = BuildRequest(model=model, out=root / name, input_shapes=(INPUT_SHAPE,), calib=str(calib),
                           precision=precision, bundle_version=version, name="tiny", measure_latency=False,
                           key=key, allow_unverified=name == "bad")
        out[name] = build(req, Context(seed=0)).archive
    return out
