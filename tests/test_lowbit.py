"""Weight-only low-bit quantization: quantizers (RTN with MSE clipping, GPTQ), the MatMulNBits/GatherBlockQuantized
exporter, the weight-feeding simulator and the sensitivity table built with it. Numerics are checked against numpy
references at stated tolerances."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compress.wquant import gptq, gptq_prepare, hessian, rtn, storage_bytes
from edgekit.context import Context
from edgekit.data import Dataset
from edgekit.errors import ConfigError, ExportError
from edgekit.export.lowbit import apply_weight_only, weight_matrix
from edgekit.inventory import layer_inventory
from edgekit.wonly import LowBitQuantizer, WeightOnlyConfig, anchor_options, measure_feed_sensitivity, weight_only
from edgekit.wsim import FeedSimulator, int8_per_channel, to_graph_layout


def _sqnr(ref, out) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


@pytest.fixture(scope="module")
def correlated():
    """Inputs with correlated features (as real activations are) and a weight [N, K]."""
    rng = np.random.default_rng(0)
    k, n = 128, 96
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((2048, k)) @ mix + 0.1 * rng.standard_normal((2048, k))).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return x, w


# -- quantizers -----------------------------------------------------------------------------------------------------
def test_rtn_error_falls_with_bits_and_clipping_helps(correlated):
    _, w = correlated
    sq = {b: _sqnr(w, rtn(w, b, 32, clip=False).dequantize()) for b in (2, 3, 4, 8)}
    assert sq[2] < sq[3] < sq[4] < sq[8]
    assert sq[4] > 18 and sq[8] > 40  # ~6 dB per bit on Gaussian weights
    for b in (2, 4):
        assert _sqnr(w, rtn(w, b, 32, clip=True).dequantize()) >= sq[b]


def test_rtn_symmetric_and_padding():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 70)).astype(np.float32)  # K not a multiple of the group
    q = rtn(w, 4, 32, symmetric=True)
    assert q.zeros is None and (q.zero_points() == 8).all()
    assert q.q.shape == (5, 96) and q.dequantize().shape == (5, 70)
    assert _sqnr(w, q.dequantize()) > 15
    a = rtn(w, 4, 32)
    assert a.zeros is not None and a.q.max() <= 15
    with pytest.raises(ConfigError):
        rtn(w, 5, 32)
    with pytest.raises(ConfigError):
        rtn(w, 4, 48)


def test_gptq_beats_rtn_on_the_layer_output(correlated):
    x, w = correlated
    h = hessian(x)
    ref = x @ w.T
    for bits, group in ((4, 32), (3, 64), (2, 32)):
        e_rtn = np.mean((x @ rtn(w, bits, group, importance=np.diag(h)).dequantize().T - ref) ** 2)
        e_gptq = np.mean((x @ gptq(w, h, bits, group).dequantize().T - ref) ** 2)
        assert e_gptq < 0.8 * e_rtn, (bits, group, e_gptq, e_rtn)


def test_refit_scales_lowers_the_layer_output_error(correlated):
    from edgekit.compress.wquant import refit_scales

    x, w = correlated
    h = hessian(x)
    ref = x @ w.T
    for q in (rtn(w, 4, 32), gptq(w, h, 3, 32)):
        before = np.mean((x @ q.dequantize().T - ref) ** 2)
        r = refit_scales(q, w, h)
        assert (r.q == q.q).all()  # codes untouched, scales only
        assert np.mean((x @ r.dequantize().T - ref) ** 2) < before


def test_gptq_prepared_once_gives_the_same_weights(correlated):
    x, w = correlated
    h = hessian(x)
    prep = gptq_prepare(h)
    upper = prep.hinv.astype(np.float64)
    hp = h[np.ix_(prep.perm, prep.perm)].copy()
    hp[np.diag_indices(len(hp))] += 0.01 * np.mean(np.diag(h))
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(hp), rtol=1e-4, atol=1e-6 * np.abs(upper).max() ** 2)
    a, b = gptq(w, h, 4, 32), gptq(w, None, 4, 32, prep=prep)
    assert (a.q == b.q).all() and np.array_equal(a.scales, b.scales)
    with pytest.raises(ConfigError):
        gptq(w, np.eye(64), 4, 32)


# -- export ---------------------------------------------------------------------------------------------------------
def _tiny_model():
    """ids -> Gather(E) -> MatMul(W1) -> Gemm(W2, b2, transB): every kind the exporter rewrites."""
    rng = np.random.default_rng(2)
    e = rng.standard_normal((50, 64)).astype(np.float32)
    w1 = rng.standard_normal((64, 96)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((10, 96)).astype(np.float32) * 0.2
    b2 = rng.standard_normal(10).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                          [numpy_helper.from_array(a, n) for a, n in ((e, "E"), (w1, "W1"), (w2, "W2"), (b2, "b2"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (2, True)])
def test_matmulnbits_and_gather_block_quantized_match_numpy(bits, symmetric):
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {n.name: rtn(weight_matrix(n, inits), bits, 32, symmetric=symmetric) for n in model.graph.node}
    ids = np.array([0, 7, 49, 3], dtype=np.int64)
    b2 = numpy_helper.to_array(inits["b2"])
    ref = qs["emb"].dequantize()[ids] @ qs["fc1"].dequantize().T @ qs["fc2"].dequantize().T + b2
    exact = apply_weight_only(model, qs, accuracy_level=0)  # float compute: the dequantized weights exactly
    np.testing.assert_allclose(_run(exact, {"ids": ids}), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    fast = _run(apply_weight_only(model, qs, accuracy_level=4), {"ids": ids})  # int8 compute: close
    cos = np.sum(fast * ref) / np.linalg.norm(fast) / np.linalg.norm(ref)
    assert cos > 0.999
    ops = {n.op_type for n in exact.graph.node}
    assert ops == {"GatherBlockQuantized", "MatMulNBits"}
    stored = sum(numpy_helper.to_array(i).nbytes for i in exact.graph.initializer if i.name.startswith("fc1::"))
    assert stored == storage_bytes(96, 64, bits, 32, symmetric=symmetric)
    assert not {"E", "W1", "W2"} & {i.name for i in exact.graph.initializer}  # float weights are gone


def _assert_bias_fused(out, biased: dict[str, str]):
    """Every MatMulLowBit of ``biased`` (layer name -> bias initializer) takes its bias as the 5th input, and no
    ``Add`` reads any MatMulLowBit's output (the bias is fused in the op, not added after it)."""
    lowbit_out = {n.output[0]: n for n in out.graph.node if n.op_type == "MatMulLowBit"}
    for n in out.graph.node:
        assert not (n.op_type == "Add" and set(n.input) & set(lowbit_out)), f"{n.name} adds after a MatMulLowBit"
    nodes = {n.name: n for n in lowbit_out.values()}
    inits = {i.name: i for i in out.graph.initializer}
    for layer, bias in biased.items():
        node = nodes[layer]
        assert len(node.input) == 5 and node.input[4] == bias and bias in inits
        assert numpy_helper.to_array(inits[bias]).dtype == np.float32
        assert tuple(inits[bias].dims) == (int({a.name: a.i for a in node.attribute}["N"]),)


def test_three_bit_layers_export_as_ai_edgekit_ops_and_run(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    from edgekit.agent.runtime import OrtRuntime

    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {n: rtn(weight_matrix(node, inits), 3, 32) for n, node in (("fc1", model.graph.node[1]),
                                                                       ("fc2", model.graph.node[2]))}
    out = apply_weight_only(model, qs, accuracy_level=0)  # fp32 math: the dequantized weights exactly
    assert [n.op_type for n in out.graph.node].count("MatMulLowBit") == 2
    _assert_bias_fused(out, {"fc2": "fc2::bias"})
    assert "Add" not in {n.op_type for n in out.graph.node}
    ids = np.array([1, 2, 3], dtype=np.int64)
    e = numpy_helper.to_array(inits["E"])[ids]
    ref = e @ qs["fc1"].dequantize().T @ qs["fc2"].dequantize().T + numpy_helper.to_array(inits["b2"])
    got = OrtRuntime(out.SerializeToString()).run({"ids": ids})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_edgekit_ops_export_every_width_and_run_in_the_native_library(accuracy_level, monkeypatch):
    """On targets whose profile lists ai.edgekit, 2/4/8-bit layers export as MatMulLowBit too, and the runtime loads
    the native library for them by itself (fp32 math: the dequantized weights; int8 math: close)."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None:
        if os.environ.get("CI"):
            pytest.fail("the native ai.edgekit library must be built in CI (make install builds it)")
        pytest.skip("native ai.edgekit library not built (python runtimes/onnxruntime/build.py)")
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {"fc1": rtn(weight_matrix(model.graph.node[1], inits), 4, 32),
          "fc2": rtn(weight_matrix(model.graph.node[2], inits), 2, 32, symmetric=True)}
    out = apply_weight_only(model, qs, accuracy_level=accuracy_level, edgekit_ops=True)
    lowbit_nodes = [n for n in out.graph.node if n.op_type == "MatMulLowBit"]
    assert len(lowbit_nodes) == 2 and all(n.domain == "ai.edgekit" for n in lowbit_nodes)
    assert all({a.name: a.i for a in n.attribute}.get("accuracy_level", 0) == accuracy_level for n in lowbit_nodes)
    _assert_bias_fused(out, {"fc2": "fc2::bias"})  # the Gemm's bias (fc2 is symmetric: zero_points "")
    assert "Add" not in {n.op_type for n in out.graph.node}
    ids = np.array([1, 2, 3, 40], dtype=np.int64)
    e = numpy_helper.to_array(inits["E"])[ids]
    ref = e @ qs["fc1"].dequantize().T @ qs["fc2"].dequantize().T + numpy_helper.to_array(inits["b2"])
    def no_fallback():
        raise AssertionError("the Python fallback was used although the native library is built")

    monkeypatch.setattr("edgekit.kernels.ort_python.register_python_op", no_fallback)
    got = OrtRuntime(out.SerializeToString()).run({"ids": ids})["y"]
    if accuracy_level == 0:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    else:
        assert np.sum(got * ref) / np.linalg.norm(got) / np.linalg.norm(ref) > 0.999


def test_without_the_native_library_lowbit_falls_back_and_a_bad_sparse_op_is_a_clear_error(monkeypatch, tmp_path,
                                                                                              caplog):
    pytest.importorskip("onnxruntime_extensions")
    from edgekit.agent.runtime import OrtRuntime

    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", str(tmp_path / "missing.so"))
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {"fc1": rtn(weight_matrix(model.graph.node[1], inits), 4, 32)}
    out = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    ids = np.array([1, 2], dtype=np.int64)
    with caplog.at_level("WARNING"):
        got = OrtRuntime(out.SerializeToString()).run({"ids": ids})["y"]
    assert "reference fallback" in caplog.text
    ref = OrtRuntime(apply_weight_only(model, qs, accuracy_level=0).SerializeToString()).run({"ids": ids})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    sparse = onnx.ModelProto()
    sparse.CopyFrom(out)
    sparse.graph.node[1].op_type = "MatMulSparse24"  # MatMulLowBit's inputs: not a 2:4 weight to rewrite
    with pytest.raises(ExportError, match="native library is not built here"):
        OrtRuntime(sparse.SerializeToString())


@pytest.mark.parametrize("native", [True, False])
def test_a_k_not_a_multiple_of_the_group_exports_padded_rows_that_both_kernels_run(native, monkeypatch, tmp_path):
    """MatMulLowBit stores each row padded to whole groups (``kernels.lowbit``: ``padded_k``). fc2's K = 96 with
    groups of 64 pads to 128; an export of unpadded rows was refused by the native kernel (found probing a pruned
    MiniLM's FFN, K = 1344, w4g128)."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native
    from edgekit.kernels.lowbit import packed_row_bytes

    if native and ort_native.library_path() is None:
        pytest.skip("native ai.edgekit library not built (python runtimes/onnxruntime/build.py)")
    if not native:
        pytest.importorskip("onnxruntime_extensions")
        monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", str(tmp_path / "missing.so"))
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {"fc1": rtn(weight_matrix(model.graph.node[1], inits), 3, 128),  # K = 64: one group, half padding
          "fc2": rtn(weight_matrix(model.graph.node[2], inits), 4, 64)}
    out = apply_weight_only(model, qs, accuracy_level=0, edgekit_ops=True)
    stored = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert stored["fc1::B"] == (96, packed_row_bytes(128, 3)) and stored["fc2::B"] == (10, packed_row_bytes(128, 4))
    ids = np.array([1, 2, 3, 40], dtype=np.int64)
    e = numpy_helper.to_array(inits["E"])[ids]
    ref = e @ qs["fc1"].dequantize().T @ qs["fc2"].dequantize().T + numpy_helper.to_array(inits["b2"])
    got = OrtRuntime(out.SerializeToString()).run({"ids": ids})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_fused_bias_runs_through_the_python_fallback(monkeypatch, tmp_path):
    """Without the native library, a MatMulLowBit with a bias input still computes ``x @ W.T + b`` (the fallback
    moves the bias into an Add)."""
    pytest.importorskip("onnxruntime_extensions")
    from edgekit.agent.runtime import OrtRuntime

    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", str(tmp_path / "missing.so"))
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    qs = {"fc1": rtn(weight_matrix(model.graph.node[1], inits), 4, 32),
          "fc2": rtn(weight_matrix(model.graph.node[2], inits), 4, 32, symmetric=True)}
    out = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    _assert_bias_fused(out, {"fc2": "fc2::bias"})
    ids = np.array([4, 5, 6], dtype=np.int64)
    e = numpy_helper.to_array(inits["E"])[ids]
    ref = e @ qs["fc1"].dequantize().T @ qs["fc2"].dequantize().T + numpy_helper.to_array(inits["b2"])
    got = OrtRuntime(out.SerializeToString()).run({"ids": ids})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_matmul_then_bias_add_fuses_into_matmullowbit():
    """torch exports nn.Linear as MatMul -> Add(bias [N]); on ai.edgekit targets that Add becomes MatMulLowBit's
    fused bias (one op, no separate Add); an Add that could change the shape, adds a tensor that is not constant, or
    reads a MatMul output something else reads too, stays as it is. Outputs equal the unfused graph's."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    from edgekit.agent.runtime import OrtRuntime

    rng = np.random.default_rng(3)
    K, N = 64, 40
    ws = {f"W{i}": (rng.standard_normal((K, N)) * 0.1).astype(np.float32) for i in range(4)}
    b = rng.standard_normal(N).astype(np.float32)
    adds = {0: ["b", "m0"], 1: ["m1", "b2d"], 2: ["m2", "x40"], 3: ["m3", "b"]}  # bias first or second
    nodes = [h.make_node("Slice", ["x", "s0", "s1", "s2"], ["x40"], name="sl")]
    nodes += [n for i in range(4) for n in (h.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                                            h.make_node("Add", adds[i], [f"y{i}"], name=f"a{i}"))]
    nodes.append(h.make_node("Relu", ["m3"], ["r3"], name="relu3"))
    inits = [numpy_helper.from_array(w, n) for n, w in ws.items()] + [
        numpy_helper.from_array(b, "b"), numpy_helper.from_array(b[None], "b2d"),
        numpy_helper.from_array(np.array([0]), "s0"), numpy_helper.from_array(np.array([N]), "s1"),
        numpy_helper.from_array(np.array([1]), "s2")]
    outs = [h.make_tensor_value_info(y, TP.FLOAT, None) for y in ("y0", "y1", "y2", "y3", "r3")]
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [3, K])], outs, inits),
                         opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    qs = {f"fc{i}": rtn(ws[f"W{i}"].T.copy(), 4, 32) for i in range(4)}
    fused = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    ops = {n.name: n for n in fused.graph.node}
    assert "a0" not in ops and len(ops["fc0"].input) == 5 and ops["fc0"].output[0] == "y0"
    assert {"a1", "a2", "a3"} <= set(ops) and all(len(ops[f"fc{i}"].input) < 5 for i in (1, 2, 3))
    plain = apply_weight_only(model, qs, accuracy_level=0)  # MatMulNBits, the Adds kept
    assert "a0" in {n.name for n in plain.graph.node}
    x = rng.standard_normal((3, K)).astype(np.float32)
    got, ref = OrtRuntime(fused.SerializeToString()).run({"x": x}), OrtRuntime(plain.SerializeToString()).run({"x": x})
    for y in ("y0", "y1", "y2", "y3", "r3"):
        np.testing.assert_allclose(got[y], ref[y], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["y0"], x @ qs["fc0"].dequantize().T + b, rtol=1e-4, atol=1e-4)


def _gelu_model(rng, K=64, N=40):
    """x [3, K] -> four MatMul (+ bias Add) -> exact GELU as torch exports it, in the two Mul orders, one GELU whose
    intermediate is also an output, and one after a MatMul without bias."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    ws = {f"W{i}": (rng.standard_normal((K, N)) * 0.3).astype(np.float32) for i in range(4)}
    b = rng.standard_normal(N).astype(np.float32)
    consts = {"sqrt2": np.float32(np.sqrt(2.0)), "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = []
    for i in range(4):
        y = f"y{i}"
        nodes.append(h.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"], name=f"fc{i}"))
        if i != 3:
            nodes.append(h.make_node("Add", [f"m{i}", "b"], [y], name=f"add{i}"))
        else:
            y = f"m{i}"
        nodes += [h.make_node("Div", [y, "sqrt2"], [f"d{i}"], name=f"div{i}"),
                  h.make_node("Erf", [f"d{i}"], [f"e{i}"], name=f"erf{i}"),
                  h.make_node("Add", [f"e{i}", "one"], [f"p{i}"], name=f"plus{i}")]
        if i == 1:  # Mul(y, erf + 1) -> Mul(0.5)
            nodes += [h.make_node("Mul", [y, f"p{i}"], [f"u{i}"], name=f"mul{i}"),
                      h.make_node("Mul", [f"u{i}", "half"], [f"g{i}"], name=f"half{i}")]
        else:  # Mul(0.5, erf + 1) -> Mul(y), as torch's exporter
            nodes += [h.make_node("Mul", ["half", f"p{i}"], [f"u{i}"], name=f"half{i}"),
                      h.make_node("Mul", [y, f"u{i}"], [f"g{i}"], name=f"mul{i}")]
    outs = [f"g{i}" for i in range(4)] + ["e2"]  # erf2 is read outside its GELU: that one must stay
    inits = [numpy_helper.from_array(w, n) for n, w in ws.items()] + [numpy_helper.from_array(b, "b")] + [
        numpy_helper.from_array(np.array(v), k) for k, v in consts.items()]
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [3, K])],
                                      [h.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], inits),
                         opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    return model, {f"fc{i}": rtn(ws[f"W{i}"].T.copy(), 4, 32) for i in range(4)}, b


def test_matmul_then_gelu_fuses_into_matmullowbit(monkeypatch):
    """On ai.edgekit ONNX Runtime targets (``fuse_activations``), torch's exact GELU after a low-bit MatMul (+ bias)
    becomes MatMulLowBit's ``activation="Gelu"``: its five nodes go, in either Mul order, with or without a bias;
    a GELU whose intermediate something else reads stays. Outputs equal the unfused graph's (native library, fp32
    math: to float rounding), and the Python fallback computes the same."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None and not os.environ.get("CI"):
        pytest.skip("native ai.edgekit library not built")
    rng = np.random.default_rng(11)
    model, qs, b = _gelu_model(rng)
    fused = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0, fuse_activations=True)
    ops = {n.name: n for n in fused.graph.node}
    act = {n: {a.name: a.s for a in ops[n].attribute}.get("activation", b"") for n in ("fc0", "fc1", "fc2", "fc3")}
    assert act == {"fc0": b"Gelu", "fc1": b"Gelu", "fc2": b"", "fc3": b"Gelu"}
    for i in (0, 1, 3):
        assert not {f"div{i}", f"erf{i}", f"plus{i}", f"mul{i}", f"half{i}"} & set(ops)
        assert ops[f"fc{i}"].output[0] == f"g{i}"
    assert {"div2", "erf2", "plus2", "mul2", "half2"} <= set(ops)
    assert len(ops["fc0"].input) == 5 and len(ops["fc3"].input) < 5  # biases fused where there is one
    unfused = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    assert not any(a.name == "activation" for n in unfused.graph.node for a in n.attribute)
    x = (rng.standard_normal((3, 64)) * 2).astype(np.float32)
    got = OrtRuntime(fused.SerializeToString()).run({"x": x})
    ref = OrtRuntime(unfused.SerializeToString()).run({"x": x})
    for y in ("g0", "g1", "g2", "g3", "e2"):
        np.testing.assert_allclose(got[y], ref[y], rtol=1e-5, atol=1e-5)
    from math import erf

    h0 = x.astype(np.float64) @ qs["fc0"].dequantize().T.astype(np.float64) + b
    gelu = h0 * 0.5 * (1 + np.vectorize(erf)(h0 / np.sqrt(2)))
    np.testing.assert_allclose(got["g0"], gelu, rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", "/nonexistent/libedgekit_ort.so")
    slow = OrtRuntime(fused.SerializeToString()).run({"x": x})
    for y in ("g0", "g1", "g3"):
        np.testing.assert_allclose(slow[y], ref[y], rtol=1e-5, atol=1e-5)


def test_sibling_matmuls_merge_into_one_matmullowbit_with_split_outputs(monkeypatch):
    """On ai.edgekit ONNX Runtime targets, low-bit MatMuls that read the same input in the same weight format (Q, K
    and V) become one MatMulLowBit whose ``split`` outputs are theirs (biases concatenated, zeros where a member had
    none); a different format or a fused GELU stays separate. Outputs equal the unmerged graph's, natively and
    through the Python fallback."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None and not os.environ.get("CI"):
        pytest.skip("native ai.edgekit library not built")
    rng = np.random.default_rng(12)
    K = 64
    widths = {"q": 40, "k": 40, "v": 24, "o": 40}
    ws = {n: (rng.standard_normal((K, w)) * 0.2).astype(np.float32) for n, w in widths.items()}
    bq, bv = rng.standard_normal(40).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", f"W{n}"], [f"m{n}"], name=n) for n in widths]
    nodes += [h.make_node("Add", ["mq", "bq"], ["yq"], name="addq"),
              h.make_node("Add", ["bv", "mv"], ["yv"], name="addv")]
    inits = [numpy_helper.from_array(w, f"W{n}") for n, w in ws.items()]
    inits += [numpy_helper.from_array(bq, "bq"), numpy_helper.from_array(bv, "bv")]
    outs = [h.make_tensor_value_info(y, TP.FLOAT, None) for y in ("yq", "mk", "yv", "mo")]
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [5, K])], outs, inits),
                         opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    qs = {n: rtn(ws[n].T.copy(), 4, 32) for n in ("q", "k", "v")} | {"o": rtn(ws["o"].T.copy(), 2, 32)}
    merged = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0, fuse_activations=True)
    lowbit_nodes = [n for n in merged.graph.node if n.op_type == "MatMulLowBit"]
    assert len(lowbit_nodes) == 2 and "Add" not in {n.op_type for n in merged.graph.node}
    qkv = next(n for n in lowbit_nodes if len(n.output) == 3)
    assert qkv.name == "q+k+v" and list(qkv.output) == ["yq", "mk", "yv"]
    assert [a.ints for a in qkv.attribute if a.name == "split"] == [[40, 40, 24]]
    bias = numpy_helper.to_array(next(i for i in merged.graph.initializer if i.name == qkv.input[4]))
    np.testing.assert_array_equal(bias, np.concatenate([bq, np.zeros(40, np.float32), bv]))
    plain = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    assert sum(n.op_type == "MatMulLowBit" for n in plain.graph.node) == 4
    x = rng.standard_normal((5, K)).astype(np.float32)
    got, ref = OrtRuntime(merged.SerializeToString()).run({"x": x}), OrtRuntime(plain.SerializeToString()).run({"x": x})
    for y in ("yq", "mk", "yv", "mo"):
        np.testing.assert_allclose(got[y], ref[y], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["yv"], x @ qs["v"].dequantize().T + bv, rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", "/nonexistent/libedgekit_ort.so")
    slow = OrtRuntime(merged.SerializeToString()).run({"x": x})
    for y in ("yq", "mk", "yv", "mo"):
        np.testing.assert_allclose(slow[y], ref[y], rtol=1e-5, atol=1e-5)


def test_matmul_residual_layernorm_fuses_into_matmullowbit(monkeypatch):
    """A low-bit MatMul (+ bias) -> Add(residual of the same shape) -> LayerNormalization(constant scale, bias) becomes
    one MatMulLowBit with skip/ln_scale/ln_bias inputs and the LayerNorm's epsilon, emitted where the LayerNorm was
    (its residual may be computed after the MatMul); a residual that broadcasts (shape [1, N]) is not fused. Outputs
    equal the unfused graph's, natively and through the Python fallback."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    if ort_native.library_path() is None and not os.environ.get("CI"):
        pytest.skip("native ai.edgekit library not built")
    rng = np.random.default_rng(13)
    K, N = 64, 48
    w = {f"W{i}": (rng.standard_normal((K, N)) * 0.2).astype(np.float32) for i in range(2)}
    consts = {"b": rng.standard_normal(N), "g": rng.random(N) + 0.5, "beta": rng.standard_normal(N)}
    nodes = [h.make_node("MatMul", ["x", "W0"], ["m0"], name="fc0"),
             h.make_node("Add", ["m0", "b"], ["y0"], name="bias0"),
             h.make_node("Relu", ["r_in"], ["r"], name="late_residual"),  # computed after fc0
             h.make_node("Add", ["y0", "r"], ["s0"], name="res0"),
             h.make_node("LayerNormalization", ["s0", "g", "beta"], ["ln0"], name="ln0", axis=-1, epsilon=1e-6),
             h.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"),
             h.make_node("Add", ["m1", "row"], ["s1"], name="res1"),  # [1, N] residual: broadcasts
             h.make_node("LayerNormalization", ["s1", "g"], ["ln1"], name="ln1", axis=-1)]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()]
    ins = [h.make_tensor_value_info("x", TP.FLOAT, [5, K]), h.make_tensor_value_info("r_in", TP.FLOAT, [5, N]),
           h.make_tensor_value_info("row", TP.FLOAT, [1, N])]
    outs = [h.make_tensor_value_info(y, TP.FLOAT, None) for y in ("ln0", "ln1")]
    model = h.make_model(h.make_graph(nodes, "g", ins, outs, inits), opset_imports=[h.make_opsetid("", 21)],
                         ir_version=10)
    qs = {f"fc{i}": rtn(w[f"W{i}"].T.copy(), 4, 32) for i in range(2)}
    fused = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0, fuse_activations=True)
    ops = {n.name: n for n in fused.graph.node}
    assert not {"bias0", "res0", "ln0"} & set(ops) and {"res1", "ln1"} <= set(ops)
    fc0 = ops["fc0"]
    assert list(fc0.input[4:]) == ["fc0::bias", "r", "g", "beta"] and list(fc0.output) == ["ln0"]
    assert abs({a.name: a.f for a in fc0.attribute}["epsilon"] - 1e-6) < 1e-12
    order = [n.name for n in fused.graph.node]
    assert order.index("late_residual") < order.index("fc0")
    plain = apply_weight_only(model, qs, edgekit_ops=True, accuracy_level=0)
    feeds = {"x": rng.standard_normal((5, K)), "r_in": rng.standard_normal((5, N)), "row": rng.standard_normal((1, N))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    got, ref = OrtRuntime(fused.SerializeToString()).run(feeds), OrtRuntime(plain.SerializeToString()).run(feeds)
    for y in ("ln0", "ln1"):
        np.testing.assert_allclose(got[y], ref[y], rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", "/nonexistent/libedgekit_ort.so")
    slow = OrtRuntime(fused.SerializeToString()).run(feeds)
    np.testing.assert_allclose(slow["ln0"], ref["ln0"], rtol=1e-4, atol=1e-4)


def _conv_model():
    """x [N, 64, 5, 5] -> 1x1 Conv (48 out, bias) -> Relu -> 3x3 Conv (padded, not lowerable)."""
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((48, 64, 1, 1)) * 0.2).astype(np.float32)
    b1 = rng.standard_normal(48).astype(np.float32)
    w2 = (rng.standard_normal((8, 48, 3, 3)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="pw", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="k3", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 5, 5])],
                          [numpy_helper.from_array(a, k) for k, a in (("W1", w1), ("B1", b1), ("W2", w2))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("edgekit_ops", [False, True])
def test_pointwise_convs_lower_to_low_bit_matmuls(edgekit_ops):
    """A 1x1 conv becomes Transpose -> MatMulNBits / MatMulLowBit (+ bias) -> Transpose and computes the conv with the
    dequantized weights (fp32 math: to float rounding); a 3x3 conv is refused."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    if edgekit_ops and ort_native.library_path() is None and not os.environ.get("CI"):
        pytest.skip("native ai.edgekit library not built")
    model = _conv_model()
    inits = {i.name: i for i in model.graph.initializer}
    q = rtn(weight_matrix(model.graph.node[0], inits), 4, 32)
    out = apply_weight_only(model, {"pw": q}, accuracy_level=0, edgekit_ops=edgekit_ops)
    ops = [n.op_type for n in out.graph.node]
    assert ops[:2] == ["Transpose", "MatMulLowBit" if edgekit_ops else "MatMulNBits"] and "W1" not in {
        i.name for i in out.graph.initializer}
    assert "Add" not in ops  # the conv's bias is fused into either op
    if edgekit_ops:
        _assert_bias_fused(out, {"pw": "pw::bias"})
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    w = next(i for i in reference.graph.initializer if i.name == "W1")
    w.CopyFrom(numpy_helper.from_array(q.dequantize()[:, :64].reshape(48, 64, 1, 1).astype(np.float32), "W1"))
    x = np.random.default_rng(6).standard_normal((2, 64, 5, 5)).astype(np.float32)
    got = OrtRuntime(out.SerializeToString()).run({"x": x})["y"]
    ref = _run(reference, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    q3 = rtn(weight_matrix(model.graph.node[0], inits), 4, 32)
    with pytest.raises(ExportError, match="1x1"):
        apply_weight_only(model, {"k3": q3})


def test_apply_weight_only_refuses_what_it_cannot_rewrite():
    model = _tiny_model()
    inits = {i.name: i for i in model.graph.initializer}
    q = rtn(weight_matrix(model.graph.node[0], inits), 3, 32)
    with pytest.raises(ExportError, match="4/8-bit"):
        apply_weight_only(model, {"emb": q})  # no 3-bit gather
    with pytest.raises(ExportError, match="not in the graph"):
        apply_weight_only(model, {"nope": q})


# -- simulator ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    """x -> MatMul -> Relu -> MatMul: float model, data and inventory."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((32, 64)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((64, 16)).astype(np.float32) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset("d", {"x": rng.standard_normal((40, 32)).astype(np.float32)}, None, "test")
    return model, data, layer_inventory(model)


def test_feeding_float_weights_reproduces_the_model_and_low_bit_matches_the_export(mlp):
    model, data, layers = mlp
    sim = FeedSimulator(model, layers, dynamic=["fc1", "fc2"])
    ref = _run(model, {"x": data.inputs["x"]})
    np.testing.assert_array_equal(sim.output(data), ref)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    q = rtn(weight_matrix(nodes["fc1"], inits), 4, 32)
    fed = sim.output(data, {"fc1": to_graph_layout(nodes["fc1"], q.dequantize())})
    exported = _run(apply_weight_only(model, {"fc1": q}, accuracy_level=0), {"x": data.inputs["x"]})
    np.testing.assert_allclose(fed, exported, rtol=1e-5, atol=1e-5)


def test_dynamic_gate_matches_onnxruntime_quantize_dynamic(mlp, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, data, layers = mlp
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_quantize=["fc1"])
    dyn = onnx.load(str(tmp_path / "d.onnx"))
    # per call, activations get their own scale: compare sample by sample (the simulator runs gated layers so)
    want = np.concatenate([_run(dyn, {"x": data.inputs["x"][i : i + 1]}) for i in range(len(data))])
    sim = FeedSimulator(model, layers, dynamic=["fc1"])
    nodes = {n.name: n for n in model.graph.node}
    w = to_graph_layout(nodes["fc1"], int8_per_channel(to_graph_layout(nodes["fc1"], sim.float_weights["fc1"])))
    got = sim.output(data, {"fc1": w}, gates=["fc1"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(got - sim.output(data)).max() > 1e-4  # the gate really quantizes
    with pytest.raises(ExportError):
        sim.output(data, gates=["fc2"])


def test_hessians_are_two_xtx_over_n(mlp):
    model, data, layers = mlp
    sim = FeedSimulator(model, layers, collect=True)
    hs = sim.hessians(data, ["fc1", "fc2"])
    x = data.inputs["x"].astype(np.float64)
    np.testing.assert_allclose(hs["fc1"], 2 * x.T @ x / len(x), rtol=1e-10)
    r = np.maximum(x @ numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64), 0)
    np.testing.assert_allclose(hs["fc2"], 2 * r.T @ r / len(r), rtol=1e-4, atol=1e-6)


def test_feed_sensitivity_measures_anchors_scales_the_rest_and_caches(mlp, tmp_path):
    model, data, layers = mlp
    ctx = Context(cache_dir=tmp_path / "cache")
    opts = {"fc1": ["fp32", "w8a8d", "w4g32", "w2g32"], "fc2": ["fp32", "w8a8d", "w4g32", "w4g64", "w2g32"]}
    q = LowBitQuantizer(model, layers, data, WeightOnlyConfig(calib_samples=40), model_sha256="m", ctx=ctx,
                        dynamic=["fc1", "fc2"])
    table = measure_feed_sensitivity(q, opts, data, metric="mse", ctx=ctx, model_sha256="m", additivity_samples=6)
    assert anchor_options(opts["fc2"]) == {"w4g32": "w4g64", "w4g64": "w4g64", "w2g32": "w2g32"}
    assert weight_only("w4g64s") == (4, 64, True)
    for name in ("fc1", "fc2"):
        row = table.values[name]
        assert set(row) == set(opts[name]) and row["fp32"] == 0
        assert row["w2g32"] > row["w4g32"] > 0  # fewer bits, more distortion
    assert table.additivity["scaled_from_anchor"] == {"fc2": {"w4g32": "w4g64"}}  # one option per width: measured
    # the directly measured anchor equals a fresh measurement through the model
    from edgekit.analyze import distortion

    w, g = q.feeds({"fc2": "w4g64"})
    assert table.values["fc2"]["w4g64"] == pytest.approx(distortion(q.sim.output(data), q.sim.output(data, w, g),
                                                                     "mse"))
    again = measure_feed_sensitivity(q, opts, data, metric="mse", ctx=ctx, model_sha256="m", additivity_samples=6)
    assert again.values == table.values
    full = measure_feed_sensitivity(q, opts, data, metric="mse", ctx=ctx, model_sha256="m", full=True)
    measured, scaled = full.values["fc2"]["w4g32"], table.values["fc2"]["w4g32"]
    assert scaled == pytest.approx(measured, rel=0.5)  # the local-error scaling is a fair estimate


def test_quantized_weights_are_cached_on_disk(mlp, tmp_path):
    model, data, layers = mlp
    ctx = Context(cache_dir=tmp_path / "cache")
    a = LowBitQuantizer(model, layers, data, WeightOnlyConfig(), model_sha256="m", ctx=ctx).qweight("fc1", "w4g32")
    assert len(list((tmp_path / "cache" / "lowbit").glob("*.npz"))) == 1
    b = LowBitQuantizer(model, layers, data, WeightOnlyConfig(), model_sha256="m", ctx=ctx).qweight("fc1", "w4g32")
    assert (a.q == b.q).all() and np.array_equal(a.scales, b.scales)
    with pytest.raises(ConfigError):
        WeightOnlyConfig.from_dict({"method": "magic"})


# -- w4a8: int4 storage, int8 compute -------------------------------------------------------------------------------
def test_int4_per_channel_codes_and_error():
    from edgekit.compress.int4 import int4_per_channel

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    q, s = int4_per_channel(w, 0)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and s.shape == (16,)
    assert _sqnr(w, q * s[:, None, None, None]) > 15


def test_w4a8_layers_are_stored_as_int4_and_widened_losslessly_at_load(tmp_path):
    import onnxruntime as ort

    from edgekit.agent.runtime import OrtRuntime, prepare_model
    from edgekit.compress.quant import W8A8Config, quantize_w8a8
    from edgekit.plan import LayerChoice, Plan

    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "W2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    data = Dataset("d", {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}, None, "test")
    plan = Plan("m", "cpu-x86", "mixed", (LayerChoice("c1", "w8a8"), LayerChoice("c2", "w4a8")))
    out = quantize_w8a8(tmp_path / "f.onnx", tmp_path / "q.onnx", plan, data, W8A8Config(calib_samples=16))
    q = onnx.load(str(out))
    types = {i.name: i.data_type for i in q.graph.initializer}
    assert TensorProto.INT4 in types.values() and TensorProto.INT8 in types.values()  # c2 int4, c1 int8
    raw = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": data.inputs["x"]})[0]
    wide = OrtRuntime(out).run({"x": data.inputs["x"]})["y"]
    np.testing.assert_allclose(wide, raw, rtol=1e-5, atol=1e-5)  # widening changes nothing but the kernels
    fp = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).run(None, {
        "x": data.inputs["x"]})[0]
    assert _sqnr(fp, wide) > 10
    plain = onnx.load(str(tmp_path / "f.onnx")).SerializeToString()
    assert prepare_model(plain, ort.SessionOptions()) is plain  # nothing to widen: the model as given
    widened = onnx.load_from_string(prepare_model(out, ort.SessionOptions()))
    assert TensorProto.INT4 not in {i.data_type for i in widened.graph.initializer}
