"""MatMulSparse24 without the native library: rewritten to standard ONNX ops (ort_python.sparse24_to_standard)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edgekit.errors import ExportError
from tests.onnx_graphs import sparse24_case


def _model(variant: str, M: int = 5, K: int = 72, N: int = 11, seed: int = 0, constant: bool = True):
    """A one-node MatMulSparse24 model (``tests.onnx_graphs.sparse24_case``), its input and reference output;
    ``constant=False`` makes the values a graph input (nothing to rewrite from)."""
    import onnx
    from onnx import helper

    model, A, ref, _ = sparse24_case(np.random.default_rng(seed), M, K, N, variant)
    if not constant:
        v = next(i for i in model.graph.initializer if i.name == "V")
        model.graph.input.append(helper.make_tensor_value_info("V", v.data_type, list(v.dims)))
        model.graph.initializer.remove(v)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, A, ref


@pytest.mark.parametrize("variant", ["fp32", "int8_float_act", "int8_u8", "int8_u8_zp"])
def test_standard_ops_match_the_reference(variant):
    """Plain ONNX Runtime (no custom library) runs the rewrite; u8 variants: exact int32 sums, float32 epilogue
    (the reference's is float64): within 1e-6 relative; float variants: fp32 summation order."""
    import onnxruntime as ort

    from edgekit.kernels.ort_python import sparse24_to_standard

    model, A, ref = _model(variant)
    std = sparse24_to_standard(model)
    assert not any(n.domain == "ai.edgekit" for n in std.graph.node)
    assert not any(o.domain == "ai.edgekit" for o in std.opset_import)
    ops = {n.op_type for n in std.graph.node}
    assert ("MatMulInteger" in ops) == variant.startswith("int8_u8")
    y = ort.InferenceSession(std.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    tol = 1e-6 if variant.startswith("int8_u8") else 1e-4
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def test_values_that_are_not_constants_are_refused():
    from edgekit.kernels.ort_python import sparse24_to_standard

    model, _, _ = _model("int8_u8", constant=False)
    with pytest.raises(ValueError, match="constant values"):
        sparse24_to_standard(model)


def test_runtime_falls_back_without_the_native_library(monkeypatch, caplog):
    """The agent's runtime, with the native library unavailable, runs a MatMulSparse24 model through the rewrite and
    says so; a model it cannot rewrite gets a clear error naming the build command."""
    from edgekit.agent.runtime import OrtRuntime
    from edgekit.kernels import ort_native

    monkeypatch.setattr(ort_native, "register_native", lambda opts: False)
    model, A, ref = _model("int8_u8_zp", M=9)
    with caplog.at_level(logging.WARNING):
        y = OrtRuntime(model.SerializeToString()).run({"A": A})["Y"]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
    assert "MatMulSparse24 as dense standard ops" in caplog.text
    bad, _, _ = _model("int8_u8", constant=False)
    with pytest.raises(ExportError, match="native library is not built"):
        OrtRuntime(bad.SerializeToString())
