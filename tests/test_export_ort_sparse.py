"""2:4 int8 linear layers exported as ai.edgekit::MatMulSparse24 (edgekit.export.ort_sparse), and through a plan."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import ExportError
from edgekit.kernels import ort_native, sparse24
from edgekit.plan import LayerChoice, Plan

pytestmark = pytest.mark.skipif(ort_native.library_path() is None, reason="native ai.edgekit library not built")


def _graph(path=None, seed=0, prune=True, gemm=True):
    """x [batch, 64] -> MatMul(W1 [64, 48]) -> h; x -> Gemm(transB, W2 [40, 64], bias) -> g; y = h[:, :40] + g.
    ``gemm=False``: the second layer is MatMul(W2.T) -> Add(bias) (ORT's dynamic quantizer skips Gemm)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (48, 64)).astype(np.float32)  # [N, K]
    w2 = rng.normal(0, 0.2, (40, 64)).astype(np.float32)
    if prune:
        w1 = sparse24.random_2of4(rng, 48, 64) * 0.2
        w2 = sparse24.random_2of4(rng, 40, 64) * 0.2
    inits = [numpy_helper.from_array(w1.T.copy(), "w1"), numpy_helper.from_array(w2 if gemm else w2.T.copy(), "w2"),
             numpy_helper.from_array(rng.normal(0, 1, 40).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array([0, 0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2**62, 40], np.int64), "s1")]
    second = [helper.make_node("Gemm", ["x", "w2", "b2"], ["g"], name="fc2", transB=1)] if gemm else [
        helper.make_node("MatMul", ["x", "w2"], ["g0"], name="fc2"), helper.make_node("Add", ["g0", "b2"], ["g"])]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), *second,
             helper.make_node("Slice", ["h", "s0", "s1"], ["hs"], name="slice"),
             helper.make_node("Add", ["hs", "g"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 40])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if path is not None:
        onnx.save(model, str(path))
    return model, w1, w2, numpy_helper.to_array(inits[2])


def _dynamic_u8(x):
    """ONNX DynamicQuantizeLinear in numpy: per-tensor uint8 over [min(0, x), max(0, x)], round half to even."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zero = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return q, scale, zero


def test_rewrite_matches_the_sparse_reference(tmp_path):
    """Both layers become MatMulSparse24 on one shared DynamicQuantizeLinear; each output equals the op's reference
    (int8 per-row values of the pruned weight, uint8 activations) up to float rounding of the quantization scale,
    and stays close to the float model."""
    import onnx
    import onnxruntime as ort

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.export.ort_sparse import apply_sparse24

    model, w1, w2, b2 = _graph()
    out = apply_sparse24(model, ["fc1", "fc2"])
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulSparse24") == 2 and ops.count("DynamicQuantizeLinear") == 1
    assert "MatMul" not in ops and "Gemm" not in ops
    assert not {"w1", "w2"} & {i.name for i in out.graph.initializer}  # the float weights are gone
    assert [o.version for o in out.opset_import if o.domain == "ai.edgekit"] == [1]
    path = tmp_path / "sparse.onnx"
    onnx.save(out, str(path))
    x = np.random.default_rng(3).normal(0, 1, (24, 64)).astype(np.float32)  # 24 rows: the pre-packed GEMM path
    y = OrtRuntime(path).run({"x": x})["y"]  # the agent's runtime registers the native library itself
    q, scale, zero = _dynamic_u8(x)
    refs = []
    for w in (w1, w2):
        vals, idx = sparse24.pack(w)
        qv, ws = sparse24.quantize_int8_rows(vals)
        refs.append(sparse24.reference_matmul(q, qv, idx, ws, K=64, N=w.shape[0], a_scale=scale, a_zero_point=zero))
    ref = refs[0][:, :40] + refs[1] + b2
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    fp32 = ort.InferenceSession(_graph()[0].SerializeToString(), providers=["CPUExecutionProvider"])
    yf = fp32.run(None, {"x": x})[0]
    cos = float(np.sum(y * yf) / np.linalg.norm(y) / np.linalg.norm(yf))
    assert cos > 0.999


def test_dense_weight_is_refused():
    from edgekit.export.ort_sparse import apply_sparse24

    model = _graph(prune=False)[0]
    with pytest.raises(ExportError, match="not 2:4 sparse"):
        apply_sparse24(model, ["fc1"])
    with pytest.raises(ExportError, match="not in the graph"):
        apply_sparse24(_graph()[0], ["nope"])


@pytest.mark.parametrize("option", ["sparse2:4+w8a8d", "sparse2:4+w8a8"])
def test_plan_on_an_edgekit_target_exports_matmulsparse24(tmp_path, option):
    """A plan with 2:4 int8 linear layers for cpu-x86-edgekit prunes them (SparseGPT), then writes MatMulSparse24;
    the same plan for a target without the library keeps dense int8 layers of the pruned weights."""
    import onnx

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.compress.quant import W8A8Config
    from edgekit.context import Context
    from edgekit.data import Dataset
    from edgekit.export.onnx import describe
    from edgekit.mixed import apply_plan

    _graph(tmp_path / "fp32.onnx", prune=False, gemm=False)
    fp32 = describe(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(1)
    calib = Dataset("c", {"x": rng.normal(0, 1, (64, 64)).astype(np.float32)}, None, "t")
    plan = Plan("x", "cpu-x86-edgekit", "mixed", (LayerChoice("fc1", option), LayerChoice("fc2", option)))
    art = apply_plan(plan, fp32, calib, tmp_path / "edgekit" / "model.onnx", W8A8Config(), Context(progress=False))
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert ops.count("MatMulSparse24") == 2
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    y = OrtRuntime(art.path).run({"x": x})["y"]
    yf = OrtRuntime(fp32.path).run({"x": x})["y"]
    # random dense weights lose ~18 % of their energy to 2:4 pruning (cosine ~0.86); trained ones far less
    assert float(np.sum(y * yf) / np.linalg.norm(y) / np.linalg.norm(yf)) > 0.8
    dense = apply_plan(plan, fp32, calib, tmp_path / "plain" / "model.onnx", W8A8Config(), Context(progress=False),
                       edgekit_kernels=False)
    dense_ops = [n.op_type for n in onnx.load(str(dense.path)).graph.node]
    assert "MatMulSparse24" not in dense_ops
    yd = OrtRuntime(dense.path).run({"x": x})["y"]
    assert float(np.sum(y * yd) / np.linalg.norm(y) / np.linalg.norm(yd)) > 0.99  # the same pruned weights
