"""Run ``MatMulLowBit`` in ONNX Runtime at reference speed through onnxruntime-extensions Python ops.

onnxruntime-extensions registers every Python op in its own domain, ``ai.onnx.contrib``
(``onnxruntime_extensions.default_opset_domain()``), with a fixed number of inputs. So the fallback works on a
rewritten copy of the model:

- ``to_contrib_domain(model)`` moves every ``ai.edgekit::MatMulLowBit`` node to ``ai.onnx.contrib::MatMulLowBit``
  and gives the symmetric ones (3 inputs) an explicit zero-point initializer filled with ``2 ** (bits - 1)``,
  which is the same op by the specification in ``edgekit.kernels.lowbit``; a ``bias`` (5th input) moves into a
  following ``Add`` node (the Python op has 4 inputs), which computes the same sum;
- ``register_python_op()`` registers the numpy reference under that name once per process (the registry of
  onnxruntime-extensions is process-global) and returns the library path for the session options.

Usage::

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(register_python_op())
    sess = onnxruntime.InferenceSession(to_contrib_domain(model).SerializeToString(), so)

A native custom-op library for ``ai.edgekit`` (planned under ``runtimes/onnxruntime/``) would serve the op
directly; this module is the fallback that keeps graphs with the op runnable (and testable) anywhere
onnxruntime-extensions installs.
"""

from __future__ import annotations

import numpy as np

from edgekit.kernels import lowbit

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
        if len(node.input) > 4:
            bias = node.input[4]
            del node.input[4:]
            if bias:  # the Python op has no bias input: Y = MatMulLowBit(...) + bias
                y = node.output[0]
                mid = f"{y}::no_bias"
                while mid in taken:
                    mid += "_"
                taken.add(mid)
                node.output[0] = mid
                added_add = True
                new_nodes.append(
                    onnx.helper.make_node("Add", [mid, bias], [y], name=f"{node.name or 'MatMulLowBit'}_{idx}_bias")
                )
        node.domain = CONTRIB_DOMAIN
        # the Python op declares K, N, bits and group_size; accuracy_level (native int8 math) does not apply to the
        # reference, which computes in fp32
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
