"""Plausible user inputs that once crashed the build: static batch sizes, weights in external data files,
1-D convolutions, odd budget strings, a model whose outputs cannot be compared."""

import json

import numpy as np
import onnx
import pytest

from tests.onnx_graphs import conv_net


def _calib(path, shape, n=24):
    np.save(path, np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32))
    return path


def test_static_batch_onnx_model_builds_int8(run_cli, tmp_path):
    model = conv_net()
    for t in (*model.graph.input, *model.graph.output):
        t.type.tensor_type.shape.dim[0].Clear()
        t.type.tensor_type.shape.dim[0].dim_value = 1  # [1, 3, 8, 8]: batch fixed at 1
    path = tmp_path / "static.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    r = run_cli("build", "--model", path, "--calib", _calib(tmp_path / "c.npy", (3, 8, 8)), "--precision", "int8",
                "--out", out, "--json", "--no-latency")
    assert json.loads(r.stdout)["verification"]["passed"]
    r = run_cli("build", "--model", path, "--calib", tmp_path / "c.npy", "--budget", "size=10MB", "--out",
                tmp_path / "out2", "--json", "--no-latency")  # sensitivity runs at batch 1 too
    assert json.loads(r.stdout)["verification"]["passed"]


def test_onnx_with_external_weights_builds_and_hashes_its_weights(run_cli, tmp_path):
    from edgekit.context import Context
    from edgekit.model import load_model

    def save(model, folder):
        folder.mkdir()
        onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="m.onnx.data", size_threshold=0)
        return folder / "m.onnx"

    a = save(conv_net(seed=0), tmp_path / "a")
    b = save(conv_net(seed=1), tmp_path / "b")  # same graph, other weights
    ctx = Context(cache_dir=tmp_path / "cache")
    assert load_model(str(a), ctx=ctx).sha256 != load_model(str(b), ctx=ctx).sha256
    out = tmp_path / "out"
    r = run_cli("build", "--model", a, "--calib", _calib(tmp_path / "c.npy", (3, 8, 8)), "--out", out, "--json",
                "--no-latency")
    assert json.loads(r.stdout)["verification"]["passed"]
    (tmp_path / "a" / "m.onnx.data").unlink()
    r = run_cli("build", "--model", a, "--calib", tmp_path / "c.npy", "--out", tmp_path / "o2", code=4)
    assert "m.onnx.data" in r.stderr and "not beside it" in r.stderr  # names the missing weights file


def test_conv1d_model_builds_int8_with_bias_correction(run_cli, tmp_path):
    out = tmp_path / "out"
    r = run_cli("build", "--model", "fixtures_models:tiny_conv1d", "--input-shape", "1,4,32", "--calib",
                _calib(tmp_path / "c.npy", (4, 32), n=40), "--precision", "int8", "--out", out, "--json",
                "--no-latency")
    summary = json.loads(r.stdout)
    assert summary["verification"]["passed"] and summary["precision"] == "int8"
    graph = onnx.load(str(out / "tiny_conv1d" / "model.onnx")).graph
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 3  # both convs and the linear


@pytest.mark.parametrize("bad", ["size=1.2.3MB", "size=.MB", "latency=..5ms", "avg-bits=x"])
def test_malformed_budget_numbers_are_usage_errors(run_cli, tmp_path, bad):
    r = run_cli("build", "--model", "builtin:digits-cnn", "--budget", bad, "--out", tmp_path / "o", code=3)
    assert "budget" in r.stderr


def test_a_report_without_comparable_outputs_still_summarises():
    from pathlib import Path

    from edgekit.iospec import Artifact
    from edgekit.targets import Tolerances
    from edgekit.verify import compare

    art = Artifact(path=Path("x.onnx"), format="onnx", sha256="0" * 64, inputs=(), outputs=())
    r = compare({"logits": np.ones((2, 3))}, {"other": np.ones((2, 3)), "more": np.ones(1)}, classification=True,
                labels=None, tolerances=Tolerances(min_sqnr_db=10, min_cosine=0.9), tolerance_class="int8",
                artifact=art, data_source="t")
    assert not r.passed and "no comparable outputs" in r.summary()
