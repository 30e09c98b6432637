"""Write group-wise low-bit weights into an ONNX graph, as ONNX Runtime's contrib kernels run them.

- A MatMul with a constant ``[K, N]`` weight, or a Gemm (``alpha = beta = 1``, no ``transA``) with a constant weight
  and an optional bias, becomes ``com.microsoft.MatMulNBits`` (2, 4 or 8 bits; ``accuracy_level`` 4 lets the CPU
  kernel quantize the activations per block to int8 and use its integer dot products).
- Other bit-widths (3) become ``ai.edgekit::MatMulLowBit`` (``edgekit.kernels``), and so does every bit-width with
  ``edgekit_ops=True`` (the target's profile lists ``ai.edgekit`` in ``custom_op_domains``: its runtime carries the
  native library, ``runtimes/onnxruntime/``). ONNX Runtime runs the op in that library when it is built, else through
  the Python reference (``edgekit.agent.runtime.prepare_model``). There, a MatMul whose output only feeds an ``Add``
  of a constant ``[N]`` bias (torch's ``nn.Linear``) takes that bias as its fused input and the Add goes (MiniLM:
  36 Adds fewer, ~0.5 ms of ~11 ms at sequence 128). With ``fuse_activations`` (ONNX Runtime targets), an exact GELU
  after such a MatMul (``Div -> Erf -> Add -> Mul -> Mul``, as torch exports ``nn.GELU()``) becomes the op's
  ``activation="Gelu"`` epilogue too (MiniLM: 30 nodes fewer).
- A 1x1 Conv (group 1, stride 1, no padding or dilation effect) is lowered to the same op over channels-last rows:
  ``Transpose(NCHW -> NHWC)``, the MatMul op on ``[..., Cin]`` (bias fused), ``Transpose`` back. 1x1 convolutions
  dominate MobileNet/EfficientNet compute, and this lets them take any low-bit width the MatMul kernels run.
- A Gather from a constant ``[V, D]`` table along axis 0 (an embedding) becomes ``com.microsoft.GatherBlockQuantized``
  (4 or 8 bits; 2 bits symmetric only).

Packing (both ops): per row, values little-endian within each byte at ``bits`` apiece (``edgekit.kernels.lowbit.pack``,
the ``ai.edgekit`` layout, which for 2, 4 and 8 bits is ONNX Runtime's); ``MatMulNBits`` holds B as
``[N, blocks, group·bits/8]``, scales ``[N·blocks]`` and zero points packed per row at ``bits`` per value (one byte
each for 8 bits); ``GatherBlockQuantized`` holds data ``[V, D·bits/8]``, scales ``[V, blocks]``, zero points
``[V, ceil(blocks·bits/8)]``. The other ops of the graph are untouched, so this composes with QDQ and dynamic int8.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgekit.compress.wquant import QWeight
from edgekit.errors import ExportError
from edgekit.export.ort_fusions import gelu_tails, residual_layernorms, sibling_groups
from edgekit.kernels.lowbit import pack

MS_DOMAIN = "com.microsoft"
EDGEKIT_DOMAIN = "ai.edgekit"
MATMUL_BITS = (2, 4, 8)
GATHER_BITS = (4, 8)
DEFAULT_ACCURACY_LEVEL = 4  # int8 compute on CPUs; measured faster than fp32 compute here (benchmarks/RESULTS.md)


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def matmul_nbits(name: str, x: str, y: str, qw: QWeight, *, bias: str | None = None,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL):
    """A MatMulNBits node computing ``y = x @ dequant(qw).T (+ bias)`` and its initializers."""
    from onnx import helper, numpy_helper

    if qw.bits not in MATMUL_BITS:
        raise ExportError(f"{name}: MatMulNBits runs {MATMUL_BITS}-bit weights, not {qw.bits}-bit")
    blob = qw.group * qw.bits // 8
    b = pack(qw.q, qw.bits).reshape(qw.n, qw.blocks, blob)
    inits = [numpy_helper.from_array(b, f"{name}::B"),
             numpy_helper.from_array(qw.scales.reshape(-1).astype(np.float32), f"{name}::scales")]
    inputs = [x, f"{name}::B", f"{name}::scales"]
    if qw.zeros is not None:
        inits.append(numpy_helper.from_array(pack(qw.zeros, qw.bits).reshape(-1), f"{name}::zero_points"))
        inputs.append(f"{name}::zero_points")
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]
    node = helper.make_node("MatMulNBits", inputs, [y], name=name, domain=MS_DOMAIN, K=qw.k, N=qw.n, bits=qw.bits,
                            block_size=qw.group, accuracy_level=accuracy_level)
    return node, inits


def matmul_lowbit(name: str, x: str, y: str | list[str], qw: QWeight, *, bias: str | None = None,
                  accuracy_level: int = DEFAULT_ACCURACY_LEVEL, activation: str = "", split: list[int] | None = None,
                  residual_ln: tuple[str, str, str, float] | None = None):
    """An ``ai.edgekit::MatMulLowBit`` node computing ``y = x @ dequant(qw).T (+ bias)`` (any of 2/3/4/8 bits;
    ``edgekit.kernels.lowbit``) and its initializers: the format for bit-widths ONNX Runtime has no kernel for
    (3 bits), and for every bit-width on targets with the native library. Zero points are one byte each; ``bias``
    (a float32 ``[N]`` tensor name) is the op's 5th input, fused in the kernels' epilogue; ``accuracy_level`` 4
    lets the native kernel multiply in int8; ``activation`` ("Gelu") is the op's fused activation; ``split`` (with
    one output name per part in ``y``) sends consecutive columns of the result to separate outputs;
    ``residual_ln`` = (skip, ln_scale, ln_bias or "", epsilon) fuses the residual add and LayerNorm after them."""
    from onnx import numpy_helper

    from edgekit.kernels import lowbit as spec

    inits = [numpy_helper.from_array(pack(qw.q, qw.bits), f"{name}::B"),  # rows padded to whole groups
             numpy_helper.from_array(qw.scales.astype(np.float32), f"{name}::scales")]
    inputs = [x, f"{name}::B", f"{name}::scales"]
    if qw.zeros is not None:
        inits.append(numpy_helper.from_array(qw.zeros.astype(np.uint8), f"{name}::zero_points"))
        inputs.append(f"{name}::zero_points")
    if bias:
        inputs += [""] * (4 - len(inputs)) + [bias]
    epsilon = None
    if residual_ln:
        skip, gamma, beta, epsilon = residual_ln
        inputs += [""] * (5 - len(inputs)) + [skip, gamma] + ([beta] if beta else [])
    node = spec.make_node(inputs, [y] if isinstance(y, str) else list(y), K=qw.k, N=qw.n, bits=qw.bits,
                          group_size=qw.group, name=name, activation=activation, split=split, epsilon=epsilon)
    if accuracy_level:
        from onnx import helper

        node.attribute.append(helper.make_attribute("accuracy_level", int(accuracy_level)))
    return node, inits


def gather_block_quantized(name: str, indices: str, y: str, qw: QWeight):
    """A GatherBlockQuantized node computing ``y = dequant(qw)[indices]`` and its initializers."""
    from onnx import helper, numpy_helper

    if qw.bits not in GATHER_BITS and not (qw.bits == 2 and qw.zeros is None):
        raise ExportError(f"{name}: GatherBlockQuantized runs 4/8-bit (or symmetric 2-bit) tables, not {qw.bits}-bit")
    if qw.k != qw.q.shape[1]:
        raise ExportError(f"{name}: the embedding width {qw.k} must be a multiple of the group {qw.group}")
    inits = [numpy_helper.from_array(pack(qw.q, qw.bits), f"{name}::data"),
             numpy_helper.from_array(qw.scales.astype(np.float32), f"{name}::scales")]
    inputs = [f"{name}::data", indices, f"{name}::scales"]
    if qw.zeros is not None:
        inits.append(numpy_helper.from_array(pack(qw.zeros, qw.bits), f"{name}::zero_points"))
        inputs.append(f"{name}::zero_points")
    node = helper.make_node("GatherBlockQuantized", inputs, [y], name=name, domain=MS_DOMAIN, bits=qw.bits,
                            block_size=qw.group, gather_axis=0, quantize_axis=1)
    return node, inits


def weight_matrix(node, inits: Mapping) -> np.ndarray:
    """The ``[N, K]`` (rows = outputs) weight of a MatMul / Gemm / Gather layer, as float32."""
    from onnx import numpy_helper

    if node.op_type == "Gather":
        return numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if node.op_type == "Conv":  # [Cout, Cin, 1, 1]
        return w.reshape(w.shape[0], w.shape[1])
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return w
    return w.T


def is_pointwise_conv(node, inits: Mapping) -> bool:
    """A Conv that is a per-pixel matrix product: 1x1 kernel, group 1, unit strides, no padding, constant weight."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    dims = tuple(inits[node.input[1]].dims)
    return (len(dims) == 4 and dims[2:] == (1, 1) and _attr(node, "group", 1) == 1
            and all(v == 1 for v in _attr(node, "strides", [1, 1])) and not any(_attr(node, "pads", [0] * 4))
            and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID"))


def check_rewritable(node, inits: Mapping) -> None:
    """Raise ExportError unless ``node`` is a layer this module can rewrite."""
    if node.op_type == "Gather":
        if node.input[0] not in inits or _attr(node, "axis", 0) != 0 or len(inits[node.input[0]].dims) != 2:
            raise ExportError(f"{node.name}: only a Gather from a constant 2-D table along axis 0 is an embedding")
        return
    if node.op_type == "Conv":
        if not is_pointwise_conv(node, inits):
            raise ExportError(f"{node.name}: only 1x1 convolutions (group 1, unit strides, no padding) are lowered to "
                              "low-bit MatMul kernels")
        return
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        raise ExportError(f"{node.name}: {node.op_type} has no constant weight to quantize weight-only")
    if len(inits[node.input[1]].dims) != 2:
        raise ExportError(f"{node.name}: weight-only quantization needs a 2-D weight")
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                   or _attr(node, "beta", 1.0) != 1.0):
        raise ExportError(f"{node.name}: Gemm with transA, alpha or beta other than 1 is not supported weight-only")


def _fused_bias(name: str, bias: str, inits: Mapping, n: int):
    """The float32 ``[n]`` initializer ``<name>::bias`` holding constant ``bias`` (a Gemm/Conv input or an Add's
    operand), the low-bit op's fused bias; ExportError when it is not a constant of n values."""
    from onnx import numpy_helper

    if bias not in inits or int(np.prod(inits[bias].dims)) != n:
        raise ExportError(f"{name}: only a constant per-output bias ({n} values) can be fused")
    return numpy_helper.from_array(numpy_helper.to_array(inits[bias]).reshape(n).astype(np.float32), f"{name}::bias")


def _pointwise_conv(node, qw: QWeight, inits: Mapping, *, accuracy_level: int, edgekit_ops: bool):
    """``Transpose -> low-bit MatMul (bias fused) -> Transpose`` computing a 1x1 Conv with ``qw``."""
    from onnx import helper

    name, x, y = node.name, node.input[0], node.output[0]
    nodes = [helper.make_node("Transpose", [x], [f"{name}::nhwc"], name=f"{name}::to_nhwc", perm=[0, 2, 3, 1])]
    extra = []
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = f"{name}::y_nhwc"
    if bias is not None:
        extra.append(_fused_bias(name, bias, inits, qw.n))
    use_nbits = qw.bits in MATMUL_BITS and not edgekit_ops
    make = matmul_nbits if use_nbits else matmul_lowbit
    mm, more = make(name, f"{name}::nhwc", out, qw, bias=f"{name}::bias" if bias else None,
                    accuracy_level=accuracy_level)
    nodes.append(mm)
    extra += more
    nodes.append(helper.make_node("Transpose", [out], [y], name=f"{name}::to_nchw", perm=[0, 3, 1, 2]))
    return nodes, extra


def _bias_adds(g, weights: Mapping[str, QWeight], inits) -> dict:
    """{MatMul name: (Add node, bias initializer name)} for low-bit MatMuls whose output only feeds one Add of a
    constant per-output bias of shape ``[N]`` (as torch's exporter writes ``nn.Linear``; that broadcast cannot change
    the output's shape): that Add becomes the op's fused bias input."""
    consumers: dict[str, list] = {}
    for node in g.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    outputs = {o.name for o in g.output}
    found = {}
    for node in g.node:
        qw = weights.get(node.name)
        if qw is None or node.op_type != "MatMul" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
            continue
        add = users[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        dims = list(inits[other].dims) if other in inits else None
        if other == node.output[0] or dims != [qw.n] or inits[other].data_type != 1:  # float32 [N] only
            continue
        found[node.name] = (add, other)
    return found


def _concat(parts: list[QWeight]) -> QWeight:
    """One weight whose rows are ``parts``' rows in order (same bits, group and K)."""
    zeros = None if parts[0].zeros is None else np.concatenate([p.zeros for p in parts])
    return QWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]), zeros,
                   parts[0].bits, parts[0].group, parts[0].k)


def _merged(members: list, weights: Mapping[str, QWeight], bias_adds: Mapping, inits, accuracy_level: int):
    """The ``MatMulLowBit`` (``split`` outputs) computing sibling MatMuls ``members``, each output written where that
    member's (bias-fused) output was; a member without a bias gets zeros in the concatenated one."""
    from onnx import numpy_helper

    parts = [weights[m.name] for m in members]
    ys, biases = [], []
    for m, qw in zip(members, parts):
        add_bias = bias_adds.get(m.name)
        ys.append(add_bias[0].output[0] if add_bias else m.output[0])
        biases.append(numpy_helper.to_array(inits[add_bias[1]]).reshape(qw.n).astype(np.float32) if add_bias
                      else np.zeros(qw.n, np.float32))
    merged = "+".join(m.name for m in members)
    extra = []
    bias = None
    if any(m.name in bias_adds for m in members):
        extra.append(numpy_helper.from_array(np.concatenate(biases), f"{merged}::bias"))
        bias = extra[0].name
    n, more = matmul_lowbit(merged, members[0].input[0], ys, _concat(parts), bias=bias,
                            accuracy_level=accuracy_level, split=[p.n for p in parts])
    return n, extra + more


def apply_weight_only(model, weights: Mapping[str, QWeight], *, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                      edgekit_ops: bool = False, fuse_activations: bool = False):
    """A copy of ``model`` (ModelProto) whose nodes named in ``weights`` read those low-bit weights instead of their
    float initializers (which are dropped when nothing else reads them). ``edgekit_ops``: every low-bit MatMul/Gemm
    becomes ``ai.edgekit::MatMulLowBit`` (else only the bit-widths ``MatMulNBits`` lacks). ``fuse_activations``
    (with ``edgekit_ops``; the native ONNX Runtime library has these, the TensorRT plugins do not): an exact GELU
    after a low-bit MatMul becomes the op's ``activation="Gelu"``, a following residual ``Add`` and
    ``LayerNormalization`` its ``skip``/``ln_scale``/``ln_bias`` inputs, and sibling MatMuls one op with ``split``
    outputs (``export.ort_fusions``)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    found = set()
    new_nodes, new_inits = [], []
    bias_adds = _bias_adds(g, weights, inits) if edgekit_ops else {}
    fused = {add.output[0] for add, _ in bias_adds.values()}  # nodes that go, by output
    gelus = {}
    if edgekit_ops and fuse_activations:
        outputs_of = {n.name: (bias_adds[n.name][0].output[0] if n.name in bias_adds else n.output[0])
                      for n in g.node if n.name in weights and n.op_type in ("MatMul", "Gemm")}
        gelus = gelu_tails(g, outputs_of, inits)
        fused |= {t.output[0] for tail, _ in gelus.values() for t in tail}
        lns = residual_layernorms(out, {n: gelus[n][1] if n in gelus else y for n, y in outputs_of.items()}, inits)
        fused |= {t.output[0] for add, ln, *_ in lns.values() for t in (add, ln)}
        pending = {ln.output[0]: mm for mm, (_, ln, *_) in lns.items()}  # emitted where the LayerNorm was
    else:
        lns, pending = {}, {}
    groups = {}  # first member -> the group; the other members are skipped
    if edgekit_ops and fuse_activations:
        for names in sibling_groups(g, weights, set(gelus) | set(lns)):
            groups[names[0]] = names
            fused |= {n.output[0] for n in g.node if n.name in names[1:]}
    nodes_by_name = {n.name: n for n in g.node}
    for node in g.node:
        if node.output and node.output[0] in pending:  # the LayerNorm's place: its MatMul, with the whole tail
            node = nodes_by_name[pending[node.output[0]]]
        elif node.output and node.output[0] in fused or node.name in lns:
            if node.name in weights:
                check_rewritable(node, inits)
                found.add(node.name)
            continue
        qw = weights.get(node.name)
        if qw is None:
            new_nodes.append(node)
            continue
        check_rewritable(node, inits)
        found.add(node.name)
        if node.name in groups:
            n, extra = _merged([nodes_by_name[m] for m in groups[node.name]], weights, bias_adds, inits,
                               accuracy_level)
            new_nodes.append(n)
            new_inits += extra
            continue
        if node.op_type == "Gather":
            n, extra = gather_block_quantized(node.name, node.input[1], node.output[0], qw)
        elif node.op_type == "Conv":
            nodes, extra = _pointwise_conv(node, qw, inits, accuracy_level=accuracy_level, edgekit_ops=edgekit_ops)
            new_nodes += nodes[:-1]
            n = nodes[-1]
        else:
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            y = node.output[0]
            if node.name in bias_adds:  # MatMul -> Add(constant [N]): the Add's bias fused, the Add's output written
                add, bias = bias_adds[node.name]
                y = add.output[0]
            if node.name in gelus:  # ... -> GELU: the activation fused, the GELU's output written
                y = gelus[node.name][1]
            residual_ln = None
            if node.name in lns:  # ... -> Add(residual) -> LayerNormalization: both fused, the LayerNorm's output
                _, ln, residual, gamma, beta, eps = lns[node.name]
                y, residual_ln = ln.output[0], (residual, gamma, beta, eps)
            if bias is not None:
                new_inits.append(_fused_bias(node.name, bias, inits, qw.n))
                bias = new_inits[-1].name
            make = matmul_nbits if qw.bits in MATMUL_BITS and not edgekit_ops else matmul_lowbit
            fusions = {"activation": "Gelu"} if node.name in gelus else {}
            if residual_ln:
                fusions["residual_ln"] = residual_ln
            n, extra = make(node.name, node.input[0], y, qw, bias=bias, accuracy_level=accuracy_level, **fusions)
        new_nodes.append(n)
        new_inits += extra
    missing = sorted(set(weights) - found)
    if missing:
        raise ExportError(f"layers not in the graph: {', '.join(missing[:5])}")
    commit_rewrite(out, new_nodes, new_inits)
    return out


def commit_rewrite(model, nodes: list, inits: list) -> None:
    """Make ``nodes`` the graph of ``model`` (in place), add ``inits``, drop the initializers nothing reads any more,
    and list the contrib domains the nodes use (``com.microsoft``, ``ai.edgekit``) at version 1."""
    from onnx import helper

    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    for domain in sorted({n.domain for n in g.node if n.domain in (MS_DOMAIN, EDGEKIT_DOMAIN)}):
        # version 1, also where the base model already lists the domain: a model ONNX Runtime saved in a process that
        # had registered our library lists ai.edgekit at the registry's version (1000), which made the bytes depend on
        # what ran before in the process
        listed = [o for o in model.opset_import if o.domain == domain]
        for o in listed:
            o.version = 1
        if not listed:
            model.opset_import.append(helper.make_opsetid(domain, 1))
