"""`edgekit build --target cpu-arm64`: a TFLite bundle, verified in LiteRT, that the agent installs and serves; ONNX
models (which litert-torch cannot convert) go to the target's next runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="the tflite extra is not installed")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def digits_arm(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("arm") / "out"
    summary = json.loads(run_cli("build", "--target", "cpu-arm64", "--model", "builtin:digits-cnn", "--out", out,
                                 "--json").stdout)
    return Path(summary["bundle"]), summary, out


def test_digits_for_cpu_arm64_is_a_verified_int8_tflite(digits_arm):
    bundle, summary, _ = digits_arm
    manifest = json.loads((bundle / "manifest.json").read_text())
    art = manifest["artifact"]
    assert manifest["runtime"] == "tflite" and art["format"] == "tflite" and art["path"] == "model.tflite"
    assert summary["verification"]["passed"]
    report = json.loads((bundle / "report.json").read_text())
    assert report["size"]["ratio"] <= 0.35  # int8 weights (the tiny model's float glue weighs more than EffNet's)
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(bundle / "model.tflite")).get_tensor_details()
    assert any(d["dtype"] == np.int8 and d["quantization"][0] > 0 for d in details)  # really int8 inside
    assert (bundle / "sketch.json").exists() and manifest["reference"]["adapt"] is None


def test_agent_installs_and_serves_the_tflite_bundle(digits_arm, tmp_path):
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.backends import LiteRtRuntime

    bundle, _, out = digits_arm
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        assert agent.install(out / f"{bundle.name}.ekb", probation=False)["installed"]
        assert agent.status()["model"]["runtime"] == "litert"
        spec = json.loads((bundle / "manifest.json").read_text())["inputs"][0]
        shape = [3 if isinstance(d, str) else d for d in spec["shape"]]
        x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
        got = agent.infer({spec["name"]: x})
        ref = LiteRtRuntime(bundle / "model.tflite").run({spec["name"]: x})
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6)
    finally:
        agent.close()


def test_onnx_model_for_cpu_arm64_goes_to_onnx_runtime(run_cli, tmp_path, fp32):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(0, 1, (24, 3, 8, 8)).astype(np.float32))
    res = run_cli("build", "--target", "cpu-arm64", "--model", fp32, "--calib", tmp_path / "x.npy", "--out",
                  tmp_path / "out", "--json", "--precision", "fp32")
    manifest = json.loads((Path(json.loads(res.stdout)["bundle"]) / "manifest.json").read_text())
    assert manifest["runtime"] == "onnxruntime" and manifest["artifact"]["format"] == "onnx"
