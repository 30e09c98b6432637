"""Static int8 convolutions that ONNX Runtime runs no faster than float, as ``ai.edgekit`` ops, for ONNX Runtime
targets whose runtime carries edgekit's native library (the profile lists ``ai.edgekit`` in ``custom_op_domains``):
depthwise ones as ``QLinearDepthwiseConv``, and those with ``group = 1`` and a short reduction (``kh kw Cin <=
qconv.DIRECT_MAX_K``, an image model's stem) as ``QLinearConvDirect`` (see ``edgekit.kernels.qconv``).

In a static int8 (QDQ) graph each such layer is

    DequantizeLinear(x_q) -> Conv(w = DequantizeLinear(w_q), B = DequantizeLinear(b_q)) -> QuantizeLinear

and becomes

    Transpose(x_q, NCHW -> NHWC) -> the ai.edgekit op -> Transpose(NHWC -> NCHW) -> (the QuantizeLinear's output)

with the same quantized inputs, so it computes the same uint8 tensor. The transposes cost nothing at run time:
ONNX Runtime runs its own int8 convolutions channels-last and cancels each pair of opposite transposes, provided it
knows the shapes around the custom op, so the rewrite writes them into ``value_info``.

Only what the ops compute exactly is rewritten: a 2-D Conv, uint8 activations with per-tensor scale and zero point,
int8 weights with zero zero points (per output channel along axis 0, or per tensor), an int32 bias in units of
``x_scale * w_scale`` (zero point 0) or none, every parameter a constant initializer, the Conv output read by
nothing but its QuantizeLinear. Anything else is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgekit.export.lowbit import _attr, commit_rewrite
from edgekit.kernels import qconv

TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]


def _array(name: str, inits) -> np.ndarray | None:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


def _match(node, producer: dict, consumers: dict, inits, graph_outputs: set[str]) -> dict | None:
    """The QDQ pieces of an int8 Conv this rewrite can take, and the op it becomes (see the module docstring), else
    None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
    dq_b = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    users = consumers.get(node.output[0], [])
    if (dq_x is None or dq_x.op_type != "DequantizeLinear" or dq_w is None or dq_w.op_type != "DequantizeLinear"
            or len(users) != 1 or users[0].op_type != "QuantizeLinear" or node.output[0] in graph_outputs):
        return None
    if len(node.input) > 2 and node.input[2] and (dq_b is None or dq_b.op_type != "DequantizeLinear"):
        return None
    q = users[0]
    w = _array(dq_w.input[0], inits)
    if w is None or w.dtype != np.int8 or w.ndim != 4:
        return None
    cout, group = w.shape[0], _attr(node, "group", 1)
    if group == cout and cout > 1 and w.shape[1] == 1:
        op = qconv.OP_DEPTHWISE
    elif group == 1 and w.shape[2] * w.shape[3] > 1 and w.shape[1] * w.shape[2] * w.shape[3] <= qconv.DIRECT_MAX_K:
        # (a 1x1 convolution is a plain GEMM, which ONNX Runtime runs well)
        op = qconv.OP_DIRECT
    else:
        return None
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kernel = list(_attr(node, "kernel_shape", list(w.shape[2:])))
    if kernel != list(w.shape[2:]):
        return None
    params = {}
    for key, dq, idx in (("x_scale", dq_x, 1), ("x_zero", dq_x, 2), ("w_scale", dq_w, 1), ("y_scale", q, 1),
                         ("y_zero", q, 2)):
        if len(dq.input) <= idx or dq.input[idx] not in inits:
            return None
        params[key] = _array(dq.input[idx], inits)
    w_scale_ok = params["w_scale"].size == 1 or (params["w_scale"].size == cout
                                                 and _attr(dq_w, "axis", 1) in (0, -4))  # per output channel
    if (params["x_zero"].dtype != np.uint8 or params["y_zero"].dtype != np.uint8 or not w_scale_ok
            or any(params[k].size != 1 for k in ("x_scale", "y_scale", "x_zero", "y_zero"))):
        return None
    w_zero = dq_w.input[2] if len(dq_w.input) > 2 and dq_w.input[2] else None
    if w_zero is not None:
        z = _array(w_zero, inits)
        if z is None or z.dtype != np.int8 or z.size not in (1, cout) or np.any(z != 0):
            return None
    bias = None
    if dq_b is not None:
        b = _array(dq_b.input[0], inits)
        b_scale = _array(dq_b.input[1], inits) if len(dq_b.input) > 1 else None
        b_zero = _array(dq_b.input[2], inits) if len(dq_b.input) > 2 and dq_b.input[2] else None
        expected = np.float32(params["x_scale"].reshape(())) * params["w_scale"].astype(np.float32).reshape(-1)
        if (b is None or b.dtype != np.int32 or b.size != cout or b_scale is None
                or b_scale.size not in (1, cout) or (b_zero is not None and np.any(b_zero != 0))
                or not np.allclose(np.broadcast_to(b_scale.reshape(-1), (cout,)),
                                   np.broadcast_to(expected, (cout,)), rtol=1e-6, atol=0)):
            return None
        bias = dq_b.input[0]
    return {"dq_x": dq_x, "dq_w": dq_w, "dq_b": dq_b, "q": q, "cout": cout, "w_zero": w_zero, "bias": bias,
            "kernel": kernel, "op": op}


def _graph_maps(g) -> tuple[dict, dict, dict, set[str]]:
    """(producer of each tensor, consumers of each tensor, initializers by name, graph output names)."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    return producer, consumers, {i.name: i for i in g.initializer}, {o.name for o in g.output}


def rewritable_layers(model) -> dict[str, str]:
    """{Conv node name: the ``ai.edgekit`` op it would become} for the Convs of ``model`` (a static int8 QDQ graph)
    that ``apply_qconv`` can rewrite."""
    maps = _graph_maps(model.graph)
    found = {n.name: _match(n, *maps) for n in model.graph.node}
    return {name: m["op"] for name, m in found.items() if m is not None}


def apply_qconv(model, layers: Iterable[str] | None = None):
    """A copy of ``model`` (ModelProto, static int8 QDQ) in which the Convs named in ``layers`` (default: every one
    ``rewritable_layers`` finds) run as ``ai.edgekit`` ops; returns ``(model, {name: op})`` for the layers
    rewritten. Layers named but not rewritable are left as they are."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.shape_inference.infer_shapes(model)
    g = out.graph
    wanted = None if layers is None else set(layers)
    producer, consumers, inits, outputs = maps = _graph_maps(g)
    shapes = {v.name: v.type.tensor_type.shape for v in (*g.value_info, *g.output, *g.input)}
    replace, dropped, new_inits, infos, done = {}, set(), [], [], {}
    for node in g.node:
        if wanted is not None and node.name not in wanted:
            continue
        m = _match(node, *maps)
        shape = shapes.get(node.output[0])
        if m is None or shape is None or len(shape.dim) != 4:
            continue
        name, q = node.name or node.output[0], m["q"]
        w_zero = m["w_zero"]
        if w_zero is None:
            w_zero = f"{name}::w_zero"
            new_inits.append(numpy_helper.from_array(np.zeros(m["cout"], np.int8), w_zero))
        x_nhwc, y_nhwc = f"{name}::x_nhwc", f"{name}::y_nhwc"
        attrs = {"kernel_shape": m["kernel"], "strides": list(_attr(node, "strides", [1, 1])),
                 "pads": list(_attr(node, "pads", [0, 0, 0, 0])), "dilations": list(_attr(node, "dilations", [1, 1]))}
        inputs = [x_nhwc, m["dq_x"].input[1], m["dq_x"].input[2], m["dq_w"].input[0], m["dq_w"].input[1], w_zero,
                  q.input[1], q.input[2]] + ([m["bias"]] if m["bias"] else [])
        replace[id(node)] = [
            helper.make_node("Transpose", [m["dq_x"].input[0]], [x_nhwc], perm=TO_NHWC, name=f"{name}::to_nhwc"),
            helper.make_node(m["op"], inputs, [y_nhwc], domain=qconv.DOMAIN, name=name, **attrs),
            helper.make_node("Transpose", [y_nhwc], [q.output[0]], perm=TO_NCHW, name=f"{name}::to_nchw"),
        ]
        dims = list(shape.dim)
        nhwc = onnx.TensorShapeProto()
        nhwc.dim.extend([dims[0], dims[2], dims[3], dims[1]])
        for tensor, s in ((y_nhwc, nhwc), (q.output[0], shape)):
            vi = helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None)
            vi.type.tensor_type.shape.CopyFrom(s)
            infos.append(vi)
        dropped |= {id(q), id(m["dq_w"])} | ({id(m["dq_b"])} if m["dq_b"] is not None else set())
        if len(consumers[m["dq_x"].output[0]]) == 1:
            dropped.add(id(m["dq_x"]))
        done[name] = m["op"]
    if not done:
        return model, {}
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes += replace[id(n)]
        elif id(n) not in dropped:
            nodes.append(n)
    # keep the model's own value_info (the inferred shapes stay out: the file should not grow with them)
    del g.value_info[:]
    g.value_info.extend([*model.graph.value_info, *infos])
    commit_rewrite(out, nodes, new_inits)
    return out, done
