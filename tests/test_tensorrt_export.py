"""TensorRT-ready export (``edgekit.export.tensorrt``) and pre-flight (``edgekit.export.trt_preflight``): Q/DQ
placement rules, numerics against float and against the quantized weights, INT4 blocks, 2:4, plugins, and every
pre-flight error. TensorRT itself cannot be installed here; these tests stop at the graph TensorRT would parse."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.agent.runtime import OrtRuntime
from edgekit.data import Dataset
from edgekit.errors import ExportError, UnsupportedOnTarget
from edgekit.export.tensorrt import int8_per_channel, mse_amax, reduction_axis, tensorrt_graph, weight_axis
from edgekit.export.trt_preflight import check, require
from edgekit.plan import LayerChoice, Plan
from edgekit.targets import load_target


def _model(nodes, inits, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """x (N,8,6,6) -> expand 1x1 -> Relu -> project 1x1 -> Add(x) -> head 3x3 -> Relu -> GAP -> Flatten -> fc (Gemm,
    transB) -> out (MatMul)."""
    rng = np.random.default_rng(seed)
    inits = {
        "expand.weight": rng.normal(0, 0.4, (16, 8, 1, 1)).astype(np.float32),
        "expand.bias": rng.normal(0, 0.1, (16,)).astype(np.float32),
        "project.weight": rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32),
        "head.weight": rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.4, (6, 8)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.1, (6,)).astype(np.float32),
        "out.weight": rng.normal(0, 0.4, (6, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "expand.weight", "expand.bias"], ["e"], name="expand"),
        helper.make_node("Relu", ["e"], ["er"]),
        helper.make_node("Conv", ["er", "project.weight"], ["p"], name="project"),
        helper.make_node("Add", ["p", "x"], ["s"], name="residual"),
        helper.make_node("Conv", ["s", "head.weight"], ["h"], name="head", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("GlobalAveragePool", ["hr"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "out.weight"], ["y"], name="out"),
    ]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])])


LAYERS = ("expand", "project", "head", "fc", "out")


def _plan(options: dict[str, str], layers=LAYERS) -> Plan:
    return Plan("m", "jetson-orin-nano", "mixed", tuple(LayerChoice(n, options.get(n, "fp32")) for n in layers))


def _calib(n: int = 32, shape=(8, 6, 6), name: str = "x", seed: int = 1) -> Dataset:
    x = np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)
    return Dataset("c", {name: x}, None, "test")


def _run(model, feeds):
    return next(iter(OrtRuntime(model.SerializeToString()).run(feeds).values()))


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# ------------------------------------------------------------------------------------------------ Q/DQ placement
def test_int8_qdq_placement_follows_tensorrt_rules():
    fp32 = residual_net()
    g = tensorrt_graph(fp32, _plan(dict.fromkeys(LAYERS, "w8a8")), _calib())
    m = g.model
    prod, inits = _producers(m), _inits(m)
    nodes = {n.name: n for n in m.graph.node}
    for name in LAYERS:
        node = nodes[name]
        act, w = prod[node.input[0]], prod[node.input[1]]
        # activation input: Q -> DQ, symmetric int8 (zero-point 0 of type int8), positive scalar scale
        assert act.op_type == "DequantizeLinear" and prod[act.input[0]].op_type == "QuantizeLinear"
        assert inits[act.input[2]].dtype == np.int8 and inits[act.input[2]] == 0
        assert inits[act.input[1]].ndim == 0 and inits[act.input[1]] > 0
        # weight: int8 initializer, per output channel along TensorRT's axis, axis always written
        assert w.op_type == "DequantizeLinear" and inits[w.input[0]].dtype == np.int8
        axis = _attr(w, "axis")
        assert axis == {"Conv": 0, "Gemm": 0, "MatMul": 1}[node.op_type] == weight_axis(node)
        assert inits[w.input[1]].shape == (inits[w.input[0]].shape[axis],)
        assert np.all(inits[w.input[1]] > 0) and np.all(inits[w.input[2]] == 0)
    # no Q/DQ on outputs: the graph output and the residual branch leave their layers in float
    assert prod["y"].name == "out" and prod["y"].op_type == "MatMul"
    assert [c.op_type for c in m.graph.node if "p" in c.input] == ["Add"]
    # biases stay float
    assert inits["expand.bias"].dtype == np.float32 and nodes["expand"].input[2] == "expand.bias"
    # residual Add: the branch (project's output, used by the Add alone) enters without Q/DQ, the skip input with it
    add = nodes["residual"]
    assert prod[add.input[0]].name == "project"
    assert prod[add.input[1]].op_type == "DequantizeLinear"
    # the skip's Q/DQ is the same one the expand conv reads: one scale per tensor
    assert add.input[1] == nodes["expand"].input[0]
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == 5  # x, er, s, f, g
    assert g.engine_flags()["int8"] and not g.engine_flags()["sparse_weights"]
    assert g.refittable == ["expand.bias", "fc.bias"]
    assert check(m, "10.3", "8.7") == []


def test_int8_graph_numerics_match_float_and_the_int8_weights():
    fp32, calib = residual_net(), _calib(64)
    g = tensorrt_graph(fp32, _plan(dict.fromkeys(LAYERS, "w8a8")), calib)
    x = _calib(16, seed=7).inputs["x"]
    ref, got = _run(fp32, {"x": x}), _run(g.model, {"x": x})
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.mean() > 0.995, cos  # int8 of a 5-layer net
    sqnr = 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum())
    assert sqnr > 20.0, sqnr
    # weights: the dequantized int8 weight is within half a step of the float one
    w = numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "head.weight"))
    q, s = int8_per_channel(w, 0)
    assert np.all(np.abs(q.astype(np.float32) * s[:, None, None, None] - w) <= s[:, None, None, None] / 2 + 1e-7)


def test_fp32_layers_of_the_plan_stay_float():
    g = tensorrt_graph(residual_net(), _plan({"head": "w8a8"}), _calib())
    prod = _producers(g.model)
    nodes = {n.name: n for n in g.model.graph.node}
    assert g.int8_layers == ["head"]
    for name in ("expand", "project", "fc", "out"):
        assert nodes[name].input[1] in _inits(g.model)  # float initializer, no DQ
        assert nodes[name].input[0] not in prod or prod[nodes[name].input[0]].op_type != "DequantizeLinear"
    assert prod[nodes["head"].input[0]].op_type == "DequantizeLinear"


def test_zero_weight_channel_gets_a_positive_scale():
    w = np.zeros((4, 3), np.float32)
    w[1] = [1.0, -2.0, 0.5]
    q, s = int8_per_channel(w, 0)
    assert np.all(s > 0) and np.all(q[0] == 0) and q[1, 1] == -127


def test_axes_for_each_weighted_op():
    conv = helper.make_node("Conv", ["a", "w"], ["y"])
    gemm_t = helper.make_node("Gemm", ["a", "w"], ["y"], transB=1)
    gemm = helper.make_node("Gemm", ["a", "w"], ["y"])
    mm = helper.make_node("MatMul", ["a", "w"], ["y"])
    assert [weight_axis(n) for n in (conv, gemm_t, gemm, mm)] == [0, 0, 1, 1]
    assert [reduction_axis(n) for n in (conv, gemm_t, gemm, mm)] == [1, 1, 0, 0]


def test_mse_amax_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(0)

    def quant_mse(x, c):
        s = c / 127.0
        return float(((np.clip(np.round(x / s), -127, 127) * s - x) ** 2).mean())

    for x in (rng.standard_t(3, 100_000).astype(np.float32), rng.laplace(0, 1, 100_000).astype(np.float32),
              rng.uniform(-1, 1, 100_000).astype(np.float32)):
        top = float(np.abs(x).max())
        edges = np.linspace(0, top, 2049)
        hist, _ = np.histogram(np.abs(x), bins=edges)
        c = mse_amax(hist, edges)
        grid = np.linspace(top / 16, top, 120)
        best = min(quant_mse(x, g) for g in grid)
        assert quant_mse(x, c) <= 1.05 * best, (c, top)
        assert quant_mse(x, c) <= quant_mse(x, top)


# ------------------------------------------------------------------------------------------------ INT4, 2:4, plugins
def _linear_net(k: int = 128, n: int = 16, seed: int = 0, weight=None) -> onnx.ModelProto:
    w = weight if weight is not None else np.random.default_rng(seed).normal(0, 0.2, (k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "lin.weight"], ["y"], name="lin")]
    return _model(nodes, {"lin.weight": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])])


@pytest.mark.parametrize("group", [64, 128])
def test_int4_blocked_dequantize_matches_the_plan_weights(group):
    from edgekit.compress.wquant import rtn

    fp32 = _linear_net()
    w = numpy_helper.to_array(fp32.graph.initializer[0])
    qw = rtn(w.T, 4, group, symmetric=True)  # QWeight is [N, K]
    g = tensorrt_graph(fp32, _plan({"lin": f"w4g{group}s"}, ("lin",)), _calib(8, (128,)), weights={"lin": qw})
    assert g.int4_layers == ["lin"] and g.engine_flags()["int4"]
    dq = next(n for n in g.model.graph.node if n.op_type == "DequantizeLinear")
    codes = next(i for i in g.model.graph.initializer if i.name == dq.input[0])
    assert codes.data_type == TensorProto.INT4 and len(dq.input) == 2  # no zero-point: symmetric
    assert _attr(dq, "block_size") == group and _attr(dq, "axis") == 0
    assert max(op.version for op in g.model.opset_import if op.domain == "") >= 21
    x = np.random.default_rng(3).normal(0, 1, (4, 128)).astype(np.float32)
    # ONNX Runtime's optimizer would fuse DQ -> MatMul into MatMulNBits with int8 activations (~1 % off); TensorRT
    # dequantizes to FP16: compare the graph itself, unoptimized
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(g.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)
    assert check(g.model, "10.3", "8.7") == []
    assert any("INT4 does not exist" in p.message for p in check(g.model, "8.6", "8.7"))


def test_int4_needs_tensorrt_10_and_symmetric_64_128_groups():
    fp32 = _linear_net()
    for option, major in (("w4g128s", 8), ("w4g32s", 10), ("w4g128", 10), ("w2g64s", 10)):
        with pytest.raises(UnsupportedOnTarget, match="lin"):
            tensorrt_graph(fp32, _plan({"lin": option}, ("lin",)), _calib(8, (128,)), tensorrt_major=major,
                           weights={})


def test_sparse_24_layers_are_checked_and_flagged():
    from edgekit.compress.sparsity import nm_mask

    w = np.random.default_rng(0).normal(0, 0.2, (128, 16)).astype(np.float32)
    dense = _linear_net(weight=w)
    plan = _plan({"lin": "sparse2:4+w8a8"}, ("lin",))
    with pytest.raises(ExportError, match="not 2:4 sparse"):
        tensorrt_graph(dense, plan, _calib(8, (128,)))
    pruned = w * nm_mask(np.abs(w.T), 2, 4).T  # 2 of every 4 along K (the reduction axis of MatMul B)
    g = tensorrt_graph(_linear_net(weight=pruned), plan, _calib(8, (128,)))
    assert g.sparse_layers == ["lin"] and g.int8_layers == ["lin"] and g.engine_flags()["sparse_weights"]
    with pytest.raises(UnsupportedOnTarget, match="4:8"):
        tensorrt_graph(_linear_net(weight=pruned), _plan({"lin": "sparse4:8+w8a8"}, ("lin",)), _calib(8, (128,)))


def test_other_weight_only_options_become_plugin_nodes():
    from edgekit.compress.wquant import rtn
    from edgekit.export.trt_plugins import PLUGIN_NAMESPACE

    fp32 = _linear_net()
    qw = rtn(numpy_helper.to_array(fp32.graph.initializer[0]).T, 2, 32)
    plan = _plan({"lin": "w2g32"}, ("lin",))
    with pytest.raises(UnsupportedOnTarget, match="plugins"):
        tensorrt_graph(fp32, plan, _calib(8, (128,)), weights={"lin": qw})
    g = tensorrt_graph(fp32, plan, _calib(8, (128,)), plugins=True, weights={"lin": qw})
    assert g.plugin_layers == ["lin"] and [n.op_type for n in g.model.graph.node] == ["MatMulLowBit"]
    # in ONNX Runtime form the host can verify it; in TensorRT form it is a plugin node the parser maps
    node = g.for_tensorrt().graph.node[0]
    assert node.op_type == "EdgekitMatMulLowBit"
    attrs = {a.name: a for a in node.attribute}
    assert attrs["plugin_namespace"].s.decode() == PLUGIN_NAMESPACE and attrs["plugin_version"].type == 3  # STRING
    assert check(g.for_tensorrt(), "10.3", "8.7", plugins=True) == []
    problems = check(g.for_tensorrt(), "10.3", "8.7", plugins=False)
    assert [p.node for p in problems] == ["lin"] and "plugin library" in problems[0].message
    assert any("not in TensorRT plugin form" in p.message for p in check(g.model, "10.3", "8.7", plugins=True))


# ------------------------------------------------------------------------------------------------ pre-flight errors
def _qdq_model(zp=None, scale=0.1, extra_nodes=(), opset=18, w_axis=True):
    zp = np.int8(0) if zp is None else zp
    w = np.ones((4, 3), np.float32)
    inits = {"s": np.array(scale, np.float32), "z": np.array(zp), "w": w, "ws": np.full(4, 0.1, np.float32),
             "wq": np.ones((4, 3), np.int8), "wz": np.zeros(4, np.int8)}
    kw = {"axis": 0} if w_axis else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="wdq", **kw),
             helper.make_node("Gemm", ["dq", "wdq"], ["y"], name="fc", transB=1), *extra_nodes]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], opset=opset)


def test_preflight_accepts_a_clean_qdq_graph():
    assert check(_qdq_model(), "10.3", "8.7") == []


@pytest.mark.parametrize("kwargs, version, needle, node", [
    ({"zp": np.uint8(0)}, "10.3", "UINT8 zero-point", "q"),
    ({"zp": np.int8(3)}, "10.3", "not a constant zero", "q"),
    ({"scale": np.float32(0.0)}, "10.3", "not strictly positive", "q"),
    ({"w_axis": False}, "10.3", "without an explicit axis", "wdq"),
    ({"opset": 18}, "8.6", "outside TensorRT 8.6's range", "(model)"),
    ({"extra_nodes": [helper.make_node("Unique", ["y"], ["u"], name="uniq")]}, "10.3", "not an operator", "uniq"),
    ({"extra_nodes": [helper.make_node("DynamicQuantizeLinear", ["y"], ["a", "b", "c"], name="dql")]}, "10.3",
     "ONNX Runtime integer op", "dql"),
])
def test_preflight_names_the_node_and_the_problem(kwargs, version, needle, node):
    problems = check(_qdq_model(**kwargs), version, "8.7")
    hit = [p for p in problems if needle in p.message]
    assert hit and hit[0].node == node and hit[0].hint, problems


def test_preflight_refuses_fp8_before_sm89_and_sparsity_before_sm80():
    m = _qdq_model()
    m.graph.initializer.append(helper.make_tensor("z8", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    m.graph.node[0].input[2] = "z8"
    assert any("FP8" in p.message for p in check(m, "10.3", "8.7"))
    assert not any("FP8" in p.message for p in check(m, "10.3", "8.9"))
    assert any(p.op == "sparsity" for p in check(_qdq_model(), "10.3", "7.2", sparse=True))


def test_require_raises_one_clear_error_for_the_target():
    bad = _qdq_model(zp=np.uint8(0))
    with pytest.raises(UnsupportedOnTarget) as err:
        require(bad, load_target("jetson-orin-nano"), stage="test graph")
    text = str(err.value)
    assert "TensorRT 10.3 pre-flight failed for the test graph" in text and "q (QuantizeLinear)" in text
    require(_qdq_model(), load_target("jetson-orin-nano"))  # passes silently


def test_apply_plan_tensorrt_corrects_biases_and_preflights(tmp_path):
    from dataclasses import replace

    from edgekit.context import Context
    from edgekit.export.onnx import describe
    from edgekit.tensorrt_artifact import FORMAT, apply_plan_tensorrt

    path = tmp_path / "fp32.onnx"
    fp32 = residual_net(seed=3)
    onnx.save(fp32, str(path))
    calib = _calib(64)
    plan = _plan(dict.fromkeys(LAYERS, "w8a8"))
    profile = load_target("jetson-orin-nano")
    art, g = apply_plan_tensorrt(plan, describe(path), calib, tmp_path / "a.onnx", profile, Context())
    plain, _ = apply_plan_tensorrt(replace(plan, activations={"bias_correction": False}), describe(path), calib,
                                   tmp_path / "b.onnx", profile, Context())
    assert art.format == FORMAT and art.runtime == "tensorrt" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.onnx", "b.onnx", "fp32.onnx"]  # no temporary files left behind
    x = calib.inputs["x"]
    ref = _run(fp32, {"x": x})
    err = {k: np.abs((_run(onnx.load(str(a.path)), {"x": x}) - ref).mean(axis=0)).mean() for k, a in
           (("corrected", art), ("plain", plain))}
    assert err["corrected"] < err["plain"], err  # the systematic (mean) error shrinks on the calibration data
