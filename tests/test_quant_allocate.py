"""INT8 quantization of a small graph through the Plan, and the uniform planner's respect for the profile."""

import numpy as np
import onnx
import pytest

from edgekit.allocate import uniform_plan
from edgekit.compress.quant import W8A8Config, quantize_w8a8
from edgekit.data import Dataset
from edgekit.errors import ConfigError, UnsupportedOnTarget
from edgekit.inventory import layer_inventory
from edgekit.targets import load_target
from edgekit.verify import sqnr_db


def _data(n=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)
    return Dataset(name="rand", inputs={"input": x}, labels=None, source="random")


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_uniform_int8_plan_quantizes_supported_layers(fp32):
    profile = load_target("cpu-x86")
    plan = uniform_plan(layer_inventory(fp32), profile, "int8", model_sha256="0" * 64)
    assert [c.option for c in plan.layers] == ["w8a8"] * 4
    fp = uniform_plan(layer_inventory(fp32), profile, "fp32", model_sha256="0" * 64)
    assert not fp.is_quantized
    with pytest.raises(ConfigError):
        uniform_plan(layer_inventory(fp32), profile, "int3", model_sha256="0" * 64)


def test_layers_the_target_cannot_quantize_stay_float(fp32):
    profile = load_target("cpu-x86")
    ops = dict(profile.ops)
    # a profile whose depthwise convolutions have no int8 kernels
    ops["depthwise_conv"] = ops["depthwise_conv"].model_copy(update={"weight_bits": [], "activation_bits": [32]})
    profile = profile.model_copy(update={"ops": ops})
    assert not profile.supports("depthwise_conv", "w8a8")
    plan = uniform_plan(layer_inventory(fp32), profile, "int8", model_sha256="0" * 64)
    choices = {c.layer: c for c in plan.layers}
    assert choices["dw"].option == "fp32" and "does not support" in choices["dw"].reason
    assert choices["stem"].option == "w8a8"


def test_quantized_graph_is_close_and_respects_exclusions(fp32, tmp_path):
    profile = load_target("cpu-x86")
    plan = uniform_plan(layer_inventory(fp32), profile, "int8", model_sha256="0" * 64)
    # keep the head in float: its weight must survive as a float initializer
    from dataclasses import replace

    from edgekit.plan import LayerChoice

    layers = tuple(LayerChoice(c.layer, "fp32", "keep") if c.layer == "head" else c for c in plan.layers)
    plan = replace(plan, layers=layers)
    out = quantize_w8a8(fp32, tmp_path / "int8.onnx", plan, _data(), W8A8Config())
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert "DequantizeLinear" in ops and "QuantizeLinear" in ops
    # the excluded MatMul still reads its float weight directly
    head = [n for n in q.graph.node if n.name == "head"][0]
    inits = {i.name: i for i in q.graph.initializer}
    assert head.input[1] in inits and inits[head.input[1]].data_type == onnx.TensorProto.FLOAT
    # quantized weights are int8 with one scale per output channel
    w_int8 = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert w_int8, "expected int8 weight initializers"
    x = _data(64, seed=1).inputs["input"]
    assert sqnr_db(_run(fp32, x), _run(out, x)) > 25.0


def test_no_quantized_layer_is_an_error(fp32, tmp_path):
    from edgekit.errors import ExportError

    plan = uniform_plan(layer_inventory(fp32), load_target("cpu-x86"), "fp32", model_sha256="0" * 64)
    with pytest.raises(ExportError):
        quantize_w8a8(fp32, tmp_path / "x.onnx", plan, _data(), W8A8Config())


def test_target_without_int8_raises_for_int8(fp32, monkeypatch):
    profile = load_target("cpu-x86")
    monkeypatch.setattr(type(profile), "supports", lambda self, op, scheme: scheme == "fp32")
    with pytest.raises(UnsupportedOnTarget):
        uniform_plan(layer_inventory(fp32), profile, "int8", model_sha256="0" * 64)


def test_a_float_layer_between_quantized_ones_stays_float_at_run_time(fp32, tmp_path):
    """ORT's WeightBiasQuantization pass would re-quantize a float Conv between DQ and Q; the runtime disables it."""
    from dataclasses import replace

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.plan import LayerChoice

    plan = uniform_plan(layer_inventory(fp32), load_target("cpu-x86"), "int8", model_sha256="0" * 64)
    plan = replace(plan, layers=tuple(LayerChoice(c.layer, "fp32", "keep") if c.layer == "dw" else c
                                      for c in plan.layers))
    out = quantize_w8a8(fp32, tmp_path / "mixed.onnx", plan, _data(), W8A8Config())
    OrtRuntime(out, optimized_model_path=tmp_path / "as-run.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "as-run.onnx"), load_external_data=False).graph.node]
    # the stem runs as an integer conv; the depthwise layer the plan kept float runs as a float Conv
    # (with the pass enabled it would have become a second QLinearConv)
    assert ops.count("QLinearConv") == 1, ops
    assert ops.count("Conv") == 1, ops


def test_bias_correction_reduces_error_and_adds_missing_biases(fp32, tmp_path):
    """Inputs with a large mean make the weight-rounding shift visible; correcting the biases must shrink it."""
    profile = load_target("cpu-x86")
    plan = uniform_plan(layer_inventory(fp32), profile, "int8", model_sha256="0" * 64)
    rng = np.random.default_rng(5)
    calib = Dataset(name="c", inputs={"input": rng.normal(2.0, 0.5, (64, 3, 8, 8)).astype(np.float32)},
                    labels=None, source="c")
    x = rng.normal(2.0, 0.5, (128, 3, 8, 8)).astype(np.float32)
    ref = _run(fp32, x)
    errs = {}
    for bc in (False, True):
        out = quantize_w8a8(fp32, tmp_path / f"q{bc}.onnx", plan, calib, W8A8Config(bias_correction=bc))
        errs[bc] = sqnr_db(ref, _run(out, x))
    assert errs[True] > errs[False] + 1.0, errs
    # the depthwise conv had no bias: the corrected model gives it one
    q = onnx.load(str(tmp_path / "qTrue.onnx"))
    dw = [n for n in q.graph.node if n.name == "dw"][0]
    assert len(dw.input) == 3 and dw.input[2]


def test_bias_correction_of_a_matmul_uses_the_feature_axis(tmp_path):
    """Transformer MatMuls read [batch, seq, features]: the mean must be taken per feature (last axis)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.compress.quant import _input_means

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "proj.weight")
    node = helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="proj")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (rng.normal(size=(8, 5, 6)) + np.arange(6)).astype(np.float32)
    means = _input_means(model, [node], Dataset(name="d", inputs={"x": x}, labels=None, source="d"))
    np.testing.assert_allclose(means["proj"], x.mean(axis=(0, 1)), rtol=1e-5)


def test_dynamic_int8_quantizes_linear_layers_only(fp32, tmp_path):
    from edgekit.compress.quant import quantize_w8a8d

    profile = load_target("cpu-x86")
    assert profile.supports("linear", "w8a8d") and not profile.supports("conv", "w8a8d")
    plan = uniform_plan(layer_inventory(fp32), profile, "int8-dynamic", model_sha256="0" * 64)
    # ORT's dynamic quantizer rewrites a Gemm into MatMul + Add under a new name and leaves it float: Gemm stays fp32
    assert {c.layer: c.option for c in plan.layers} == {"stem": "fp32", "dw": "fp32", "fc": "fp32",
                                                         "head": "w8a8d"}
    out = quantize_w8a8d(fp32, tmp_path / "dyn.onnx", plan)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and ops.count("Conv") == 2
    # a plan that asks dynamic int8 of a Gemm is refused rather than shipped float
    from dataclasses import replace

    from edgekit.errors import ExportError
    from edgekit.plan import LayerChoice

    forced = replace(plan, layers=tuple(LayerChoice(c.layer, "w8a8d") if c.layer == "fc" else c for c in plan.layers))
    with pytest.raises(ExportError, match="left layers float"):
        quantize_w8a8d(fp32, tmp_path / "dyn2.onnx", forced)
    x = _data(64, seed=3).inputs["input"]
    assert sqnr_db(_run(fp32, x), _run(out, x)) > 25.0


def test_dynamic_scheme_grammar():
    from edgekit.errors import ConfigError
    from edgekit.targets import parse_scheme

    assert parse_scheme("w8a8d").dynamic and not parse_scheme("w8a8").dynamic
    with pytest.raises(ConfigError):
        parse_scheme("w8d")


def test_the_quantized_file_does_not_depend_on_the_libraries_loaded_before(fp32, tmp_path):
    """ORT's pre-processing saves through a session, which lists every domain registered in the process: after the
    native ai.edgekit library has run once, the INT8 file listed ``ai.edgekit`` (version 1000) although no node uses
    it, so a build and its `edgekit apply` replay wrote different bytes (CI, session 22)."""
    import onnxruntime as ort

    from edgekit.kernels import ort_native

    plan = uniform_plan(layer_inventory(fp32), load_target("cpu-x86"), "int8", model_sha256="0" * 64)
    before = quantize_w8a8(fp32, tmp_path / "before.onnx", plan, _data(), W8A8Config()).read_bytes()
    so = ort.SessionOptions()
    if not ort_native.register(so):
        pytest.skip("native ai.edgekit library not built")
    ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
    after = quantize_w8a8(fp32, tmp_path / "after.onnx", plan, _data(), W8A8Config())
    q = onnx.load(str(after))
    used = {n.domain for n in q.graph.node}
    assert all(o.domain in used or o.domain in ("", "ai.onnx") for o in q.opset_import), list(q.opset_import)
    assert after.read_bytes() == before
