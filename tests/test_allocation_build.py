"""Per-layer allocation through the whole build: budgets honoured as measured, tables cached, clear errors."""

import json

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
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=30KB", "--out", out, code=3)
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
