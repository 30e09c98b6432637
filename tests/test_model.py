import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgekit.context import Context
from edgekit.errors import ConfigError, ModelLoadError
from edgekit.iospec import Preprocessing, TensorSpec
from edgekit.model import load_model, parse_input_shape
from tests.onnx_graphs import conv_net


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape("1x3x8x8") == (1, 3, 8, 8)
    for bad in ("a,b", "", "1,-3", "0"):
        with pytest.raises(ConfigError):
            parse_input_shape(bad)


def test_load_onnx_reads_interface_and_task(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(), str(path))
    m = load_model(str(path), ctx=Context(cache_dir=tmp_path))
    assert m.framework == "onnx" and m.task == "classification"
    assert m.inputs == (TensorSpec("input", ("batch", 3, 8, 8)),)
    m2 = load_model(str(path), input_shapes=[(1, 3, 8, 8)], ctx=Context(cache_dir=tmp_path))
    assert m2.inputs[0].sample_shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="rank"):
        load_model(str(path), input_shapes=[(1, 3)], ctx=Context(cache_dir=tmp_path))


@pytest.mark.parametrize(
    "spec, err, match",
    [
        ("missing.onnx", ModelLoadError, "not found"),
        ("missing.pt2", ModelLoadError, "not found"),
        ("no_such_pkg_xyz.models:make", ModelLoadError, "cannot import"),
        ("edgekit.zoo:nothing_here", ModelLoadError, "no callable"),
        ("edgekit.zoo:get_builtin", ModelLoadError, "raised"),
        ("builtin:resnet9000", ConfigError, "unknown built-in"),
        ("model.bin", ConfigError, "cannot tell"),
    ],
)
def test_model_errors(tmp_path, monkeypatch, spec, err, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(err, match=match):
        load_model(spec, input_shapes=[(1, 3, 8, 8)], ctx=Context(cache_dir=tmp_path))


def test_corrupt_onnx(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a valid ONNX"):
        load_model(str(p), ctx=Context(cache_dir=tmp_path))


def test_factory_needs_input_shape(tmp_path):
    with pytest.raises(ConfigError, match="input shape"):
        load_model("edgekit.zoo:make_digits_cnn", ctx=Context(cache_dir=tmp_path))
    m = load_model("edgekit.zoo:make_digits_cnn", input_shapes=[(1, 1, 8, 8)], ctx=Context(cache_dir=tmp_path))
    assert m.task == "classification" and m.inputs[0].shape == ("batch", 1, 8, 8)


def test_pt2_round_trip(tmp_path):
    import torch

    from edgekit.zoo import make_digits_cnn

    net = make_digits_cnn().eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), str(path))
    m = load_model(str(path), ctx=Context(cache_dir=tmp_path))
    assert m.inputs[0].shape == (1, 1, 8, 8)  # exported with a static batch of 1: kept
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(m.module(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)


def test_preprocessing_apply_and_validation():
    pre = Preprocessing(size=(2, 2), mean=(0.5,), std=(0.25,), channels=1)
    x = np.full((1, 2, 2, 1), 0.75, np.float32)
    np.testing.assert_allclose(pre.apply(x), np.full((1, 1, 2, 2), 1.0))
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ConfigError):
        Preprocessing(size=(2, 2), mean=(0.5, 0.5), std=(1.0,), channels=1)
    with pytest.raises(ConfigError):
        Preprocessing(size=(2, 2), std=(0.0, 1.0, 1.0))


def test_agent_and_bundle_import_without_torch():
    code = (
        "import sys, edgekit.agent.runtime, edgekit.bundle, edgekit.keys, edgekit.targets, edgekit.plan;"
        "bad=[m for m in ('torch','onnxscript','sklearn','skimage') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_digits_bn_builtin(tmp_path):
    import torch

    from edgekit import zoo

    bn, cnn = zoo.make_digits_bn(), zoo.make_digits_cnn()
    kinds = [type(m).__name__ for m in bn]
    assert [kinds[i + 1] for i, k in enumerate(kinds) if k == "Conv2d"] == ["BatchNorm2d"] * 3  # Conv -> BN -> ReLU
    assert [kinds[i + 2] for i, k in enumerate(kinds) if k == "Conv2d"] == ["ReLU"] * 3
    assert "BatchNorm2d" not in {type(m).__name__ for m in cnn}
    # digits-cnn keeps its layer indices, so caches written before digits-bn existed still load
    assert list(cnn.state_dict()) == [f"{i}.{p}" for i in (0, 2, 5, 9, 11) for p in ("weight", "bias")]
    a, b = zoo.BUILTINS["digits-bn"], zoo.BUILTINS["digits-cnn"]
    same = ("inputs", "output_names", "preprocessing", "task", "calib_data", "eval_data")
    assert all(getattr(a, f) == getattr(b, f) for f in same)
    ctx = Context(cache_dir=tmp_path)  # a cached digits-bn is loaded from its own file, not retrained
    torch.manual_seed(1)
    saved = zoo.make_digits_bn().state_dict()
    torch.save(saved, ctx.cache("models") / "digits-bn-v1-seed0.pt")
    loaded = zoo._digits_bn(ctx)
    assert not loaded.training
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
