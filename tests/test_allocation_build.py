"""Per-layer allocation through the whole build: budgets honoured as measured, tables cached, clear errors."""

import json
import os

import pytest


@pytest.fixture(scope="module")
def size_build(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("alloc") / "out"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=60KB", "--out", out, "--json",
                     "--no-latency")
    return out, json.loads(result.stdout), result


def test_size_budget_is_met_by_the_real_artifact(size_build):
    out, summary, _ = size_build
    assert summary["verification"]["passed"]
    assert summary["size"]["artifact_bytes"] <= 60_000  # the file, not just the weights
    report = json.loads((out / "digits-cnn" / "report.json").read_text())
    alloc = report["allocation"]
    assert alloc["solver"].startswith("auto") and alloc["budget"]["size_bytes"] == 60_000
    assert alloc["additivity"]["samples"] > 0
    assert set(alloc["sensitivity"]) == {row["name"] for row in report["layers"]}
    for row in report["layers"]:  # every layer shows its distortion, bytes, latency and where the latency came from
        assert row["bytes"] > 0 and row["latency_ms"] > 0 and row["latency_source"]
        assert row["distortion"] is not None and row["reason"]


def test_a_generous_budget_keeps_every_layer_float(run_cli, tmp_path, size_build):
    _, tight, _ = size_build
    out = tmp_path / "loose"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=10MB", "--out", out, "--json",
                     "--no-latency")
    loose = json.loads(result.stdout)
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    assert all(c["option"] == "fp32" for c in plan["layers"])  # nothing needs compressing to meet 10 MB
    assert loose["verification"]["outputs"][0]["sqnr_db"] >= 100
    assert "from cache" in result.stderr  # the second build with another budget did not measure again
    del tight


def test_infeasible_budget_is_a_clear_error(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=8KB", "--out", out, code=3)
    assert "infeasible" in result.stderr or "below" in result.stderr
    assert not (out / "digits-cnn").exists()


@pytest.mark.parametrize("bad", ["size=abc", "speed=3", "latency=-1ms", "size"])
def test_bad_budget_strings(run_cli, tmp_path, bad):
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", bad, "--out", tmp_path / "o", code=3)
    assert "budget" in result.stderr


def test_dp_solver_meets_the_same_budget(run_cli, tmp_path):
    out = tmp_path / "dp"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=60KB", "--solver", "dp",
                     "--out", out, "--json", "--no-latency")
    summary = json.loads(result.stdout)
    assert summary["size"]["artifact_bytes"] <= 60_000
    assert json.loads((out / "digits-cnn" / "plan.json").read_text())["solver"].startswith("dp")


def _fake_latency(monkeypatch, ratios):
    """Replace the interleaved timer of the allocation loop with fixed ratios to FP32 (FP32 = 1 ms)."""
    import edgekit.mixed as mixed
    from edgekit.agent.runtime import LatencyStats

    def fake(runtimes, feeds, **kw):
        return {k: LatencyStats(ratios.get(k, 1.0), ratios.get(k, 1.0), 1) for k in runtimes}

    monkeypatch.setattr(mixed, "compare_latency", fake)


def test_latency_budget_keeps_the_least_distorted_plan_that_meets_it_as_measured(run_cli, tmp_path, monkeypatch):
    # the solved plans measure 0.9x, uniform INT8 0.5x: only uniform meets 0.6x, so it is kept
    _fake_latency(monkeypatch, {"fp32": 1.0, "plan": 0.9, "uniform": 0.5})
    out = tmp_path / "o"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "latency=0.6x", "--out", out, "--json",
                     "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    assert all(c["option"] == "w8a8" for c in plan["layers"])
    report = json.loads((out / "digits-cnn" / "report.json").read_text())
    rounds = report["allocation"]["latency_rounds"]
    assert rounds[0]["uniform_int8_ratio"] == 0.5 and rounds[0]["budget_ratio"] == 0.6
    assert json.loads(result.stdout)["verification"]["passed"]


def test_latency_budget_nobody_meets_keeps_the_fastest_and_says_so(run_cli, tmp_path, monkeypatch):
    _fake_latency(monkeypatch, {"fp32": 1.0, "plan": 0.95, "uniform": 0.8})
    out = tmp_path / "o"
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "latency=0.5x", "--out", out,
                     "--no-latency")
    assert "no plan met the latency budget" in result.stderr
    report = json.loads((out / "digits-cnn" / "report.json").read_text())
    assert report["allocation"]["latency_rounds"][-1] == {"budget_met": False, "kept_ratio": 0.8}


def test_relative_latency_budget_parsing():
    from edgekit.errors import ConfigError
    from edgekit.tables import parse_budget

    assert parse_budget(["latency=0.6x"]).latency_ratio == 0.6
    assert parse_budget(["latency=1500us"]).latency_ms == 1.5
    with pytest.raises(ConfigError, match="once"):
        parse_budget(["latency=0.6x", "latency=2ms"])


def test_a_size_plan_slower_than_fp32_is_replaced_by_uniform_int8(run_cli, tmp_path, monkeypatch):
    _fake_latency(monkeypatch, {"fp32": 1.0, "plan": 1.3, "uniform": 0.7})
    out = tmp_path / "o"
    run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=60KB", "--out", out, "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    assert plan["solver"].endswith("no-regression")
    assert all(c["option"] == "w8a8" for c in plan["layers"])
    assert any("slower" in note for note in plan["notes"])


def test_a_size_plan_faster_than_fp32_is_kept(run_cli, tmp_path, monkeypatch):
    _fake_latency(monkeypatch, {"fp32": 1.0, "plan": 0.9, "uniform": 0.7})
    out = tmp_path / "o"
    run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=60KB", "--out", out, "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    assert not plan["solver"].endswith("no-regression")
    assert any(c["option"] == "fp32" for c in plan["layers"])  # the 60 KB mix keeps some layers float


def test_max_drop_keeps_uniform_int8_when_it_is_within_the_drop(run_cli, tmp_path):
    out = tmp_path / "o"
    run_cli("build", "--model", "builtin:digits-cnn", "--max-drop", "1%", "--out", out, "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    assert plan["solver"] == "max-drop" and all(c["option"] == "w8a8" for c in plan["layers"])
    rounds = json.loads((out / "digits-cnn" / "report.json").read_text())["allocation"]["latency_rounds"]
    assert rounds[0]["float_layers"] == 0 and rounds[0]["verified_drop"] <= 0.01


def test_max_drop_tighter_than_any_quantized_plan_ends_at_float(run_cli, tmp_path):
    out = tmp_path / "o"
    r = run_cli("build", "--model", "builtin:digits-cnn", "--max-drop", "0", "--out", out, "--json", "--no-latency")
    summary = json.loads(r.stdout)
    assert summary["precision"] == "fp32" and summary["verification"]["accuracy_drop"] == 0
    rounds = json.loads((out / "digits-cnn" / "report.json").read_text())["allocation"]["latency_rounds"]
    assert len(rounds[0]["tried"]) >= 2  # it searched before giving up on quantization


@pytest.mark.parametrize("bad", ["abc", "150%", "-1"])
def test_bad_max_drop(run_cli, tmp_path, bad):
    r = run_cli("build", "--model", "builtin:digits-cnn", "--max-drop", bad, "--out", tmp_path / "o", code=3)
    assert "--max-drop" in r.stderr


def test_max_drop_and_budget_are_exclusive(run_cli, tmp_path):
    r = run_cli("build", "--model", "builtin:digits-cnn", "--max-drop", "1%", "--budget", "size=1MB",
                "--out", tmp_path / "o", code=3)
    assert "not both" in r.stderr


def test_max_drop_only_accepts_plans_that_pass_the_targets_tolerances(run_cli, tmp_path):
    from pathlib import Path

    src = (Path(__file__).parents[1] / "targets" / "cpu-x86.toml").read_text()
    strict = tmp_path / "cpu-x86.toml"  # int8 must reach 45 dB: uniform int8 of digits (about 40 dB) fails it
    strict.write_text(src.replace("[tolerances.int8]\nmin_sqnr_db = 12.0", "[tolerances.int8]\nmin_sqnr_db = 45.0"))
    out = tmp_path / "o"
    r = run_cli("build", "--model", "builtin:digits-cnn", "--max-drop", "1%", "--target", strict, "--out", out,
                "--json", "--no-latency")
    summary = json.loads(r.stdout)
    assert summary["verification"]["passed"]  # the drop limit alone would have taken uniform int8, which fails
    rounds = json.loads((out / "digits-cnn" / "report.json").read_text())["allocation"]["latency_rounds"]
    assert rounds[0]["float_layers"] > 0


def test_a_tight_size_budget_uses_low_bit_options_and_apply_replays_it(run_cli, tmp_path):
    """Below what int8 can reach, the solver takes int4 convolutions (w4a8, stored as int4) and weight-only low-bit
    Linear layers (MatMulNBits); `edgekit apply` rebuilds the identical model from the plan."""
    import onnx

    out = tmp_path / "o"
    run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=35KB", "--out", out, "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    options = {c["option"] for c in plan["layers"]}
    assert options & {"w4a8", "w4g32", "w4g64", "w4g128", "w2g32", "w2g64"}
    model = out / "digits-cnn" / "model.onnx"
    assert model.stat().st_size <= 35_000
    graph = onnx.load(str(model)).graph
    if "w4a8" in options:
        assert onnx.TensorProto.INT4 in {i.data_type for i in graph.initializer}
    if options & {"w4g32", "w4g64", "w4g128", "w2g32", "w2g64"}:
        assert "MatMulNBits" in {n.op_type for n in graph.node}
    again = tmp_path / "again"
    run_cli("apply", out / "digits-cnn" / "plan.json", "--model", "builtin:digits-cnn", "--out", again, "--no-latency")
    assert (again / "digits-cnn" / "model.onnx").read_bytes() == model.read_bytes()


def test_the_edgekit_kernel_profile_exports_weight_only_layers_as_ai_edgekit_ops(run_cli, tmp_path):
    """`--target cpu-x86-edgekit` (custom_op_domains = ai.edgekit): the same tight size budget, but the weight-only
    Linear layers become ai.edgekit::MatMulLowBit (3-bit allowed), the build verifies through the native library,
    and `edgekit apply` replays it."""
    import onnx

    from edgekit.kernels import ort_native

    if ort_native.library_path() is None:
        if os.environ.get("CI"):
            pytest.fail("the native ai.edgekit library must be built in CI (make install builds it)")
        pytest.skip("native ai.edgekit library not built")
    out = tmp_path / "o"
    run_cli("build", "--model", "builtin:digits-cnn", "--target", "cpu-x86-edgekit", "--budget", "size=35KB",
            "--out", out, "--no-latency")
    plan = json.loads((out / "digits-cnn" / "plan.json").read_text())
    wonly = {c["option"] for c in plan["layers"]} & {f"w{b}g{g}" for b in (2, 3, 4) for g in (32, 64, 128)}
    graph = onnx.load(str(out / "digits-cnn" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" not in ops
    if wonly:
        assert "MatMulLowBit" in ops
    report = json.loads((out / "digits-cnn" / "report.json").read_text())
    assert report["verification"]["passed"]
    again = tmp_path / "again"
    run_cli("apply", out / "digits-cnn" / "plan.json", "--model", "builtin:digits-cnn", "--out", again, "--no-latency")
    assert (again / "digits-cnn" / "model.onnx").read_bytes() == (out / "digits-cnn" / "model.onnx").read_bytes()
