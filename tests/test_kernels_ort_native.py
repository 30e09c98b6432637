"""The native ONNX Runtime library (runtimes/onnxruntime/) against the numpy references, on every kernel path.

Tolerances:
- fp32 math (MatMulLowBit accuracy_level 0, MatMulSparse24 with float activations): the dequantized weights are
  bit-identical to the reference's, only the summation order differs, so
  ``|y - ref| <= 1e-5 * (|A| @ |W|.T) + 1e-30``.
- int8 activations (MatMulLowBit accuracy_level 4): A is quantized per row, asymmetric, step
  ``s_m = (max(0, max A_m) - min(0, min A_m)) / 255``, so each activation moves by at most ``s_m / 2`` and
  ``|y - ref| <= s_m / 2 * sum_k |W[n, k]|`` (plus the fp32 rounding above); also cosine(y, ref) >= 0.999.
- MatMulSparse24 with uint8 activations: the int32 sums are exact and the epilogue is the reference's float64
  product, so the outputs must be equal.

Every check runs under each kernel path this CPU has (EDGEKIT_ORT_ISA=scalar|avx2|avx512, read when the library
is registered). Without the built library the tests skip, except in CI (CI set), where they fail.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgekit.kernels import lowbit, ort_native

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from tests.onnx_graphs import sparse24_case  # noqa: E402

ISAS = ("scalar", "avx2", "avx512")
LOWBIT_SHAPES = [(1, 200, 37), (8, 256, 19), (33, 96, 40)]  # (M, K, N): GEMV, small GEMM, GEMM; K % group != 0
SPARSE_SHAPES = [(1, 200, 37), (8, 256, 19), (33, 100, 40), (3, 1028, 70)]


def _isa_available(isa: str) -> bool:
    best = ort_native.best_isa()
    return best is not None and ISAS.index(isa) <= ISAS.index(best)


@pytest.fixture(params=ISAS)
def isa(request, library, monkeypatch):
    if not _isa_available(request.param):
        pytest.skip(f"this CPU has no {request.param} path (best: {ort_native.best_isa()})")
    monkeypatch.setenv("EDGEKIT_ORT_ISA", request.param)
    return request.param


def _session(model, threads: int = 2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    assert ort_native.register_native(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(node, a_type, M, K, N, inits):
    graph = oh.make_graph(
        [node], "t", [oh.make_tensor_value_info("A", a_type, [M, K])],
        [oh.make_tensor_value_info("Y", TP.FLOAT, [M, N])], inits,
    )  # fmt: skip
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.edgekit", 1)])


def _lowbit_case(rng, M, K, N, bits, group, zp, acc, bias=False):
    W = rng.standard_normal((N, K)).astype(np.float32)
    B, S, Z = lowbit.quantize_rtn(W, bits, group, symmetric=not zp)
    inits = [nh.from_array(B, "B"), nh.from_array(S, "S")]
    ins = ["A", "B", "S"]
    if Z is not None:
        inits.append(nh.from_array(Z, "Z"))
        ins.append("Z")
    b = None
    if bias:  # the 5th input; zero_points "" when symmetric
        b = (rng.standard_normal(N) * 5.0).astype(np.float32)
        inits.append(nh.from_array(b, "bias"))
        ins += [""] * (4 - len(ins)) + ["bias"]
    node = lowbit.make_node(ins, ["Y"], K=K, N=N, bits=bits, group_size=group)
    node.attribute.append(oh.make_attribute("accuracy_level", acc))
    A = rng.standard_normal((M, K)).astype(np.float32)
    A[:, ::7] *= 4.0  # a few larger activations
    ref = lowbit.reference_matmul(A, B, S, Z, bits=bits, group_size=group, K=K, N=N, bias=b)
    Wd = lowbit.dequantize(B, S, Z, bits, group, K)
    return _model(node, TP.FLOAT, M, K, N, inits), A, ref, Wd


def _check_fp32(y, ref, A, Wd):
    bound = 1e-5 * (np.abs(A).astype(np.float64) @ np.abs(Wd).T.astype(np.float64)) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3g}"


def _check_int8_activations(y, ref, A, Wd):
    A64 = A.astype(np.float64)
    step = (np.maximum(A64.max(axis=1, keepdims=True), 0) - np.minimum(A64.min(axis=1, keepdims=True), 0)) / 255.0
    bound = 0.5 * step * np.abs(Wd).sum(axis=1)[None, :] * 1.0001
    bound += 1e-5 * (np.abs(A).astype(np.float64) @ np.abs(Wd).T.astype(np.float64)) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3g}"
    cos = float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref)))
    assert cos >= 0.999, cos


@pytest.mark.parametrize("acc", [0, 4])
@pytest.mark.parametrize("zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("group", lowbit.SUPPORTED_GROUP_SIZES)
@pytest.mark.parametrize("bits", lowbit.SUPPORTED_BITS)
def test_lowbit_matches_reference(isa, bits, group, zp, acc):
    rng = np.random.default_rng(bits * 1000 + group + 7 * zp + acc)
    for M, K, N in LOWBIT_SHAPES:
        model, A, ref, Wd = _lowbit_case(rng, M, K, N, bits, group, zp, acc)
        y = _session(model).run(None, {"A": A})[0]
        assert y.shape == (M, N) and y.dtype == np.float32
        (_check_fp32 if acc == 0 else _check_int8_activations)(y, ref, A, Wd)


@pytest.mark.parametrize("acc", [0, 4])
def test_lowbit_large_gemv_and_batched_axes(isa, acc):
    """A wide GEMV (many blocks per row, every group in use) and a 3-D input (leading axes are batch axes)."""
    rng = np.random.default_rng(11)
    for bits in (2, 4):
        model, A, ref, Wd = _lowbit_case(rng, 1, 4096 + 96, 67, bits, 128, False, acc)
        y = _session(model).run(None, {"A": A})[0]
        (_check_fp32 if acc == 0 else _check_int8_activations)(y, ref, A, Wd)
    W = rng.standard_normal((24, 160)).astype(np.float32)
    B, S, _ = lowbit.quantize_rtn(W, 4, 32)
    node = lowbit.make_node(["A", "B", "S"], ["Y"], K=160, N=24, bits=4, group_size=32)
    node.attribute.append(oh.make_attribute("accuracy_level", acc))
    graph = oh.make_graph(
        [node], "t", [oh.make_tensor_value_info("A", TP.FLOAT, [2, 3, 160])],
        [oh.make_tensor_value_info("Y", TP.FLOAT, [2, 3, 24])], [nh.from_array(B, "B"), nh.from_array(S, "S")],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.edgekit", 1)])
    A = rng.standard_normal((2, 3, 160)).astype(np.float32)
    y = _session(model).run(None, {"A": A})[0]
    ref = lowbit.reference_matmul(A, B, S, None, bits=4, group_size=32, K=160, N=24)
    Wd = lowbit.dequantize(B, S, None, 4, 32, 160)
    (_check_fp32 if acc == 0 else _check_int8_activations)(y.reshape(6, 24), ref.reshape(6, 24), A.reshape(6, 160), Wd)


@pytest.mark.parametrize("variant", ["fp32", "int8_float_act", "int8_u8", "int8_u8_zp"])
def test_sparse24_matches_reference(isa, variant):
    rng = np.random.default_rng(5)
    for M, K, N in SPARSE_SHAPES:
        model, A, ref, Wd = sparse24_case(rng, M, K, N, variant)
        y = _session(model).run(None, {"A": A})[0]
        assert y.shape == (M, N) and y.dtype == np.float32
        if variant.startswith("int8_u8"):
            np.testing.assert_array_equal(y, ref)  # exact int32 sums, the reference's float64 epilogue
        else:
            _check_fp32(y, ref, A.astype(np.float32), Wd)


@pytest.mark.parametrize("variant", ["int8_u8", "int8_u8_zp"])
def test_sparse24_prepacked_matches_unpacked(library, monkeypatch, variant):
    """Batches of >= 8 rows of uint8 activations re-pack constant values and indices on AVX-512 (the shuffle GEMM
    of kernels_avx512_sparse.cc); both paths give the exact int32 sums, so the outputs are equal: blocks of 8 rows
    with tails (zero-padded copies), K with a half pair of groups, an odd number of pairs (a half step) and a single
    group, N not a multiple of the 32-row register block, several tasks over N (the last one partial), and batches
    below the threshold (unpacked)."""
    if not _isa_available("avx512"):
        pytest.skip("no avx512 path")
    monkeypatch.setenv("EDGEKIT_ORT_ISA", "avx512")
    rng = np.random.default_rng(11)
    for M, K, N in ((8, 132, 5), (17, 520, 37), (32, 1028, 70), (45, 256, 800), (70, 100, 9), (40, 260, 400),
                    (9, 8, 129), (16, 4, 33), (13, 24, 160), (7, 128, 9), (1, 264, 3)):
        model, A, ref, _ = sparse24_case(rng, M, K, N, variant)
        monkeypatch.delenv("EDGEKIT_ORT_NO_PREPACK", raising=False)
        sess = _session(model)
        y1, y1b = sess.run(None, {"A": A})[0], sess.run(None, {"A": A})[0]
        monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
        y0 = _session(model).run(None, {"A": A})[0]
        np.testing.assert_array_equal(y1, ref)
        np.testing.assert_array_equal(y1, y1b)
        np.testing.assert_array_equal(y1, y0)


def test_isa_paths_agree(library, monkeypatch):
    """scalar, AVX2 and AVX-512 give the same outputs (int8 sums exactly; fp32 up to summation order)."""
    paths = [i for i in ISAS if _isa_available(i)]
    rng = np.random.default_rng(3)
    cases = [("lowbit", dict(bits=b, group=g, zp=z, acc=a)) for b, g, z, a in
             [(2, 32, False, 4), (3, 64, True, 0), (4, 128, True, 4), (8, 32, False, 0), (4, 32, False, 0)]]
    cases += [("sparse", dict(variant=v)) for v in ("fp32", "int8_u8_zp")]
    for kind, cfg in cases:
        for M, K, N in [(1, 1000, 45), (9, 384, 33)]:
            if kind == "lowbit":
                model, A, ref, Wd = _lowbit_case(rng, M, K, N, **cfg)
            else:
                model, A, ref, Wd = sparse24_case(rng, M, K - K % 4, N, cfg["variant"])
            outs = {}
            for p in paths:
                monkeypatch.setenv("EDGEKIT_ORT_ISA", p)
                outs[p] = _session(model).run(None, {"A": A})[0]
                assert ort_native.active_isa() == p
            bound = 2e-5 * (np.abs(A.astype(np.float64)) @ np.abs(Wd).T.astype(np.float64)) + 1e-30
            for p in paths[1:]:
                if kind == "sparse" and cfg["variant"] == "int8_u8_zp":
                    np.testing.assert_array_equal(outs[p], outs[paths[0]])
                else:
                    err = np.abs(outs[p].astype(np.float64) - outs[paths[0]])
                    assert (err <= bound).all(), (kind, cfg, p)


def test_forced_isa_is_validated(library, monkeypatch):
    monkeypatch.setenv("EDGEKIT_ORT_ISA", "sse9")
    so = ort.SessionOptions()
    with pytest.raises(Exception, match="EDGEKIT_ORT_ISA"):
        ort_native.register_native(so)


def test_bad_inputs_raise_clear_errors(library):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    B, S, _ = lowbit.quantize_rtn(W, 4, 32)
    node = lowbit.make_node(["A", "B", "S"], ["Y"], K=64, N=8, bits=4, group_size=32)
    bad_scales = np.ones((8, 3), np.float32)
    model = _model(node, TP.FLOAT, 1, 64, 8, [nh.from_array(B, "B"), nh.from_array(bad_scales, "S")])
    with pytest.raises(Exception, match="scales must be float32"):
        _session(model).run(None, {"A": np.ones((1, 64), np.float32)})
    node = lowbit.make_node(["A", "B", "S"], ["Y"], K=64, N=8, bits=4, group_size=32)
    node.attribute.append(oh.make_attribute("accuracy_level", 2))
    model = _model(node, TP.FLOAT, 1, 64, 8, [nh.from_array(B, "B"), nh.from_array(S, "S")])
    with pytest.raises(Exception, match="accuracy_level"):
        _session(model)


def test_register_falls_back_with_a_warning(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("EDGEKIT_ORT_LIBRARY", str(tmp_path / "missing.so"))
    assert ort_native.library_path() is None
    so = ort.SessionOptions()
    with pytest.warns(RuntimeWarning, match="native ai.edgekit kernels not found"):
        assert ort_native.register(so) is False


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import edgekit.kernels.ort_native as m; print(m.library_path())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("signed", [True, False])
def test_lowbit_int8_activations_equal_the_quantized_reference(isa, signed):
    """accuracy_level 4 is exactly ``lowbit.quantize_activations`` followed by exact math: against
    ``reference_matmul(accuracy_level=4)`` only the fp32 summation differs (1e-5 of what is summed), on GEMV, GEMM
    and MiniLM-sized shapes, signed and one-signed (GELU-like) activations: the second is where the asymmetric
    levels matter (half the step of symmetric int8), so a symmetric quantizer fails this test."""
    rng = np.random.default_rng(4 + signed)
    for M, K, N, bits, group, zp in ((1, 300, 40, 4, 32, True), (5, 1000, 33, 2, 64, False),
                                     (128, 384, 384, 4, 128, False), (128, 1536, 96, 8, 32, True),
                                     (16, 260, 70, 3, 128, True)):
        model, A, _, Wd = _lowbit_case(rng, M, K, N, bits, group, zp, 4)
        if not signed:
            A = np.maximum(A, -0.17).astype(np.float32)  # a GELU output's range
        w = {i.name: nh.to_array(i) for i in model.graph.initializer}
        ref = lowbit.reference_matmul(A, w["B"], w["S"], w.get("Z"), bits=bits, group_size=group, K=K, N=N,
                                      accuracy_level=4)
        q, scale, zero = lowbit.quantize_activations(A)
        Aq = (q.astype(np.float64) - zero[:, None]) * scale[:, None]
        y = _session(model).run(None, {"A": A})[0]
        # fp32 rounding of what the kernels sum: the shifted levels q (|q| up to 128, not |a|) and the zero-point
        # term subtracted after (scale * zero * column sums)
        wabs = np.abs(Wd).T.astype(np.float64)
        bound = 1e-5 * (scale[:, None] * (np.abs(q.astype(np.float64)) @ wabs + np.abs(zero)[:, None] * wabs.sum(0)))
        bound += 1e-5 * (np.abs(Aq) @ wabs) + 1e-6
        err = np.abs(y.astype(np.float64) - ref)
        assert (err <= bound).all(), (M, K, N, bits, group, float((err / bound).max()))


def test_quantize_activations_levels():
    """The quantizer's contract: zero is exact, lo maps to level 0, hi to level 255 (within rounding), steps are
    (hi - lo) / 255, all-zero rows are all zero."""
    A = np.array([[-1.0, 0.0, 3.0, 1.5], [0.0, 0.0, 0.0, 0.0], [0.5, 2.0, 1.0, 0.25]], np.float32)
    q, scale, zero = lowbit.quantize_activations(A)
    assert scale[0] == np.float32(4.0 / 255) and scale[1] == 0 and scale[2] == np.float32(2.0 / 255)
    assert q[0, 0] == -128 and q[0, 2] == 127 and q[0, 1] == zero[0]
    assert (q[1] == 0).all() and zero[1] == 0
    assert zero[2] == -128 and q[2, 1] == 127  # one-signed: lo = 0, the whole range for [0, hi]
    back = (q.astype(np.float64) - zero[:, None]) * scale[:, None]
    assert np.abs(back - A).max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("acc", [0, 4])
def test_lowbit_gemm_minilm_shapes(isa, acc):
    """The batched GEMM path at MiniLM's shapes (sequence 128: M = 128; K x N = 384x384, 384x1536, 1536x384),
    against the numpy reference; accuracy level 4 with the int8-activation tolerance."""
    rng = np.random.default_rng(128 + acc)
    cases = [(2, 64, False), (3, 128, False), (4, 128, False), (4, 32, True), (8, 32, False)]
    for i, (K, N) in enumerate(((384, 384), (384, 1536), (1536, 384))):
        for bits, group, zp in cases[i::2] if acc == 0 else cases:
            model, A, ref, Wd = _lowbit_case(rng, 128, K, N, bits, group, zp, acc)
            y = _session(model).run(None, {"A": A})[0]
            assert y.shape == (128, N)
            (_check_fp32 if acc == 0 else _check_int8_activations)(y, ref, A, Wd)


@pytest.mark.parametrize("bits", lowbit.SUPPORTED_BITS)
def test_lowbit_prepacked_matches_unpacked(library, monkeypatch, bits):
    """accuracy_level 4 on AVX-512 re-packs constant weights into 16-row tiles on the first run; the unpacked
    kernel (EDGEKIT_ORT_NO_PREPACK=1) must agree (the int32 group sums are exact, only fp32 order differs),
    for tails in N and K, zero points, and batches that use every tile/row blocking."""
    if not _isa_available("avx512"):
        pytest.skip("no avx512 path")
    monkeypatch.setenv("EDGEKIT_ORT_ISA", "avx512")
    rng = np.random.default_rng(bits)
    for group in lowbit.SUPPORTED_GROUP_SIZES:
        for zp in (False, True):
            for M, K, N in ((1, 300, 37), (7, 256, 16), (9, 520, 50), (17, 200, 33), (45, 136, 40)):
                model, A, ref, Wd = _lowbit_case(rng, M, K, N, bits, group, zp, 4)
                monkeypatch.delenv("EDGEKIT_ORT_NO_PREPACK", raising=False)
                y1 = _session(model).run(None, {"A": A})[0]
                y1b = _session(model).run(None, {"A": A})[0]
                monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
                y0 = _session(model).run(None, {"A": A})[0]
                _check_int8_activations(y1, ref, A, Wd)
                np.testing.assert_array_equal(y1, y1b)
                np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * float(np.abs(y0).max()))


@pytest.mark.parametrize("acc", [0, 4])
@pytest.mark.parametrize("zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", lowbit.SUPPORTED_BITS)
def test_lowbit_bias_matches_reference(isa, bits, zp, acc):
    """The optional 5th input ``bias`` (zero_points "" when symmetric) is added in the kernels' epilogue: every
    path, GEMV (M = 1), small GEMM, GEMM (M = 33) and the batched GEMM path (M = 128, pre-packed on AVX-512 at
    accuracy level 4), against the reference with the bias."""
    rng = np.random.default_rng(bits * 100 + 7 * zp + acc)
    check = _check_fp32 if acc == 0 else _check_int8_activations
    for M, K, N in [*LOWBIT_SHAPES, (128, 384, 100)]:
        for group in (32, 128):
            model, A, ref, Wd = _lowbit_case(rng, M, K, N, bits, group, zp, acc, bias=True)
            assert len(model.graph.node[0].input) == 5 and bool(model.graph.node[0].input[3]) == zp
            y = _session(model).run(None, {"A": A})[0]
            assert y.shape == (M, N) and y.dtype == np.float32
            check(y, ref, A, Wd)


@pytest.mark.parametrize("bits", [3, 4])
def test_lowbit_bias_prepacked_matches_unpacked(library, monkeypatch, bits):
    """The pre-packed AVX-512 paths (tiles in parallel; blocks of 16 rows from M = 32) add the bias like the
    unpacked kernels, for tails in N."""
    if not _isa_available("avx512"):
        pytest.skip("no avx512 path")
    monkeypatch.setenv("EDGEKIT_ORT_ISA", "avx512")
    rng = np.random.default_rng(bits + 50)
    for zp in (False, True):
        for M, K, N in ((1, 300, 37), (9, 520, 50), (45, 136, 40)):
            model, A, ref, Wd = _lowbit_case(rng, M, K, N, bits, 64, zp, 4, bias=True)
            monkeypatch.delenv("EDGEKIT_ORT_NO_PREPACK", raising=False)
            y1 = _session(model).run(None, {"A": A})[0]
            monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
            y0 = _session(model).run(None, {"A": A})[0]
            _check_int8_activations(y1, ref, A, Wd)
            np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * float(np.abs(y0).max()))


@pytest.mark.parametrize("acc", [0, 4])
@pytest.mark.parametrize("prepack", [True, False])
def test_lowbit_gelu_epilogue_matches_reference(isa, acc, prepack, monkeypatch):
    """activation="Gelu": the exact GELU after the bias, on every kernel path (GEMV, small batches, the batched and
    the row-block GEMM; prepacked or not; N off the 16-column tiles), against ``reference_matmul(activation="Gelu",
    accuracy_level=acc)`` (float64 erf): |y - ref| <= 2e-6 * max|ref| + the kernel's own rounding bound."""
    if not prepack:
        monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
    rng = np.random.default_rng(30 + acc + 2 * prepack)
    for M, K, N, bits, group, zp in ((1, 200, 50, 4, 32, True), (8, 384, 70, 2, 64, False),
                                     (37, 256, 33, 8, 128, True), (128, 384, 200, 4, 128, False)):
        model, A, _, Wd = _lowbit_case(rng, M, K, N, bits, group, zp, acc, bias=True)
        node = model.graph.node[0]
        node.attribute.append(oh.make_attribute("activation", "Gelu"))
        w = {i.name: nh.to_array(i) for i in model.graph.initializer}
        ref = lowbit.reference_matmul(A, w["B"], w["S"], w.get("Z"), bits=bits, group_size=group, K=K, N=N,
                                      bias=w["bias"], activation="Gelu", accuracy_level=acc)
        y = _session(model).run(None, {"A": A})[0]
        if acc == 4:
            q, scale, zero = lowbit.quantize_activations(A)
            mag = scale[:, None] * ((np.abs(q) + np.abs(zero)[:, None]) @ np.abs(Wd).T.astype(np.float64))
        else:
            mag = np.abs(A).astype(np.float64) @ np.abs(Wd).T.astype(np.float64)
        bound = 2e-6 * np.abs(ref).max() + 1e-5 * mag  # gelu' <= 1.13: the pre-activation's rounding carries over
        err = np.abs(y.astype(np.float64) - ref)
        assert (err <= bound).all(), (M, K, N, bits, float((err / bound).max()))
        assert (y < 0).any() and (y > 0).any()  # both branches of the epilogue ran


@pytest.mark.parametrize("acc", [0, 4])
@pytest.mark.parametrize("prepack", [True, False])
def test_lowbit_split_outputs_are_the_columns_of_y(isa, acc, prepack, monkeypatch):
    """split=[a, b, c]: three outputs holding Y's columns [0, a), [a, a+b), [a+b, N) bit for bit, on every kernel path
    (GEMV, batched, the row-block GEMM), with a bias and the GELU epilogue before the split."""
    if not prepack:
        monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
    rng = np.random.default_rng(40 + acc + 2 * prepack)
    for M, N, split in ((1, 72, [24, 24, 24]), (9, 50, [17, 33]), (128, 200, [64, 64, 40, 32])):
        model, A, _, _ = _lowbit_case(rng, M, 96, N, 4, 32, True, acc, bias=True)
        full = _session(model).run(None, {"A": A})[0]
        node = model.graph.node[0]
        node.attribute.append(oh.make_attribute("activation", "Gelu"))
        gelu = _session(model).run(None, {"A": A})[0]
        node.attribute.append(oh.make_attribute("split", split))
        del node.output[:]
        node.output.extend([f"Y{i}" for i in range(len(split))])
        del model.graph.output[:]
        model.graph.output.extend([oh.make_tensor_value_info(f"Y{i}", TP.FLOAT, [M, w]) for i, w in enumerate(split)])
        parts = _session(model).run(None, {"A": A})
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), gelu)
        assert not np.array_equal(gelu, full)


@pytest.mark.parametrize("acc", [0, 4])
@pytest.mark.parametrize("prepack", [True, False])
def test_lowbit_residual_layernorm_epilogue_matches_reference(isa, acc, prepack, monkeypatch):
    """Inputs skip, ln_scale, ln_bias and epsilon: Y = LayerNorm(A W^T + bias + skip) * scale + bias, on every kernel
    path (GEMV and small batches normalize in a pass after the GEMM, the row-block GEMM inside its tasks), against
    ``reference_matmul(skip=..., ln_scale=..., ...)`` in float64: |y - ref| <= 2e-4 * max|ln_scale| (the LayerNorm
    divides the pre-norm rounding by each row's standard deviation, which this data keeps near 1 or above)."""
    if not prepack:
        monkeypatch.setenv("EDGEKIT_ORT_NO_PREPACK", "1")
    rng = np.random.default_rng(50 + acc + 2 * prepack)
    for M, K, N, bits, group, zp, beta in ((1, 200, 50, 4, 32, True, True), (9, 256, 70, 2, 64, False, False),
                                           (128, 384, 200, 4, 128, False, True), (40, 96, 16, 8, 32, True, True)):
        model, A, _, _ = _lowbit_case(rng, M, K, N, bits, group, zp, acc, bias=True)
        skip = rng.standard_normal((M, N)).astype(np.float32) * 3
        gamma = (rng.random(N) + 0.5).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32) if beta else None
        node = model.graph.node[0]
        node.input.extend(["skip", "gamma"] + (["beta"] if beta else []))
        node.attribute.append(oh.make_attribute("epsilon", 1e-6))
        model.graph.input.append(oh.make_tensor_value_info("skip", TP.FLOAT, [M, N]))
        model.graph.initializer.extend([nh.from_array(gamma, "gamma")] + ([nh.from_array(b, "beta")] if beta else []))
        w = {i.name: nh.to_array(i) for i in model.graph.initializer}
        ref = lowbit.reference_matmul(A, w["B"], w["S"], w.get("Z"), bits=bits, group_size=group, K=K, N=N,
                                      bias=w["bias"], accuracy_level=acc, skip=skip, ln_scale=gamma, ln_bias=b,
                                      epsilon=1e-6)
        y = _session(model).run(None, {"A": A, "skip": skip})[0]
        err = np.abs(y.astype(np.float64) - ref).max()
        assert err <= 2e-4 * gamma.max(), (M, K, N, bits, err)
        np.testing.assert_allclose(((y - (b if beta else 0)) / gamma).mean(axis=1), 0, atol=1e-4)


def test_lowbit_residual_layernorm_rejects_bad_inputs(library):
    rng = np.random.default_rng(5)
    model, A, _, _ = _lowbit_case(rng, 2, 64, 16, 4, 32, False, 0, bias=True)
    node = model.graph.node[0]
    node.input.extend(["skip", "gamma"])
    model.graph.input.append(oh.make_tensor_value_info("skip", TP.FLOAT, [2, 8]))
    model.graph.initializer.append(nh.from_array(np.ones(16, np.float32), "gamma"))
    with pytest.raises(Exception, match=r"skip must be float32 \[2, 16\]"):
        _session(model).run(None, {"A": A, "skip": np.zeros((2, 8), np.float32)})


def test_lowbit_rejects_a_bad_split(library):
    rng = np.random.default_rng(3)
    model, A, _, _ = _lowbit_case(rng, 2, 64, 16, 4, 32, False, 0)
    model.graph.node[0].attribute.append(oh.make_attribute("split", [8, 4]))
    with pytest.raises(Exception, match="split must be 2 to 4 positive sizes that sum to N=16"):
        _session(model).run(None, {"A": A})


def test_lowbit_rejects_an_unknown_activation(library):
    rng = np.random.default_rng(2)
    model, A, _, _ = _lowbit_case(rng, 2, 64, 16, 4, 32, False, 0)
    model.graph.node[0].attribute.append(oh.make_attribute("activation", "Relu"))
    with pytest.raises(Exception, match="activation='Relu' is not supported"):
        _session(model).run(None, {"A": A})


def test_lowbit_bad_bias_raises_a_clear_error(library):
    rng = np.random.default_rng(1)
    B, S, _ = lowbit.quantize_rtn(rng.standard_normal((8, 64)).astype(np.float32), 4, 32)
    node = lowbit.make_node(["A", "B", "S", "", "bias"], ["Y"], K=64, N=8, bits=4, group_size=32)
    inits = [nh.from_array(B, "B"), nh.from_array(S, "S"), nh.from_array(np.ones(7, np.float32), "bias")]
    model = _model(node, TP.FLOAT, 1, 64, 8, inits)
    with pytest.raises(Exception, match="bias must be float32"):
        _session(model).run(None, {"A": np.ones((1, 64), np.float32)})
