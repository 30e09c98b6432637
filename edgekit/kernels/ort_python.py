"""Run ``MatMulLowBit`` in ONNX Runtime at reference speed through onnxruntime-extensions Python ops.

onnxruntime-extensions registers every Python op in its own domain, ``ai.onnx.contrib``
(``onnxruntime_extensions.default_opset_domain()``), with a fixed number of inputs. So the fallback works on a
rewritten copy of the model:

- ``to_contrib_domain(model)`` moves every ``ai.edgekit::MatMulLowBit`` node to ``ai.onnx.contrib::MatMulLowBit``
  and gives the symmetric ones (3 inputs) an explicit zero-point initializer filled with ``2 ** (bits - 1)``,
  which is the same op by the specification in ``edgekit.kernels.lowbit``; a ``bias`` (5th input) moves into a
  following ``Add`` node (the Python op has 4 inputs), which computes the same sum, and ``activation="Gelu"`` into
  standard ``Div``/``Erf``/``Add``/``Mul`` nodes after it, ``skip`` into an ``Add``, ``ln_scale``/``ln_bias`` into a
  ``LayerNormalization`` and a ``split`` into a ``Split`` node;
- ``register_python_op()`` registers the numpy reference under that name once per process (the registry of
  onnxruntime-extensions is process-global) and returns the library path for the session options.

Usage::

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(register_python_op())
    sess = onnxruntime.InferenceSession(to_contrib_domain(model).SerializeToString(), so)

The native custom-op library (``runtimes/onnxruntime/``, ``edgekit.kernels.ort_native``) serves the op directly;
this module is the fallback that keeps graphs with the op runnable (and testable) anywhere onnxruntime-extensions
installs.

``MatMulSparse24`` needs no Python op: ``sparse24_to_standard(model)`` rewrites each node whose values and indices
are constant initializers into standard ONNX ops over the dense weight they stand for (``sparse24.unpack``): with
uint8 activations ``MatMulInteger`` (u8 x s8, exact int32 sums) -> ``Cast`` -> ``Mul(a_scale)`` -> ``Mul(w_scale)``,
otherwise ``MatMul`` by the dequantized float weight. Same math as the reference (the epilogue in float32 rather
than float64), at ONNX Runtime's dense speed, without the 2:4 speed-up. Nor do ``QLinearDepthwiseConv`` and
``QLinearConvDirect``: ``qconv_to_standard(model)`` makes each node the ``QLinearConv`` it is, between transposes.
"""

from __future__ import annotations

import numpy as np

from edgekit.kernels import lowbit, qconv, sparse24

CONTRIB_DOMAIN = "ai.onnx.contrib"
_REGISTERED: dict[str, str] = {}


def register_python_op() -> str:
    """Register ``ai.onnx.contrib::MatMulLowBit`` (4 inputs, numpy reference); return the custom-op library path.

    Idempotent. Raises ImportError with an install hint when onnxruntime-extensions is missing.
    """
    try:
        from onnxruntime_extensions import PyCustomOpDef, default_opset_domain, get_library_path, onnx_op
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "the MatMulLowBit Python fallback needs onnxruntime-extensions: pip install onnxruntime-extensions"
        ) from e
    if default_opset_domain() != CONTRIB_DOMAIN:  # pragma: no cover - guards a future change of the package
        raise RuntimeError(
            f"onnxruntime-extensions registers Python ops in {default_opset_domain()!r}, "
            f"but edgekit rewrites models to {CONTRIB_DOMAIN!r}"
        )
    if "path" not in _REGISTERED:
        T = PyCustomOpDef

        @onnx_op(
            op_type=lowbit.OP_TYPE,
            inputs=[T.dt_float, T.dt_uint8, T.dt_float, T.dt_uint8],
            outputs=[T.dt_float],
            attrs={"K": T.dt_int64, "N": T.dt_int64, "bits": T.dt_int64, "group_size": T.dt_int64},
        )
        def _matmul_lowbit(A, B_packed, scales, zero_points, K, N, bits, group_size):  # noqa: N803 - ONNX names
            return lowbit.reference_matmul(A, B_packed, scales, zero_points, bits=bits, group_size=group_size, K=K, N=N)

        _REGISTERED["path"] = get_library_path()
    return _REGISTERED["path"]


def _attrs(node) -> dict[str, int]:
    import onnx.helper

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gelu(x: str, y: str, prefix: str, fresh):
    """Standard ONNX nodes (and their constants) computing ``y = 0.5 * x * (1 + erf(x / sqrt(2)))``."""
    import onnx.helper
    import onnx.numpy_helper

    c = {k: fresh(f"{prefix}::{k}") for k in ("sqrt2", "one", "half")}
    inits = [onnx.numpy_helper.from_array(np.array(v, np.float32), c[k])
             for k, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    t = [fresh(f"{prefix}::t{i}") for i in range(4)]
    nodes = [onnx.helper.make_node("Div", [x, c["sqrt2"]], [t[0]], name=f"{prefix}_div"),
             onnx.helper.make_node("Erf", [t[0]], [t[1]], name=f"{prefix}_erf"),
             onnx.helper.make_node("Add", [t[1], c["one"]], [t[2]], name=f"{prefix}_add"),
             onnx.helper.make_node("Mul", [x, t[2]], [t[3]], name=f"{prefix}_mul"),
             onnx.helper.make_node("Mul", [t[3], c["half"]], [y], name=f"{prefix}_half")]
    return nodes, inits


def to_contrib_domain(model):
    """A copy of ``model`` whose ``ai.edgekit::MatMulLowBit`` nodes run with ``register_python_op``'s library.

    Only the main graph is rewritten (the op is not expected inside control-flow subgraphs).
    """
    import onnx
    import onnx.helper
    import onnx.numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {i.name for i in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
    changed = added_add = False
    nodes = []
    for n in graph.node:  # copies: graph.node is rebuilt below
        c = onnx.NodeProto()
        c.CopyFrom(n)
        nodes.append(c)
    new_nodes = []
    for idx, node in enumerate(nodes):
        new_nodes.append(node)
        if node.domain != lowbit.DOMAIN or node.op_type != lowbit.OP_TYPE:
            continue
        changed = True
        gelu = _attrs(node).get("activation", b"") in ("Gelu", b"Gelu")
        split = [int(v) for v in _attrs(node).get("split", [])]
        eps = float(_attrs(node).get("epsilon", 1e-5))
        bias, skip, gamma, beta = (node.input[i] if len(node.input) > i else "" for i in (4, 5, 6, 7))
        del node.input[4:]
        if bias or gelu or split or skip or gamma:  # the Python op has none of these: standard ops after it
            outs, prefix = list(node.output), node.name or f"MatMulLowBit_{idx}"

            def fresh(base: str) -> str:
                while base in taken:
                    base += "_"
                taken.add(base)
                return base

            added_add = True
            steps = ["bias"] * bool(bias) + ["gelu"] * gelu + ["skip"] * bool(skip) + ["ln"] * bool(gamma)
            steps += ["split"] * bool(split)
            del node.output[:]
            cur = fresh(f"{outs[0]}::raw")
            node.output.append(cur)
            for k, step in enumerate(steps):
                nxt = outs[0] if k == len(steps) - 1 and step != "split" else fresh(f"{outs[0]}::{step}")
                if step == "bias":
                    new_nodes.append(onnx.helper.make_node("Add", [cur, bias], [nxt], name=f"{prefix}_{idx}_bias"))
                elif step == "gelu":
                    nodes_, inits_ = _gelu(cur, nxt, f"{prefix}_{idx}_gelu", fresh)
                    new_nodes += nodes_
                    graph.initializer.extend(inits_)
                elif step == "skip":
                    new_nodes.append(onnx.helper.make_node("Add", [cur, skip], [nxt], name=f"{prefix}_{idx}_skip"))
                elif step == "ln":  # (the exporter fuses this only from a LayerNormalization: opset >= 17)
                    new_nodes.append(onnx.helper.make_node(
                        "LayerNormalization", [cur, gamma] + ([beta] if beta else []), [nxt], axis=-1, epsilon=eps,
                        name=f"{prefix}_{idx}_ln"))
                else:
                    sizes = fresh(f"{prefix}_{idx}::split")
                    graph.initializer.append(onnx.numpy_helper.from_array(np.array(split, np.int64), sizes))
                    new_nodes.append(onnx.helper.make_node("Split", [cur, sizes], outs, axis=-1,
                                                           name=f"{prefix}_{idx}_split"))
                cur = nxt
        node.domain = CONTRIB_DOMAIN
        # the Python op declares K, N, bits and group_size; accuracy_level (native int8 math) does not apply to the
        # reference, which computes in fp32
        # (nor do activation, epsilon and split, applied above in standard ops)
        extra = [a for a in node.attribute if a.name not in ("K", "N", "bits", "group_size")]
        for a in extra:
            node.attribute.remove(a)
        if len(node.input) == 4 and node.input[3]:
            continue
        a = _attrs(node)
        try:
            K, N, bits, group = (int(a[k]) for k in ("K", "N", "bits", "group_size"))
        except KeyError as e:
            raise ValueError(f"MatMulLowBit node {node.name or idx!r} lacks attribute {e}") from e
        lowbit.check_attributes(K, N, bits, group)
        name = f"{node.name or 'MatMulLowBit'}_{idx}_zero_points"
        while name in taken:
            name += "_"
        taken.add(name)
        zp = np.full((N, lowbit.num_groups(K, group)), 1 << (bits - 1), dtype=np.uint8)
        graph.initializer.append(onnx.numpy_helper.from_array(zp, name))
        del node.input[3:]
        node.input.append(name)
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        still_used = any(n.domain == lowbit.DOMAIN for n in graph.node)
        kept = [o for o in out.opset_import if o.domain != CONTRIB_DOMAIN and (still_used or o.domain != lowbit.DOMAIN)]
        del out.opset_import[:]
        out.opset_import.extend(kept)
        out.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
        if added_add and not any(o.domain in ("", "ai.onnx") for o in out.opset_import):
            out.opset_import.append(onnx.helper.make_opsetid("", 13))
    return out


def _tidy_opsets(model, domain: str):
    """``model`` (rewritten to standard ops) without ``domain`` in its opset list when no node uses it any more, and
    with the default domain listed; returns it."""
    import onnx.helper as oh

    if not any(n.domain == domain for n in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid("", 13))
    return model


def sparse24_to_standard(model):
    """A copy of ``model`` whose ``ai.edgekit::MatMulSparse24`` nodes are standard ONNX ops (see the module
    docstring); ValueError for a node whose values or indices are not constant initializers."""
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, new_inits, changed = [], [], False
    for idx, node in enumerate(graph.node):
        if node.domain != sparse24.DOMAIN or node.op_type != sparse24.OP_TYPE:
            new_nodes.append(node)
            continue
        changed = True
        a = _attrs(node)
        K, name = int(a["K"]), node.name or f"MatMulSparse24_{idx}"
        ins = list(node.input) + [""] * (6 - len(node.input))
        const = [t for t in ins[1:4] if t]
        if any(t not in inits for t in const):
            raise ValueError(f"{name}: MatMulSparse24 runs without the native library only with constant values, "
                             "indices and w_scale")
        values, indices = nh.to_array(inits[ins[1]]), nh.to_array(inits[ins[2]])
        w_scale = nh.to_array(inits[ins[3]]).astype(np.float32) if ins[3] else None
        y = node.output[0]
        if ins[4]:  # uint8 activations: exact int32 sums, then the two scales
            b = f"{name}::dense_int8"
            new_inits.append(nh.from_array(np.ascontiguousarray(sparse24.unpack(values, indices, K).T), b))
            new_inits.append(nh.from_array(w_scale, f"{name}::w_scale_f"))
            mm = [ins[0], b] + ([ins[5]] if ins[5] else [])
            new_nodes += [oh.make_node("MatMulInteger", mm, [f"{name}::acc"], name=f"{name}_mmi"),
                          oh.make_node("Cast", [f"{name}::acc"], [f"{name}::accf"], to=onnx.TensorProto.FLOAT,
                                       name=f"{name}_cast"),
                          oh.make_node("Mul", [f"{name}::accf", ins[4]], [f"{name}::scaled"], name=f"{name}_ascale"),
                          oh.make_node("Mul", [f"{name}::scaled", f"{name}::w_scale_f"], [y], name=f"{name}_wscale")]
        else:
            b = f"{name}::dense"
            w = sparse24.dequantize(values, indices, w_scale, K)
            new_inits.append(nh.from_array(np.ascontiguousarray(w.T), b))
            new_nodes.append(oh.make_node("MatMul", [ins[0], b], [y], name=f"{name}_matmul"))
    if not changed:
        return out
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {t for n in graph.node for t in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return _tidy_opsets(out, sparse24.DOMAIN)


def qconv_to_standard(model):
    """A copy of ``model`` whose ``ai.edgekit::QLinearDepthwiseConv`` / ``QLinearConvDirect`` nodes are ONNX
    ``QLinearConv`` (``group`` = channels / 1) between two Transposes (NHWC -> NCHW -> NHWC): the same ops by their
    specification (``edgekit.kernels.qconv``), at ONNX Runtime's own speed. ONNX Runtime cancels the transposes where
    the graph around is channels-last."""
    import onnx
    import onnx.helper as oh

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_nodes, changed = [], False
    for idx, node in enumerate(graph.node):
        if node.domain != qconv.DOMAIN or node.op_type not in (qconv.OP_DEPTHWISE, qconv.OP_DIRECT):
            new_nodes.append(node)
            continue
        changed = True
        name = node.name or f"{node.op_type}_{idx}"
        a = _attrs(node)
        inits = {i.name: i for i in graph.initializer}
        if len(node.input) < 4 or node.input[3] not in inits:
            raise ValueError(f"{name}: {node.op_type} needs a constant weight")
        group = int(inits[node.input[3]].dims[0]) if node.op_type == qconv.OP_DEPTHWISE else 1
        attrs = {k: [int(v) for v in a[k]] for k in ("kernel_shape", "strides", "pads", "dilations") if k in a}
        x, y = f"{name}::x_nchw", f"{name}::y_nchw"
        new_nodes += [oh.make_node("Transpose", [node.input[0]], [x], perm=[0, 3, 1, 2], name=f"{name}_to_nchw"),
                      oh.make_node("QLinearConv", [x, *node.input[1:]], [y], group=group, name=f"{name}_conv",
                                   **attrs),
                      oh.make_node("Transpose", [y], [node.output[0]], perm=[0, 2, 3, 1], name=f"{name}_to_nhwc")]
    if not changed:
        return out
    del graph.node[:]
    graph.node.extend(new_nodes)
    return _tidy_opsets(out, qconv.DOMAIN)
