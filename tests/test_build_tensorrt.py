"""`edgekit build --target jetson-orin-nano`: a TensorRT-ready bundle that passes pre-flight and host verification and
tells the agent how to build its engine; an op TensorRT cannot parse fails the build before any compression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.export.trt_preflight import check


@pytest.fixture(scope="module")
def jetson(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("jetson") / "out"
    summary = json.loads(run_cli("build", "--target", "jetson-orin-nano", "--out", out, "--json").stdout)
    return Path(summary["bundle"]), summary, out


@pytest.mark.e2e
def test_default_model_for_jetson_is_tensorrt_ready_verified_and_says_how_to_build(jetson):
    bundle, summary, _ = jetson
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"] == "tensorrt" and manifest["artifact"]["format"] == "tensorrt-onnx"
    assert summary["verification"]["passed"] and manifest["verification"]["passed"]
    model = onnx.load(str(bundle / manifest["artifact"]["path"]))
    assert check(model, "10.3", "8.7") == []  # the bundled graph passes pre-flight
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"QLinearConv", "MatMulInteger"}
    zps = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_trt_zp")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric int8 everywhere
    engine = manifest["engine"]
    assert engine["tensorrt_version"] == "10.3" and engine["sm"] == "8.7"
    assert engine["flags"]["int8"] and engine["flags"]["fp16"]
    assert len(engine["layers"]["int8"]) == 50 and engine["command"].startswith("edgekit engine build")
    assert engine["refittable"] and all(isinstance(n, str) for n in engine["refittable"])


@pytest.mark.e2e
def test_engine_commands_on_the_jetson_bundle(jetson, run_cli, tmp_path):
    bundle, _, out = jetson
    archive = out / f"{bundle.name}.ekb"
    info = run_cli("engine", "info", archive).stdout
    assert "TensorRT 10.3" in info and "50 int8" in info
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res = run_cli("engine", "build", archive, "--cache-dir", tmp_path, code=10)
        assert "TensorRT is not installed" in res.output and not list(tmp_path.iterdir())


def test_unsupported_op_fails_before_compression(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "conv.weight")
    nodes = [helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Hardmax", ["f"], ["y"], name="hard")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 144])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    res = run_cli("build", "--target", "jetson-orin-nano", "--model", path, "--calib", tmp_path / "x.npy",
                  "--out", out, code=6)
    assert "pre-flight failed for the exported FP32 graph" in res.output and "hard (Hardmax)" in res.output
    assert not (out / "m").exists() and not list(out.glob("*.ekb"))


@pytest.mark.e2e
def test_agent_runs_the_jetson_bundle_in_onnx_runtime_without_tensorrt(jetson, tmp_path, caplog):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the agent would build an engine")
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.runtime import OrtRuntime

    bundle, _, out = jetson
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        res = agent.install(out / f"{bundle.name}.ekb", probation=False)
        assert res["installed"]
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
        with caplog.at_level("WARNING"):
            got = agent.infer({"input": x})
        ref = OrtRuntime(bundle / "model.onnx").run({"input": x})
        np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    finally:
        agent.close()
    assert "TensorRT is not installed here" in caplog.text
