"""Sensitivity analysis: simulated mixed models are exact where they must be, distortions are sane, tables cache."""

import numpy as np
import onnx
import pytest

from edgekit.allocate import uniform_plan
from edgekit.analyze import distortion, measure_sensitivity
from edgekit.compress.qdq import insert
from edgekit.compress.quant import W8A8Config, quantize_w8a8
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.export.onnx import name_weighted_nodes
from edgekit.inventory import layer_inventory
from edgekit.targets import load_target
from edgekit.verify import sqnr_db
from tests.onnx_graphs import conv_net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    fp = conv_net()
    name_weighted_nodes(fp)
    fp_path = d / "fp32.onnx"
    onnx.save(fp, str(fp_path))
    rng = np.random.default_rng(0)
    calib = Dataset(name="c", inputs={"input": rng.normal(1.0, 0.7, (48, 3, 8, 8)).astype(np.float32)},
                    labels=None, source="c")
    plan = uniform_plan(layer_inventory(fp_path), load_target("cpu-x86"), "int8", model_sha256="0" * 64)
    q_path = quantize_w8a8(fp_path, d / "q.onnx", plan, calib, W8A8Config())
    return fp_path, q_path, calib


def _run(proto, x):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_insert_nothing_is_the_float_model_and_everything_is_close_to_the_quantized(models):
    fp_path, q_path, calib = models
    fp, q = onnx.load(str(fp_path)), onnx.load(str(q_path))
    x = calib.inputs["input"]
    np.testing.assert_array_equal(_run(insert(fp, q, []), x), _run(fp, x))
    names = [layer.name for layer in layer_inventory(fp)]
    sim = _run(insert(fp, q, names), x)
    assert sqnr_db(_run(q, x), sim) > 20.0  # the real graph also quantizes pooling/activations
    assert sqnr_db(_run(fp, x), sim) < 60.0  # and it is really quantized
    # one layer inserted: only that layer's weight is read through DequantizeLinear
    one = insert(fp, q, ["fc"])
    dq_targets = [n.output[0] for n in one.graph.node if n.op_type == "DequantizeLinear"]
    assert all(t.startswith("fc::") for t in dq_targets) and len(dq_targets) == 3  # input, weight, bias


def test_distortion_metrics():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(32, 10))
    assert distortion(ref, ref, "kl") == pytest.approx(0.0, abs=1e-12)
    assert distortion(ref, ref + rng.normal(scale=0.5, size=ref.shape), "kl") > 0
    # a constant shift of the logits does not change the softmax
    assert distortion(ref, ref + 3.0, "kl") == pytest.approx(0.0, abs=1e-9)
    assert distortion(ref, 2 * ref, "mse") == pytest.approx(1.0)


def test_sensitivity_table_and_cache(models, tmp_path, monkeypatch):
    fp_path, q_path, calib = models
    ctx = Context(cache_dir=tmp_path)
    layers = layer_inventory(fp_path)
    kw = dict(metric="kl", model_sha256="m" * 64, quantizer={"scheme": "w8a8"}, ctx=ctx, additivity_samples=4)
    table = measure_sensitivity(fp_path, q_path, layers, calib, **kw)
    assert set(table.values) == {layer.name for layer in layers}
    assert all(row["fp32"] == 0.0 and row["w8a8"] > 0.0 for row in table.values.values())
    assert table.additivity["samples"] == 4 and -1.0 <= table.additivity["pearson"] <= 1.0
    # a second call must come from the cache: measuring anything would now fail
    import edgekit.analyze as analyze

    monkeypatch.setattr(analyze, "_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    assert measure_sensitivity(fp_path, q_path, layers, calib, **kw) == table
    # other data → another key → measured again
    other = calib.take(40)
    with pytest.raises(AssertionError, match="measured again"):
        measure_sensitivity(fp_path, q_path, layers, other, **kw)
