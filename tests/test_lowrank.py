"""Low rank (edgekit/compress/lowrank.py): the SVD error bound, activation-aware factors and EoRA compensation."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.compress.lowrank import activation_aware_factors, eora, factored_size, svd_factors
from edgekit.compress.wquant import hessian, rtn
from edgekit.errors import ConfigError


def _layer(seed: int = 0, n: int = 40, k: int = 64, rows: int = 400):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((rows, 6)) @ rng.standard_normal((6, k)) * 3 + 0.2 * rng.standard_normal((rows, k))
    return w, x.astype(np.float32)


def _output_error(w, approx, x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x @ (np.asarray(w, np.float64) - approx).T))


@pytest.mark.parametrize("rank", [1, 8, 30])
def test_svd_error_is_the_dropped_singular_values(rank):
    w, _ = _layer()
    u, v = svd_factors(w, rank)
    assert u.shape == (40, rank) and v.shape == (rank, 64)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(w - u @ v), np.sqrt((s[rank:] ** 2).sum()), rtol=1e-4)
    full_u, full_v = svd_factors(w, 100)  # a rank past min(N, K) is exact
    np.testing.assert_allclose(full_u @ full_v, w, atol=1e-4)
    assert factored_size(40, 64, rank) == rank * 104


def test_activation_aware_factors_beat_plain_svd_on_the_outputs():
    w, x = _layer(seed=1)
    h = hessian(x)
    for rank in (4, 8):
        u, v = svd_factors(w, rank)
        ua, va = activation_aware_factors(w, h, rank)
        assert _output_error(w, ua @ va, x) < 0.8 * _output_error(w, u @ v, x)


def test_eora_repairs_a_4bit_quantized_layer():
    w, x = _layer(seed=2)
    h = hessian(x)
    qw = rtn(w, 4, 32)
    wc = qw.dequantize()
    assert wc.shape == w.shape
    before = _output_error(w, wc, x)
    u, v = eora(w, wc, h, 8)
    after = _output_error(w, wc + u @ v, x)
    plain_u, plain_v = svd_factors(w - wc, 8)  # the same rank fitted to the weight error alone
    plain = _output_error(w, wc + plain_u @ plain_v, x)
    assert after < 0.5 * before and after < 0.8 * plain, (before, after, plain)


def test_bad_arguments():
    w, x = _layer()
    with pytest.raises(ConfigError, match="rank"):
        svd_factors(w, 0)
    with pytest.raises(ConfigError, match="inputs"):
        activation_aware_factors(w, np.eye(10), 4)
    with pytest.raises(ConfigError, match="compressed"):
        eora(w, w[:, :10], hessian(x), 4)
