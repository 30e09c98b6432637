"""The ONNX exporter: dynamo first, the legacy exporter as a logged fallback, a clear error when both fail."""

import logging

import numpy as np
import pytest

from edgekit.context import Context
from edgekit.errors import ExportError
from edgekit.export.onnx import export_onnx
from edgekit.inventory import layer_inventory
from edgekit.model import load_model


@pytest.fixture(scope="module")
def digits_factory(tmp_path_factory):
    return load_model("edgekit.zoo:make_digits_cnn", input_shapes=[(1, 1, 8, 8)],
                      ctx=Context(cache_dir=tmp_path_factory.mktemp("cache")))


def _outputs(model, path, x):
    import onnxruntime as ort
    import torch

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model.module(torch.from_numpy(x)).numpy()
    return got, want


def test_dynamo_export_matches_torch_with_dynamic_batch(digits_factory, tmp_path):
    art = export_onnx(digits_factory, tmp_path / "m.onnx")
    assert art.inputs[0].shape[0] == "batch"
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    got, want = _outputs(digits_factory, art.path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # weighted layers are named after the modules that own them
    assert [layer.name for layer in layer_inventory(art.path)] == ["0", "2", "5", "9", "11"]


def test_falls_back_to_legacy_exporter_with_a_logged_reason(digits_factory, tmp_path, monkeypatch, caplog):
    import torch

    real = torch.onnx.export

    def dynamo_breaks(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    with caplog.at_level(logging.WARNING, logger="edgekit"):
        art = export_onnx(digits_factory, tmp_path / "m.onnx")
    assert "simulated dynamo failure" in caplog.text and "legacy" in caplog.text
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    got, want = _outputs(digits_factory, art.path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_both_exporters_failing_is_an_export_error(digits_factory, tmp_path, monkeypatch):
    import torch

    def broken(*args, **kw):
        raise RuntimeError("nope")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="both exporters"):
        export_onnx(digits_factory, tmp_path / "m.onnx")
