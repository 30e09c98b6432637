"""Small ONNX graphs built with onnx.helper for unit tests (no torch needed)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """input (N,3,8,8) → Conv 3→8 3x3 → Relu → depthwise Conv 8 3x3 → Relu → GlobalAveragePool → Flatten → Gemm 8→4
    → MatMul 4→5."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "stem.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "stem.bias"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "dw.weight"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "fc.bias"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 5)).astype(np.float32), "head.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem.weight", "stem.bias"], ["c1"], name="n0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw.weight"], ["c2"], name="n1", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["g"], name="n2", transB=1),
        helper.make_node("MatMul", ["g", "head.weight"], ["logits"], name="n3"),
    ]
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sparse24_case(rng, M: int, K: int, N: int, variant: str):
    """A one-node ``ai.edgekit::MatMulSparse24`` model ``A [M, K] -> Y [M, N]`` over a random 2:4 weight (0-2
    non-zeros per group) and its references: ``(model, A, reference output, dense float weight)``. ``variant``:
    ``fp32`` (float values), ``int8_float_act`` (int8 values, float activations), ``int8_u8`` / ``int8_u8_zp``
    (int8 values, uint8 activations, without / with a zero point)."""
    from edgekit.kernels import sparse24

    W = sparse24.random_2of4(rng, N, K, full=False)
    vals, idx = sparse24.pack(W)
    inits = [numpy_helper.from_array(idx, "I")]
    if variant == "fp32":
        A = rng.standard_normal((M, K)).astype(np.float32)
        inits.append(numpy_helper.from_array(vals, "V"))
        ins, a_type = ["A", "V", "I"], TensorProto.FLOAT
        ref = sparse24.reference_matmul(A, vals, idx, K=K, N=N)
        Wd = sparse24.dequantize(vals, idx, None, K)
    else:
        q, ws = sparse24.quantize_int8_rows(vals)
        inits += [numpy_helper.from_array(q, "V"), numpy_helper.from_array(ws, "WS")]
        ins = ["A", "V", "I", "WS"]
        Wd = sparse24.dequantize(q, idx, ws, K)
        if variant == "int8_float_act":
            A = rng.standard_normal((M, K)).astype(np.float32)
            a_type = TensorProto.FLOAT
            ref = sparse24.reference_matmul(A, q, idx, ws, K=K, N=N)
        else:
            A, a_scale, a_zp = sparse24.quantize_activations_u8(rng.standard_normal((M, K)).astype(np.float32) + 0.3)
            a_type = TensorProto.UINT8
            inits += [numpy_helper.from_array(np.array(a_scale, np.float32), "AS")]
            ins.append("AS")
            if variant == "int8_u8_zp":
                inits.append(numpy_helper.from_array(np.array(a_zp, np.uint8), "AZ"))
                ins.append("AZ")
            else:
                a_zp = 0
            ref = sparse24.reference_matmul(A, q, idx, ws, K=K, N=N, a_scale=a_scale, a_zero_point=a_zp)
    graph = helper.make_graph([sparse24.make_node(ins, ["Y"], K=K, N=N)], "t",
                              [helper.make_tensor_value_info("A", a_type, [M, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.edgekit", 1)])
    return model, A, ref, Wd
