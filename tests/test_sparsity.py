"""Sparsity masks and SparseGPT (edgekit/compress/sparsity.py) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.compress.sparsity import nm_mask, pq_index, sparsegpt, sparsity_of, unstructured_mask, wanda_scores
from edgekit.compress.wquant import hessian
from edgekit.errors import ConfigError


def _layer(seed: int = 0, n: int = 48, k: int = 64, rows: int = 512):
    """A weight and correlated calibration inputs (a few strong directions, one loud feature), as real activations."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((rows, 8)) @ rng.standard_normal((8, k)) + 0.3 * rng.standard_normal((rows, k))
    x[:, 5] *= 20.0
    return w, x.astype(np.float32)


def _output_error(w: np.ndarray, pruned: np.ndarray, x: np.ndarray) -> float:
    """Relative error of the layer's outputs on the calibration inputs."""
    ref = x @ w.T
    return float(np.linalg.norm(x @ pruned.T - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_the_n_largest_of_every_m(n, m):
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((16, 32))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(16, 32 // m, m)
    assert (groups.sum(axis=2) == n).all()
    for r in range(16):
        for g in range(32 // m):
            block = scores[r, g * m:(g + 1) * m]
            assert set(np.flatnonzero(groups[r, g])) == set(np.argsort(-block)[:n])


def test_unstructured_mask_per_row_and_per_layer():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((10, 50))
    keep = unstructured_mask(scores, 0.7)
    assert (keep.sum(axis=1) == 50 - 35).all()  # exactly floor(0.7 * 50) removed in every row
    for r in range(10):
        assert scores[r, keep[r]].min() >= scores[r, ~keep[r]].max()
    layer = unstructured_mask(scores, 0.5, per_row=False)
    assert layer.sum() == 250 and scores[layer].min() >= scores[~layer].max()
    assert unstructured_mask(scores, 0.0).all()
    with pytest.raises(ConfigError):
        unstructured_mask(scores, 1.0)


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_drops():
    w, x = _layer()
    scores = wanda_scores(w, x)
    np.testing.assert_allclose(scores, np.abs(w) * np.linalg.norm(x.astype(np.float64), axis=0), rtol=1e-6)
    wanda = unstructured_mask(scores, 0.5)
    magnitude = unstructured_mask(np.abs(w), 0.5)
    assert wanda[:, 5].mean() > 0.95 and magnitude[:, 5].mean() < 0.7  # feature 5 is 20x louder
    e_wanda = _output_error(w, w * wanda, x)
    e_mag = _output_error(w, w * magnitude, x)
    assert e_wanda < 0.8 * e_mag, (e_wanda, e_mag)


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"nm": (2, 4)}])
def test_sparsegpt_hits_the_pattern_and_beats_mask_only_pruning(spec):
    w, x = _layer(seed=3)
    pruned = sparsegpt(w, hessian(x), block=32, **spec)
    if "nm" in spec:
        assert ((pruned != 0).reshape(48, 16, 4).sum(axis=2) <= 2).all()  # exact 2:4 (a kept weight may be 0)
        assert sparsity_of(pruned) >= 0.5
        baseline = w * nm_mask(wanda_scores(w, x), 2, 4)
    else:
        assert abs(sparsity_of(pruned) - 0.5) < 0.01
        baseline = w * unstructured_mask(wanda_scores(w, x), 0.5)
    e_gpt, e_base = _output_error(w, pruned, x), _output_error(w, baseline, x)
    assert e_gpt < 0.7 * e_base, (e_gpt, e_base)  # the error compensation repairs much of what pruning breaks


def test_sparsegpt_refuses_bad_arguments():
    w, x = _layer(k=30)
    h = hessian(x)
    with pytest.raises(ConfigError, match="exactly one"):
        sparsegpt(w, h)
    with pytest.raises(ConfigError, match="multiple of 4"):
        sparsegpt(w, h, nm=(2, 4))
    with pytest.raises(ConfigError, match="0 < n < m"):
        nm_mask(np.ones((2, 8)), 4, 4)
    with pytest.raises(ConfigError, match="features"):
        wanda_scores(w, np.ones((3, 31)))


def test_pq_index_measures_how_concentrated_a_weight_is():
    d = 256
    assert abs(pq_index(np.full(d, 0.3))) < 1e-12  # all equal: nothing to prune
    one = np.zeros(d)
    one[7] = -2.0
    assert pq_index(one) == pytest.approx(1 - d ** (1 - 1 / 0.5))  # the most concentrated vector
    rng = np.random.default_rng(4)
    w = rng.standard_normal(d)
    values = [pq_index(w * unstructured_mask(np.abs(w)[None, :], s)[0]) for s in (0.0, 0.3, 0.6, 0.9)]
    assert values == sorted(values) and values[0] > 0  # pruning small weights concentrates the rest
    assert pq_index(np.zeros(5)) == 0.0
    with pytest.raises(ConfigError):
        pq_index(w, p=1.0, q=0.5)
