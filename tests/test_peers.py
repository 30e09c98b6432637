"""benchmarks/peers.py on tiny ONNX graphs: each competitor tool makes a smaller model whose outputs stay close to
the FP32 ones; OpenVINO runs behind the same ``run(feeds)`` protocol as OrtRuntime (skipped without openvino)."""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.agent.runtime import OrtRuntime, compare_latency
from tests.bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _load_peers():
    return load_benchmark("peers")


peers = _load_peers()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import measure  # noqa: E402


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp(path: Path, seed: int = 0) -> Path:
    """x (N,64) -> MatMul 64x128 + bias -> Relu -> MatMul 128x32 + bias -> y (N,32)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.15, (64, 128)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (128,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (128, 32)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (32,)).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
             helper.make_node("Add", ["h3", "b2"], ["y"], name="add2")]  # GPTQ needs unique node names
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def embedder(path: Path, seed: int = 0) -> Path:
    """ids (N,8) int64 -> Gather from a 200x64 table -> mean over tokens -> MatMul 64x32 -> y (N,32)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (200, 64)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.normal(0, 0.15, (64, 32)).astype(np.float32), "proj"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e", "axes"], ["m"], name="mean", keepdims=0),
             helper.make_node("MatMul", ["m", "proj"], ["y"], name="proj_mm")]
    graph = helper.make_graph(nodes, "embedder",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], inits)
    # opset 18 (axes as an input): quantizing Gather moves the model to opset 21
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    return mlp(tmp_path_factory.mktemp("peers") / "mlp.onnx")


def x_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 64)).astype(np.float32)} for _ in range(n)]


def cosine(peer, fp32_path: Path, feeds) -> float:
    ref = measure.run_samples(OrtRuntime(fp32_path), feeds)
    out = measure.run_samples(peers.make_runtime(peer), feeds)
    return measure.fidelity(out, ref, classification=False)["mean_cosine"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic_is_smaller_and_close(mlp_path, tmp_path, per_channel):
    p = peers.ort_dynamic(mlp_path, tmp_path, per_channel=per_channel)
    assert p.ok and p.runtime == "onnxruntime", p.notes
    assert p.name == ("ort-dynamic-pc" if per_channel else "ort-dynamic")
    assert p.size_bytes == p.path.stat().st_size < 0.5 * mlp_path.stat().st_size
    assert p.notes["ops"].get("MatMulInteger") == 2
    assert cosine(p, mlp_path, x_feeds(16)) > 0.95


@pytest.mark.parametrize("algo", ["rtn", "hqq", "gptq"])
def test_matmul_nbits_is_smaller_and_close(mlp_path, tmp_path, algo):
    p = peers.ort_nbits(mlp_path, tmp_path, algo=algo, block_size=32, calib_feeds=x_feeds(8, seed=2))
    assert p.ok, p.notes
    assert p.name == f"ort-nbits4-{algo}-b32"
    assert p.size_bytes < 0.5 * mlp_path.stat().st_size
    assert p.notes["ops"].get("MatMulNBits") == 2 and "MatMul" not in p.notes["ops"]
    assert p.notes["zero_points"] == (["float32"] if algo == "hqq" else ["uint8"])
    assert cosine(p, mlp_path, x_feeds(16)) > 0.95


def test_nbits_weight_difference(mlp_path, tmp_path):
    a = peers.ort_nbits(mlp_path, tmp_path, algo="rtn", block_size=32, name="a")
    b = peers.ort_nbits(mlp_path, tmp_path, algo="rtn", block_size=32, name="b")
    c = peers.ort_nbits(mlp_path, tmp_path, algo="rtn", block_size=64, name="c")
    h = peers.ort_nbits(mlp_path, tmp_path, algo="hqq", block_size=32)
    assert peers.nbits_weight_difference(a.path, b.path) == 0.0
    assert peers.nbits_weight_difference(a.path, h.path) > 0.1
    assert peers.nbits_weight_difference(a.path, c.path) is None  # other blocks: not comparable
    assert peers.nbits_weight_difference(a.path, mlp_path) is None  # no MatMulNBits at all


def test_gptq_without_data_and_unknown_algorithm_are_recorded_failures(mlp_path, tmp_path):
    p = peers.ort_nbits(mlp_path, tmp_path, algo="gptq")
    assert not p.ok and "calibration" in p.notes["error"] and p.size_bytes == 0
    assert not peers.ort_nbits(mlp_path, tmp_path, algo="awq?").ok


def test_embeddings_reported_and_optionally_quantized(tmp_path):
    path = embedder(tmp_path / "emb.onnx")
    assert peers.onnx_embeddings(path) == {"tables": 1, "quantized": 0}
    plain = peers.ort_nbits(path, tmp_path, algo="rtn", block_size=32)
    assert plain.notes["embeddings"] == {"tables": 1, "quantized": 0}  # MatMulNBitsQuantizer's default: MatMul only
    emb = peers.ort_nbits(path, tmp_path, algo="rtn", block_size=32, quantize_embeddings=True)
    assert emb.name.endswith("-emb") and emb.notes["embeddings"] == {"tables": 1, "quantized": 1}
    assert emb.notes["ops"].get("GatherBlockQuantized") == 1
    assert emb.size_bytes < 0.3 * plain.size_bytes
    dyn = peers.ort_dynamic(path, tmp_path)
    assert dyn.notes["embeddings"]["tables"] == 1
    rng = np.random.default_rng(0)
    feeds = [{"ids": rng.integers(0, 200, (1, 8)).astype(np.int64)} for _ in range(8)]
    assert cosine(emb, path, feeds) > 0.95


def test_quantize_static_on_a_cnn(fp32, tmp_path):
    rng = np.random.default_rng(0)
    calib = [{"input": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    p = peers.ort_static(fp32, tmp_path, calib)
    assert p.ok, p.notes
    assert p.notes["settings"]["activation_type"] == "QUInt8" and p.notes["settings"]["per_channel"]
    assert not (tmp_path / "ort-static-pre.onnx").exists()
    ref = measure.run_samples(OrtRuntime(fp32), calib)
    out = measure.run_samples(peers.make_runtime(p), calib)
    f = measure.fidelity(out, ref, classification=True)
    assert f["mean_cosine"] > 0.95 and f["top1_agreement"] is not None


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (32, 10)).astype(np.float32)
    same = measure.fidelity(ref, ref, classification=True)
    assert same == {"mean_cosine": pytest.approx(1.0), "sqnr_db": 200.0, "top1_agreement": 1.0}
    noisy = ref + rng.normal(0, 0.1, ref.shape).astype(np.float32)
    f = measure.fidelity({"y": noisy}, {"logits": ref}, classification=True)
    assert 0.99 < f["mean_cosine"] < 1.0 and 15 < f["sqnr_db"] < 25 and 0.5 < f["top1_agreement"] <= 1.0
    assert measure.fidelity(noisy, ref, classification=False)["top1_agreement"] is None
    with pytest.raises(ValueError, match="shape"):
        measure.fidelity(noisy[:4], ref, classification=False)
    # per sample: 1/0 agreement for classifiers, else each sample's cosine; their means are the headline figures
    cls = measure.fidelity(noisy, ref, classification=True, per_sample=True)
    assert set(cls["per_sample"]) <= {0.0, 1.0} and np.mean(cls["per_sample"]) == pytest.approx(cls["top1_agreement"])
    emb = measure.fidelity(noisy, ref, classification=False, per_sample=True)
    assert len(emb["per_sample"]) == 32 and np.mean(emb["per_sample"]) == pytest.approx(emb["mean_cosine"], abs=1e-6)
    flipped = noisy.copy()
    flipped[3] = -ref[3]
    assert measure.fidelity(flipped, ref, classification=False, per_sample=True)["per_sample"][3] == -1.0


def test_build_evaluate_and_table(mlp_path, tmp_path):
    feeds = x_feeds(8)
    built = peers.build_peers(mlp_path, feeds, tmp_path, family="transformer",
                              only=["ort-dynamic-pc", "ort-nbits4-rtn-b32"])
    assert [p.name for p in built] == ["ort-dynamic-pc", "ort-nbits4-rtn-b32"]
    load: list[dict] = []
    res = measure.evaluate(built, mlp_path, feeds, classification=False, latency_feeds=feeds[0], rounds=2,
                         per_round=3, idle_wait_s=0.5, load_log=load)
    assert [x["round"] for x in load] == [0, 1] and sum(x["waited_s"] for x in load) <= 2.5
    assert list(res) == ["fp32", "ort-dynamic-pc", "ort-nbits4-rtn-b32"]
    for rec in res.values():
        assert rec["mean_cosine"] > 0.95 and rec["latency_batch1"]["runs"] == 6
        assert rec["size_ratio_vs_fp32"] <= 1.0
    assert res["fp32"]["latency_batch1"]["ratio_vs_fp32"] == 1.0
    table = peers.format_table({"variants": res})
    assert "ort-nbits4-rtn-b32" in table and "FAILED" not in table
    for kind in ("size", "latency"):
        root = ET.fromstring(peers.plot_svg({"model": "mlp", "classification": False, "variants": res}, x=kind))
        assert len([e for e in root.iter() if e.get("class") == "marker"]) == 3
    with pytest.raises(ValueError, match="unknown peer"):
        peers.build_peers(mlp_path, feeds, tmp_path, family="transformer", only=["nope"])
    with pytest.raises(ValueError, match="family"):
        peers.peer_plan("rnn", feeds)
    assert "nncf-int8" in peers.peer_plan("cnn", feeds) and "ort-static" in peers.peer_plan("cnn", feeds)


def test_cpu_monitor_and_idle_wait():
    mon = measure.CpuMonitor()
    sum(i * i for i in range(200_000))  # some CPU time of our own, which does not count as foreign
    f = mon.foreign()
    assert f is None or 0.0 <= f <= 1.0
    assert measure.wait_for_idle(0) == 0.0
    assert measure.wait_for_idle(0.2, threshold=2.0, window_s=0.05) < 0.2  # always "idle" below a 200 % threshold


def test_latency_keeps_only_quiet_rounds(monkeypatch):
    class Sleeper:
        def __init__(self, s):
            self.s = s

        def run(self, feeds):
            time.sleep(self.s)
            return {"y": np.zeros((1, 1), np.float32)}

    shares = iter([0.5, 0.02, 0.0, 0.4])
    monkeypatch.setattr(measure.CpuMonitor, "foreign", lambda self: next(shares))
    log: list[dict] = []
    lat = measure.interleaved_latency({"fp32": Sleeper(0.002), "fast": Sleeper(0.001)}, {}, rounds=4, per_round=2,
                                    load_log=log)
    assert lat["fp32"]["rounds_used"] == [1, 2] and lat["fast"]["runs"] == 4
    assert len(lat["fast"]["round_medians_ms"]) == 4 and 0.3 < lat["fast"]["ratio_vs_fp32"] < 0.9
    assert [x["foreign_cpu_share"] for x in log] == [0.5, 0.02, 0.0, 0.4]
    shares = iter([0.5, 0.02, 0.3])  # fewer than two quiet rounds: all are summarised
    assert measure.interleaved_latency({"fp32": Sleeper(0.001)}, {}, rounds=3, per_round=1)["fp32"]["rounds_used"] \
        == [0, 1, 2]


# --------------------------------------------------------------------------------------------------- OpenVINO
def test_openvino_runtime_matches_ort_and_times_interleaved(mlp_path, tmp_path):
    pytest.importorskip("openvino")
    feeds = x_feeds(8)
    p = peers.openvino_fp32(mlp_path, tmp_path)
    assert p.ok and p.runtime == "openvino" and p.path.suffix == ".xml" and p.path.with_suffix(".bin").exists()
    rt = peers.make_runtime(p)
    assert isinstance(rt, peers.OvRuntime)
    assert rt.precision == "f32" and rt.threads == 2 and rt.output_names == ["y"]
    out = rt.run(feeds[0])
    assert set(out) == {"y"} and out["y"].shape == (1, 32)
    ref = measure.run_samples(OrtRuntime(mlp_path), feeds)
    assert measure.fidelity(measure.run_samples(rt, feeds), ref, classification=False)["sqnr_db"] > 60
    stats = compare_latency({"ort": OrtRuntime(mlp_path, threads=2), "ov": rt}, feeds[0], rounds=1, per_round=3,
                            warmup=1)
    assert set(stats) == {"ort", "ov"} and stats["ov"].runs == 3
    default = peers.openvino_default(mlp_path, tmp_path)
    assert default.ok and default.config["precision"] is None and default.size_bytes < p.size_bytes


def test_nncf_weight_compression_is_smaller_and_close(mlp_path, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    feeds = x_feeds(16)
    fp32_ir = peers.openvino_fp32(mlp_path, tmp_path)
    for mode, kw in (("int8", {}), ("int4_sym", {"group_size": 32})):
        p = peers.nncf_weights(mlp_path, tmp_path, mode=mode, **kw)
        assert p.ok, p.notes
        assert p.size_bytes < 0.5 * fp32_ir.size_bytes
        assert cosine(p, mlp_path, feeds) > 0.95
    assert not peers.nncf_weights(mlp_path, tmp_path, mode="int3").ok
