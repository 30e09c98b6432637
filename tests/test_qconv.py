"""ai.edgekit::QLinearDepthwiseConv: the numpy reference against ONNX Runtime's QLinearConv, the native kernels
(every path this CPU has) against the reference, the export rewrite, and the standard-op fallback.

Tolerance: none. The op is specified as QLinearConv's exact int32 sums and float32 requantization, so the reference,
ONNX Runtime's QLinearConv and the native kernels must produce the same uint8 tensors (``np.array_equal``).
Without the built library the native tests skip, except in CI (CI set), where they fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.kernels import ort_native, qconv

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

ISAS = ("scalar", "avx2", "avx512")

# (N, H, W, C, kh, kw, strides, pads [t, l, b, r], dilations): EfficientNet-Lite0's shapes (small), every channel
# tail of the AVX-512 kernel (C % 64 in 1..16, 17..32, 33..48, 49..63 and 0), odd kernels, asymmetric pads,
# strides, dilation, a batch of 2, and a row narrower than a vector of pixels.
CASES = [
    (1, 12, 12, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 11, 13, 96, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 9, 9, 144, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    (1, 10, 10, 240, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1)),
    (2, 7, 7, 1152, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    (1, 8, 9, 7, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 6, 17, 64, 1, 3, (1, 1), (0, 1, 0, 1), (1, 1)),
    (1, 9, 8, 200, 3, 2, (2, 1), (0, 2, 1, 0), (1, 1)),
    (1, 13, 12, 48, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)),
    (1, 2, 3, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
]


def _params(rng, C, kh, kw, *, bias=True, per_channel=True):
    w = rng.integers(-127, 128, (C, 1, kh, kw), dtype=np.int8)
    return {
        "x_scale": np.float32(rng.uniform(0.01, 0.1)), "x_zero": np.uint8(rng.integers(0, 256)),
        "w": w, "w_scale": (rng.uniform(0.001, 0.02, C) if per_channel else rng.uniform(0.001, 0.02, 1))
        .astype(np.float32), "y_scale": np.float32(rng.uniform(0.02, 0.2)), "y_zero": np.uint8(rng.integers(0, 256)),
        "bias": rng.integers(-20000, 20000, C).astype(np.int32) if bias else None,
    }


def _inits(p, C):
    inits = [nh.from_array(np.array(p["x_scale"], np.float32), "xs"), nh.from_array(np.array(p["x_zero"]), "xz"),
             nh.from_array(p["w"], "w"), nh.from_array(p["w_scale"], "ws"),
             nh.from_array(np.zeros(p["w_scale"].size, np.int8), "wz"),
             nh.from_array(np.array(p["y_scale"], np.float32), "ys"), nh.from_array(np.array(p["y_zero"]), "yz")]
    names = ["xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if p["bias"] is not None:
        inits.append(nh.from_array(p["bias"], "b"))
        names.append("b")
    return inits, names


def _attrs(kh, kw, strides, pads, dilations):
    return {"kernel_shape": [kh, kw], "strides": list(strides), "pads": list(pads), "dilations": list(dilations)}


def _custom_model(p, x_shape, attrs):
    C = x_shape[3]
    inits, names = _inits(p, C)
    node = oh.make_node(qconv.OP_DEPTHWISE, ["x", *names], ["y"], domain=qconv.DOMAIN, **attrs)
    graph = oh.make_graph([node], "dw", [oh.make_tensor_value_info("x", TP.UINT8, list(x_shape))],
                          [oh.make_tensor_value_info("y", TP.UINT8, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(qconv.DOMAIN, 1)])


def _qlinearconv(p, x_nchw, attrs):
    C = x_nchw.shape[1]
    inits, names = _inits(p, C)
    group = C if p["w"].shape[1] == 1 and p["w"].shape[0] == C else 1
    node = oh.make_node("QLinearConv", ["x", *names], ["y"], group=group, **attrs)
    graph = oh.make_graph([node], "ref", [oh.make_tensor_value_info("x", TP.UINT8, list(x_nchw.shape))],
                          [oh.make_tensor_value_info("y", TP.UINT8, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x_nchw})[0]


def _reference(p, x, attrs):
    return qconv.reference(x, p["x_scale"], p["x_zero"], p["w"], p["w_scale"], p["y_scale"], p["y_zero"], p["bias"],
                            **attrs)


@pytest.mark.parametrize("case", CASES[:6])
def test_the_reference_equals_onnx_runtime_qlinearconv(case):
    N, H, W, C, kh, kw, strides, pads, dil = case
    rng = np.random.default_rng(C + kh)
    p = _params(rng, C, kh, kw, per_channel=C % 2 == 0)
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    attrs = _attrs(kh, kw, strides, pads, dil)
    want = _qlinearconv(p, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), attrs).transpose(0, 2, 3, 1)
    assert np.array_equal(_reference(p, x, attrs), want)


def test_the_reference_rejects_a_kernel_larger_than_the_padded_input():
    p = _params(np.random.default_rng(0), 4, 5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        _reference(p, np.zeros((1, 3, 3, 4), np.uint8), _attrs(5, 5, (1, 1), (0, 0, 0, 0), (1, 1)))


@pytest.fixture(params=ISAS)
def isa(request, library, monkeypatch):
    best = ort_native.best_isa()
    if best is None or ISAS.index(request.param) > ISAS.index(best):
        pytest.skip(f"this CPU has no {request.param} path (best: {best})")
    monkeypatch.setenv("EDGEKIT_ORT_ISA", request.param)
    return request.param


def _native(model, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    assert ort_native.register_native(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", CASES)
def test_the_native_kernels_equal_the_reference(case, isa):
    N, H, W, C, kh, kw, strides, pads, dil = case
    rng = np.random.default_rng(7 * C + kw)
    for bias, per_channel in ((True, True), (False, False)):
        p = _params(rng, C, kh, kw, bias=bias, per_channel=per_channel)
        x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
        attrs = _attrs(kh, kw, strides, pads, dil)
        got = _native(_custom_model(p, x.shape, attrs)).run(None, {"x": x})[0]
        want = _reference(p, x, attrs)
        assert got.shape == want.shape
        assert np.array_equal(got, want), f"{isa}: {np.count_nonzero(got != want)} of {got.size} differ"


def test_saturation_at_both_ends_matches_the_reference(library):
    """Outputs far past 0..255 in both directions (huge accumulators) clamp as the reference's."""
    rng = np.random.default_rng(3)
    C = 80
    p = _params(rng, C, 3, 3)
    p["y_scale"] = np.float32(1e-4)  # every output saturates
    x = rng.integers(0, 256, (1, 6, 6, C), dtype=np.uint8)
    attrs = _attrs(3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    got = _native(_custom_model(p, x.shape, attrs)).run(None, {"x": x})[0]
    want = _reference(p, x, attrs)
    assert np.array_equal(got, want)
    assert (want == 0).any() and (want == 255).any()


# (N, H, W, Cin, Cout, k, strides, pads): an image model's stem (TF-style "same" padding and symmetric), a Cout that
# is not a multiple of 16, a batch of 2 with asymmetric padding, a kernel taller than the vectorized gather takes
# (7 rows: the byte-wise path), and a row narrower than four pixels.
DIRECT_CASES = [
    (1, 32, 30, 3, 32, 3, (2, 2), (0, 0, 1, 1)),
    (1, 17, 19, 3, 24, 3, (1, 1), (1, 1, 1, 1)),
    (2, 9, 9, 4, 40, 3, (2, 2), (1, 0, 0, 1)),
    (1, 12, 12, 1, 16, 7, (1, 1), (3, 3, 3, 3)),
    (1, 5, 3, 5, 8, 3, (1, 1), (1, 1, 1, 1)),
]


def _direct_params(rng, case):
    N, H, W, cin, cout, k, strides, pads = case
    p = _params(rng, cout, k, k)
    p["w"] = rng.integers(-127, 128, (cout, cin, k, k), dtype=np.int8)
    x = rng.integers(0, 256, (N, H, W, cin), dtype=np.uint8)
    return p, x, _attrs(k, k, strides, pads, (1, 1))


def _direct_model(p, x_shape, attrs):
    model = _custom_model(p, x_shape, attrs)
    model.graph.node[0].op_type = qconv.OP_DIRECT
    return model


@pytest.mark.parametrize("case", DIRECT_CASES[:3])
def test_the_direct_reference_equals_onnx_runtime_qlinearconv(case):
    p, x, attrs = _direct_params(np.random.default_rng(case[3] + case[4]), case)
    want = _qlinearconv(p, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), attrs).transpose(0, 2, 3, 1)
    assert np.array_equal(_reference(p, x, attrs), want)


@pytest.mark.parametrize("case", DIRECT_CASES)
def test_the_native_direct_kernels_equal_the_reference(case, isa):
    p, x, attrs = _direct_params(np.random.default_rng(11 * case[4] + case[5]), case)
    got = _native(_direct_model(p, x.shape, attrs)).run(None, {"x": x})[0]
    want = _reference(p, x, attrs)
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{isa}: {np.count_nonzero(got != want)} of {got.size} differ"


def test_the_direct_op_refuses_a_long_reduction(library):
    p, x, attrs = _direct_params(np.random.default_rng(12), (1, 8, 8, 8, 16, 3, (1, 1), (1, 1, 1, 1)))  # K = 72
    with pytest.raises(Exception, match="kh \\* kw \\* Cin must be at most 64"):
        _native(_direct_model(p, x.shape, attrs))


def test_the_op_refuses_non_constant_weights_and_asymmetric_weights(library):
    rng = np.random.default_rng(4)
    p = _params(rng, 16, 3, 3)
    attrs = _attrs(3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    model = _custom_model(p, (1, 5, 5, 16), attrs)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "w"))
    model.graph.input.append(oh.make_tensor_value_info("w", TP.INT8, [16, 1, 3, 3]))
    with pytest.raises(Exception, match="w must be a constant initializer"):
        _native(model)
    model = _custom_model(p, (1, 5, 5, 16), attrs)
    wz = next(i for i in model.graph.initializer if i.name == "wz")
    wz.CopyFrom(nh.from_array(np.ones(16, np.int8), "wz"))
    with pytest.raises(Exception, match="w_zero_point must be all zero"):
        _native(model)


def test_the_op_refuses_an_input_with_the_wrong_channel_count(library):
    p = _params(np.random.default_rng(5), 16, 3, 3)
    model = _custom_model(p, (1, 5, 5, 16), _attrs(3, 3, (1, 1), (1, 1, 1, 1), (1, 1)))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8
    sess = _native(model)
    with pytest.raises(Exception, match="channels last"):
        sess.run(None, {"x": np.zeros((1, 5, 5, 8), np.uint8)})


# --- the export rewrite -------------------------------------------------------------------------------------------


def _qdq_depthwise(rng, C=48, H=9, *, w_zero=0, group=None, cout=None, k=3):
    """x (float NCHW) -> Q -> DQ -> Conv(QDQ weight and int32 bias) -> Q -> DQ -> y: a static int8 graph in the form
    ONNX Runtime's quantizer writes; depthwise unless ``group`` is given (then ``cout`` outputs, default C)."""
    cout = C if cout is None else cout
    w = rng.integers(-127, 128, (cout, 1 if group is None else C // group, k, k), dtype=np.int8)
    xs, ws = np.float32(0.02), rng.uniform(0.002, 0.02, cout).astype(np.float32)
    inits = [
        nh.from_array(np.array(xs), "xs"), nh.from_array(np.array(np.uint8(120)), "xz"),
        nh.from_array(w, "wq"), nh.from_array(ws, "ws"), nh.from_array(np.full(cout, w_zero, np.int8), "wz"),
        nh.from_array(rng.integers(-3000, 3000, cout).astype(np.int32), "bq"), nh.from_array(xs * ws, "bs"),
        nh.from_array(np.zeros(cout, np.int32), "bz"),
        nh.from_array(np.array(np.float32(0.05)), "ys"), nh.from_array(np.array(np.uint8(10)), "yz"),
    ]
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        oh.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0, name="dqw"),
        oh.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0, name="dqb"),
        oh.make_node("Conv", ["xd", "wd", "bd"], ["c"], group=C if group is None else group, kernel_shape=[k, k],
                     pads=[k // 2] * 4, strides=[1, 1] if group is None else [2, 2], name="dw"),
        oh.make_node("QuantizeLinear", ["c", "ys", "yz"], ["yq"], name="qy"),
        oh.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy"),
    ]
    graph = oh.make_graph(nodes, "qdq", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", C, H, H])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _run(model, x, *, native=True):
    from edgekit.agent.runtime import OrtRuntime

    return OrtRuntime(model.SerializeToString()).run({"x": x})["y"] if native else \
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_rewrite_replaces_the_qdq_depthwise_conv_and_computes_the_same_tensor(library):
    from edgekit.export.ort_qconv import apply_qconv, rewritable_layers

    rng = np.random.default_rng(6)
    model = _qdq_depthwise(rng)
    assert rewritable_layers(model) == {"dw": qconv.OP_DEPTHWISE}
    out, done = apply_qconv(model)
    assert done == {"dw": qconv.OP_DEPTHWISE}
    ops = [(n.domain, n.op_type) for n in out.graph.node]
    assert (qconv.DOMAIN, qconv.OP_DEPTHWISE) in ops and ("", "Conv") not in ops
    assert ("", "QuantizeLinear") in ops and ops.count(("", "DequantizeLinear")) == 1  # x's Q and y's DQ stay
    assert any(o.domain == qconv.DOMAIN and o.version == 1 for o in out.opset_import)
    assert {i.name for i in out.graph.initializer}.isdisjoint({"bs", "bz"})  # the bias's float scale went with it
    x = rng.normal(0, 1.5, (2, 48, 9, 9)).astype(np.float32)
    assert np.array_equal(_run(out, x), _run(model, x, native=False))


def test_the_rewrite_takes_a_stem_conv_and_leaves_a_1x1_conv(library):
    from edgekit.export.ort_qconv import apply_qconv, rewritable_layers

    rng = np.random.default_rng(10)
    stem = _qdq_depthwise(rng, C=3, H=17, group=1, cout=24)
    assert rewritable_layers(stem) == {"dw": qconv.OP_DIRECT}
    out, done = apply_qconv(stem)
    assert done == {"dw": qconv.OP_DIRECT}
    x = rng.normal(0, 1.5, (2, 3, 17, 17)).astype(np.float32)
    assert np.array_equal(_run(out, x), _run(stem, x, native=False))
    assert rewritable_layers(_qdq_depthwise(rng, C=16, group=1, cout=32, k=1)) == {}  # a GEMM: ORT's own is good


@pytest.mark.parametrize("variant", ["weight zero point", "grouped conv"])
def test_the_rewrite_leaves_what_the_op_cannot_compute_exactly(variant):
    from edgekit.export.ort_qconv import apply_qconv, rewritable_layers

    rng = np.random.default_rng(8)
    model = _qdq_depthwise(rng, w_zero=3) if variant == "weight zero point" else _qdq_depthwise(rng, group=24)
    if variant == "grouped conv":  # two channels per group: the weight is [48, 2, 3, 3]
        w = next(i for i in model.graph.initializer if i.name == "wq")
        w.CopyFrom(nh.from_array(rng.integers(-127, 128, (48, 2, 3, 3), dtype=np.int8), "wq"))
    assert rewritable_layers(model) == {}
    out, done = apply_qconv(model)
    assert done == {} and out is model


def test_without_the_native_library_the_op_runs_as_qlinearconv(monkeypatch, caplog, tmp_path):
    from edgekit.export.ort_qconv import apply_qconv

    rng = np.random.default_rng(9)
    model = _qdq_depthwise(rng)
    out, _ = apply_qconv(model)
    x = rng.normal(0, 1.5, (1, 48, 9, 9)).astype(np.float32)
    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", str(tmp_path / "missing.so"))
    with caplog.at_level("WARNING"):
        got = _run(out, x)
    assert "the int8 convolutions as ONNX Runtime's QLinearConv" in caplog.text
    assert np.array_equal(got, _run(model, x, native=False))


def test_an_int8_plan_on_an_edgekit_target_runs_its_convolutions_as_edgekit_ops(tmp_path, library):
    """Uniform static int8 for cpu-x86-edgekit: the stem (3x3 over 3 channels) becomes QLinearConvDirect and the
    depthwise conv QLinearDepthwiseConv; the model's output equals, bit for bit, that of the same plan exported
    without the library's ops (ONNX Runtime's QLinearConv)."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.data import Dataset
    from edgekit.export.onnx import describe
    from edgekit.mixed import apply_plan
    from edgekit.plan import LayerChoice, Plan
    from tests.onnx_graphs import conv_net

    onnx.save(conv_net(), str(tmp_path / "fp32.onnx"))
    fp32 = describe(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(13)
    calib = Dataset("c", {"input": rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)}, None, "t")
    plan = Plan("x", "cpu-x86-edgekit", "int8", tuple(LayerChoice(n, "w8a8") for n in ("n0", "n1", "n2", "n3")))
    ctx = Context(progress=False)
    art = apply_plan(plan, fp32, calib, tmp_path / "edgekit" / "model.onnx", W8A8Config(), ctx)
    ops = {n.name: n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert ops["n0"] == qconv.OP_DIRECT and ops["n1"] == qconv.OP_DEPTHWISE
    plain = apply_plan(plan, fp32, calib, tmp_path / "plain" / "model.onnx", W8A8Config(), ctx, edgekit_kernels=False)
    assert qconv.OP_DEPTHWISE not in {n.op_type for n in onnx.load(str(plain.path)).graph.node}
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(OrtRuntime(art.path).run({"input": x})["logits"],
                          OrtRuntime(plain.path).run({"input": x})["logits"])


def test_the_sensitivity_tables_of_an_edgekit_target_read_the_qdq_graph(tmp_path, library):
    """The simulated mixes (compress.qdq.insert) take each layer from the uniform INT8 graph as ONNX Runtime's
    quantizer wrote it; on cpu-x86-edgekit the uniform artifact has ai.edgekit convolutions instead, so the tables
    must read the QDQ graph kept beside it (a fresh build failed with "layer '_conv_stem' is not in the quantized
    model" before)."""
    from types import SimpleNamespace

    from edgekit import mixed
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.data import Dataset
    from edgekit.export.onnx import describe
    from edgekit.inventory import layer_inventory
    from edgekit.targets import load_target
    from tests.onnx_graphs import conv_net

    onnx.save(conv_net(), str(tmp_path / "fp32.onnx"))
    fp32 = describe(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(14)
    calib = Dataset("c", {"input": rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)}, None, "t")
    ctx = Context(progress=False, cache_dir=tmp_path / "cache")
    t = mixed._tables(load_target("cpu-x86-edgekit"), SimpleNamespace(sha256=fp32.sha256), fp32,
                      layer_inventory(tmp_path / "fp32.onnx"), calib, tmp_path / "work", W8A8Config(), ctx,
                      weight_only=False)
    ops = {n.op_type for n in onnx.load(str(t.uniform_artifact.path)).graph.node}
    assert {qconv.OP_DIRECT, qconv.OP_DEPTHWISE} <= ops
    assert {"n0", "n1"} <= set(t.sens.values) and all("w8a8" in t.sens.values[n] for n in ("n0", "n1"))
