"""benchmarks/channel_importance.py: reading a recorded plan's widths (the EfficientNet run is the benchmark's)."""

from __future__ import annotations

import json

from tests.bench_scripts import load_benchmark


def test_plan_widths_reads_the_kept_channels_of_each_producer(tmp_path):
    bench = load_benchmark("channel_importance")
    options = {"a._expand_conv": "fp32+ch80", "a._depthwise_conv": "fp32+ch80", "a._project_conv": "fp32+ch80",
               "_conv_head": "fp32+ch960", "_fc": "fp32+ch960", "_conv_stem": "fp32"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": {"efficientnet": {"variants": {bench.VARIANT: {"notes": {
        "options": options}}}}}}))
    widths = bench.plan_widths(path)
    assert widths["a._expand_conv"] == 80 and widths["_conv_head"] == 960 and "_conv_stem" not in widths
    recorded = bench.plan_widths(bench.DEFAULT_PLAN)  # the committed session-25 plan the default run reads
    assert recorded["_blocks.2._expand_conv"] == 80 and recorded["_conv_head"] == 960
