"""The digits-C cloud-edge loop (``benchmarks/cloud_loop.py``) at a small scale, end to end: virtual devices see a
contrast shift, upload a selection of their inputs, a cloud job distills and publishes a delta, the staged rollout
(with faults) installs it, and the fleet's accuracy on the shifted evaluation digits rises."""

from __future__ import annotations

import json

import pytest

from tests.bench_scripts import load_benchmark

pytestmark = pytest.mark.e2e


def test_cloud_loop_raises_the_fleets_accuracy_with_a_tiny_delta(tmp_path):
    bench = load_benchmark("cloud_loop")
    out = tmp_path / "loop.json"
    code = bench.main(["--devices", "6", "--threads", "6", "--stream", "80", "--power-loss", "0.2",
                       "--stage-seconds", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert code == 0, res["checks"]
    assert res["job"]["status"] == "succeeded"
    assert res["accuracy_after"] > res["accuracy_before"] + 0.2, res  # contrast-4: ~35 % → ~95 %
    assert res["upload_share"] <= 0.30 and res["delta_ratio"] <= 0.01
    assert res["sim"]["lost_messages"] == 0 and res["sim"]["stuck"] == 0
    assert res["installed_via"]["delta"] >= 1
