"""2:4-sparse linear layers as ``ai.edgekit::MatMulSparse24`` (int8 values, uint8 activations) for ONNX Runtime
targets whose runtime carries edgekit's native library (the profile lists ``ai.edgekit`` in ``custom_op_domains``).

A MatMul with a constant ``[K, N]`` weight, or a Gemm (``alpha = beta = 1``, no ``transA``), whose weight the
structural step pruned to 2:4 along the reduction axis (``structure._sparsify``) becomes

    DynamicQuantizeLinear(x) -> (xq uint8, x_scale, x_zero)
    MatMulSparse24(xq, values int8 [N, K/2], indices uint8 [N, ceil(K/8)], w_scale [N], x_scale, x_zero)
    (-> Add(bias) for a Gemm's bias)

Activations are quantized per call and per tensor, asymmetric uint8 (as ONNX Runtime's ``quantize_dynamic``: u8 x s8
is the fast pair on x86), one ``DynamicQuantizeLinear`` per input tensor, shared by the sparse layers that read it
(Q, K and V projections); weights per output row, symmetric int8 (``kernels.sparse24.quantize_int8_rows`` on the kept
values, the indices unchanged). On AVX-512, batches of 8+ activation rows run the native pre-packed GEMM
(``runtimes/onnxruntime/src/kernels_avx512_sparse.cc``; 1.5x dense int8 ``MatMulInteger`` at batch 32,
``benchmarks/RESULTS.md``). 1x1 convolutions are not rewritten here: a plan's 2:4 conv stays a dense int8 layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgekit.errors import ExportError
from edgekit.export.lowbit import _attr, commit_rewrite, weight_matrix
from edgekit.kernels import sparse24


def rewritable(node, inits) -> bool:
    """Whether ``node`` is a linear layer this module can rewrite (constant 2-D weight; Gemm without transA,
    alpha or beta)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return False
    if len(inits[node.input[1]].dims) != 2:
        return False
    return node.op_type == "MatMul" or not (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                            or _attr(node, "beta", 1.0) != 1.0)


def sparse_weights(name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values int8 [N, K/2], indices, w_scale float32 [N])`` of a 2:4 weight ``w`` ``[N, K]``; ExportError when
    ``w`` is not 2:4 along K."""
    if w.shape[1] % 4:
        raise ExportError(f"{name}: 2:4 weights need the input size to be a multiple of 4, it is {w.shape[1]}")
    try:
        values, indices = sparse24.pack(w)
    except ValueError as e:
        raise ExportError(f"{name}: {e}", hint="prune the layer to 2:4 first (option sparse2:4+...)") from None
    q, scale = sparse24.quantize_int8_rows(values)
    return q, indices, scale


def apply_sparse24(model, layers: Iterable[str]):
    """A copy of ``model`` (ModelProto) in which every node named in ``layers`` (2:4-sparse MatMul/Gemm) runs as
    ``ai.edgekit::MatMulSparse24`` on dynamically quantized uint8 activations; their float weights are dropped when
    nothing else reads them."""
    import onnx
    from onnx import helper, numpy_helper

    wanted = set(layers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    quantized: dict[str, tuple[str, str, str]] = {}  # input tensor -> (xq, scale, zero)
    new_nodes, new_inits, found = [], [], set()
    for node in g.node:
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        if not rewritable(node, inits):
            raise ExportError(f"{node.name}: only a MatMul/Gemm with a constant 2-D weight (Gemm: alpha = beta = 1, "
                              "no transA) runs as MatMulSparse24")
        found.add(node.name)
        name, x = node.name, node.input[0]
        w = weight_matrix(node, inits)
        values, indices, w_scale = sparse_weights(name, w)
        if x not in quantized:
            xq = (f"{x}::u8", f"{x}::u8_scale", f"{x}::u8_zero")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(xq), name=f"{x}::quantize_u8"))
            quantized[x] = xq
        new_inits += [numpy_helper.from_array(values, f"{name}::values"),
                      numpy_helper.from_array(indices, f"{name}::indices"),
                      numpy_helper.from_array(w_scale.astype(np.float32), f"{name}::w_scale")]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        y = f"{name}::y" if bias else node.output[0]
        xq, xs, xz = quantized[x]
        new_nodes.append(sparse24.make_node([xq, f"{name}::values", f"{name}::indices", f"{name}::w_scale", xs, xz],
                                            [y], K=w.shape[1], N=w.shape[0], name=name))
        if bias:
            new_nodes.append(helper.make_node("Add", [y, bias], [node.output[0]], name=f"{name}::bias"))
    missing = sorted(wanted - found)
    if missing:
        raise ExportError(f"layers not in the graph: {', '.join(missing[:5])}")
    commit_rewrite(out, new_nodes, new_inits)
    return out
