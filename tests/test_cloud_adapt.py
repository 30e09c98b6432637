"""``edgekit.cloud_adapt``'s pieces that need no model: the held-out split, the numpy metrics against torch's, and
clear refusals. The whole job runs in ``tests/test_sync_jobs.py`` and ``tests/test_bench_cloud_loop.py``."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.cloud_adapt import AdaptJobConfig, adapt, heldout_metrics, split
from edgekit.errors import ConfigError


def test_split_is_by_content_and_keeps_both_sides():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1, 8, 8)).astype(np.float32)
    train, held = split(x, 0.2)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200 and 20 <= len(held) <= 60
    # the same sample lands on the same side whatever else is in the set, and wherever it is
    perm = rng.permutation(200)
    train2, held2 = split(x[perm], 0.2)
    assert set(perm[held2]) == set(held)
    tiny_train, tiny_held = split(x[:3], 0.2)
    assert len(tiny_held) == 1 and len(tiny_train) == 2


def test_heldout_metrics_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(64, 10)) * 3, rng.normal(size=(64, 10)) * 3
    m = heldout_metrics(t, s)
    ref = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(s), -1), torch.log_softmax(torch.tensor(t), -1),
                                     log_target=True, reduction="batchmean")
    assert m["kl"] == pytest.approx(float(ref), rel=1e-9)
    assert m["agreement"] == pytest.approx(float((t.argmax(1) == s.argmax(1)).mean()))
    assert heldout_metrics(t, t)["kl"] == pytest.approx(0.0, abs=1e-12)


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match="at least 8"):
        adapt(b"", ["layer"], b"", np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="no norm layers"):
        adapt(b"", [], b"", np.zeros((16, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError):
        AdaptJobConfig(holdout=1.5)
