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
