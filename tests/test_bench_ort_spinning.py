"""benchmarks/ort_spinning.py: the three session setups are what they say, and the paired timing returns one ratio
per variant (a tiny model; the EfficientNet run is the benchmark's)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.bench_scripts import load_benchmark


def _matmul_model(path, k: int) -> None:
    w = numpy_helper.from_array(np.random.default_rng(k).normal(size=(64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_setups_and_paired_timing(tmp_path):
    bench = load_benchmark("ort_spinning")
    for k, name in enumerate(("fp32", "a", "b")):
        _matmul_model(tmp_path / f"{name}.onnx", k)
    got = {s: bench.session(tmp_path / "a.onnx", s).get_session_options() for s in bench.SETUPS}
    assert got["stop"].get_session_config_entry("session.force_spinning_stop") == "1"
    assert got["off"].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    feed = {"x": np.ones((1, 64), np.float32)}
    res = bench.paired({"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"}, tmp_path / "fp32.onnx", feed, "stop",
                       idle=1, rounds=2, calls=2)
    assert set(res["ratio_vs_fp32"]) == {"a", "b"} and all(r > 0 for r in res["ratio_vs_fp32"].values())
    single = bench.alone({"a": tmp_path / "a.onnx"}, feed, repeats=1, calls=2)
    assert set(single["a"]) == set(bench.SETUPS)
