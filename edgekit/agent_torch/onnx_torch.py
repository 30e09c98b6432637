"""A small ONNX -> PyTorch interpreter, so that the agent can take gradients through an artifact.

``TorchGraph(model)`` is a ``torch.nn.Module`` that executes an ``onnx.ModelProto`` node by node with torch ops.
It covers the graphs edgekit produces: float CNNs, QDQ int8 graphs and weight-only ``com.microsoft.MatMulNBits``
layers. It is an interpreter, not a compiler: every forward walks the node list in topological order.

Ops (default domain): Conv (groups, pads, strides, dilations, auto_pad; 1-D/2-D/3-D), Relu, LeakyRelu, Clip,
Sigmoid, HardSigmoid, HardSwish, Tanh, Erf, Exp, Log, Sqrt, Neg, Abs, Add, Sub, Mul, Div, Pow, MaxPool, AveragePool,
GlobalAveragePool, GlobalMaxPool, ReduceMean/ReduceSum/ReduceMax/ReduceMin (axes as input or attribute), Reshape,
Flatten, Gemm (transA/transB/alpha/beta), MatMul, Softmax, LogSoftmax, Concat, Transpose, Identity, Constant, Shape,
Gather, Unsqueeze, Squeeze, Slice (positive steps), Cast, Pad, BatchNormalization (inference),
DequantizeLinear (per-tensor, per-axis and blocked; int8/uint8/int16/uint16/int32/int4/uint4), QuantizeLinear;
``com.microsoft``: MatMulNBits (2, 4 and 8 bits). Anything else raises ``UnsupportedOpError`` at construction,
naming the op and the node.

Semantics that matter for adaptation:

- Initializers, and everything computed from them alone (weight DequantizeLinear, MatMulNBits weights, shape
  constants), are evaluated once at construction and held as buffers: frozen, never parameters. The exception is
  ``trainable=[initializer names]`` (float initializers only): those are ``nn.Parameter``s, nothing computed from
  them is folded, and ``initializer_parameters()`` returns them by initializer name (recovery fine-tuning,
  ``edgekit.compress.recover``).
- QuantizeLinear produces its integer codes as float values, so a QuantizeLinear -> DequantizeLinear pair is a fake
  quantizer. Its gradient is the clipped straight-through estimator: 1 where the input is inside the representable
  range, 0 where it saturates (which is also the gradient of a ReLU that ONNX Runtime fused into a uint8 range).
  A QuantizeLinear whose codes are a graph output is cast to its integer type there.
- ``affine={tensor: (scale, shift)}`` (at construction, or per call) replaces the tensor wherever it is produced by
  ``scale.view(1, -1, 1, ...) * y + shift.view(1, -1, 1, ...)`` (channel axis 1), so every consumer sees the
  corrected value and gradients reach ``scale`` and ``shift``.

Numerics against ONNX Runtime (tests/test_tent.py): FP32 graphs agree to float rounding (digits-cnn and
EfficientNet-Lite0: max |diff| ~1e-5 on logits). QDQ graphs agree up to rounding: a few activations in a million land
on the other side of a rounding boundary (float summation order), and the one-step differences propagate (digits-cnn
int8: cosine 0.99999, top-1 100 %; EfficientNet-Lite0 int8 on 64 photos: mean per-sample cosine 0.9993, min 0.9988,
top-1 100 %).

Needs torch and onnx (this module imports torch at import time; ``edgekit.agent_torch.tent`` imports it lazily).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MS_DOMAIN = "com.microsoft"
MATMUL_NBITS_BITS = (2, 4, 8)


class UnsupportedOpError(NotImplementedError):
    """The graph holds an op (or an op variant) this interpreter does not implement."""


# ONNX TensorProto data types -> torch dtypes (INT4/UINT4 are widened to 8 bits; their range is kept separately)
_TORCH_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.int16, 5: torch.int16, 6: torch.int32,
                 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.int64,
                 13: torch.int64, 16: torch.bfloat16, 21: torch.uint8, 22: torch.int8}
# ranges of the quantized types QuantizeLinear may produce
_QRANGE = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 21: (0, 15), 22: (-8, 7)}
_INT_TORCH_TO_ONNX = {torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6}


@dataclass
class _Node:
    op: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


def _attrs(node) -> dict:
    from onnx import AttributeProto, helper, numpy_helper

    out = {}
    for a in node.attribute:
        if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"{node.op_type} node {node.name!r}: subgraph attributes are not supported")
        if a.type == AttributeProto.TENSOR:
            out[a.name] = (numpy_helper.to_array(a.t), a.t.data_type)
            continue
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or arr.dtype.name in ("int4", "uint4"):  # ml_dtypes 4-bit
        arr = arr.astype(np.int8 if "u" not in arr.dtype.name else np.uint8)
    if arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    if arr.dtype == np.uint32 or arr.dtype == np.uint64:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr).copy())


def _ints(t) -> list[int]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _axis_shape(ndim: int, axis: int, n: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = n
    return shape


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a torch module. ``forward(*inputs)`` takes the graph inputs positionally and returns the
    output (one output) or a tuple of outputs; ``run(feeds)`` takes a name -> array mapping and returns a dict.

    ``model``: ``onnx.ModelProto``, serialized bytes or a path. ``affine``: optional ``{tensor_name: (scale,
    shift)}`` applied on every call that does not pass its own (see the module docstring). ``trainable``: names of
    float initializers to hold as ``nn.Parameter``s instead of frozen buffers."""

    def __init__(self, model, affine: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 trainable: Iterable[str] = ()) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        if isinstance(model, bytes | bytearray):
            model = onnx.load_from_string(bytes(model))
        elif isinstance(model, str | Path):
            model = onnx.load(str(model))
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        init_names = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        self._output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}

        consts: dict[str, torch.Tensor] = {}
        self._elem_type: dict[str, int] = {}  # ONNX type of constants, where torch cannot tell (4-bit)
        for init in graph.initializer:
            consts[init.name] = _to_torch(numpy_helper.to_array(init))
            self._elem_type[init.name] = init.data_type
        live = set(trainable)  # initializers that become parameters: nothing that reads them is folded
        bad = sorted(t for t in live if t not in consts or not consts[t].is_floating_point())
        if bad:
            raise ValueError(f"trainable tensors {bad} are not float initializers of this model")

        nodes = [_Node(n.op_type, n.domain if n.domain != "ai.onnx" else "", n.name or f"{n.op_type}_{k}",
                       list(n.input), list(n.output), _attrs(n)) for k, n in enumerate(graph.node)]
        for node in nodes:
            self._check_supported(node)

        # evaluate once what depends on constants only (weights through DequantizeLinear, shape arithmetic)
        runtime: list[_Node] = []
        for node in nodes:
            if live.intersection(node.inputs):
                runtime.append(node)
                continue
            if node.op == "MatMulNBits" and all(t in consts for t in node.inputs[1:] if t):
                runtime.append(self._prepare_matmul_nbits(node, consts))
                continue
            if all(t in consts for t in node.inputs if t):
                with torch.no_grad():
                    outs = self._exec(node, [consts[t] if t else None for t in node.inputs])
                for name, value in zip(node.outputs, outs, strict=False):
                    if name:
                        consts[name] = value
                if node.op == "Constant" and "value" in node.attrs:
                    self._elem_type[node.outputs[0]] = node.attrs["value"][1]
                continue
            runtime.append(node)
        self._nodes = runtime
        self.dynamic_tensors = frozenset(o for n in runtime for o in n.outputs if o) | frozenset(self.input_names)

        needed = {t for n in runtime for t in n.inputs if t} | set(self.output_names)
        self._buffer_of: dict[str, str] = {}
        for k, name in enumerate(sorted(t for t in needed if t in consts and t not in live)):
            attr = f"const_{k}"
            self.register_buffer(attr, consts[name], persistent=False)
            self._buffer_of[name] = attr
        self._param_of: dict[str, str] = {}
        for k, name in enumerate(sorted(t for t in needed if t in live)):
            attr = f"param_{k}"
            self.register_parameter(attr, torch.nn.Parameter(consts[name]))
            self._buffer_of[name] = attr
            self._param_of[name] = attr
        missing = [o for o in self.output_names if o not in consts and o not in self.dynamic_tensors]
        if missing:
            raise ValueError(f"graph outputs {missing} are not produced by any node")
        self.affine = dict(affine) if affine else {}

    # ------------------------------------------------------------------------------------------------ public API

    def initializer_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Initializer name -> its ``nn.Parameter`` (the ``trainable`` initializers the graph reads)."""
        return {name: getattr(self, attr) for name, attr in self._param_of.items()}

    def run(self, feeds: Mapping[str, object], affine: Mapping[str, tuple] | None = None,
            outputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Execute the graph. ``feeds``: graph input name -> tensor or array. ``affine`` overrides the module's.
        ``outputs``: which tensors to return (default: the graph outputs; intermediate tensors may be named)."""
        affine = self.affine if affine is None else affine
        bad = [t for t in affine if t not in self.dynamic_tensors]
        if bad:
            raise KeyError(f"affine tensors {bad} are not computed from the graph inputs of this model")
        want = list(outputs) if outputs is not None else self.output_names
        device = next(itertools.chain(self.buffers(), self.parameters()), torch.empty(0)).device
        env: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                raise KeyError(f"missing graph input {name!r} (inputs: {self.input_names})")
            v = feeds[name]
            env[name] = (v if isinstance(v, torch.Tensor) else _to_torch(np.asarray(v))).to(device)
        for name in self.input_names:
            if name in affine:
                env[name] = self._apply_affine(name, env[name], affine[name])
        for node in self._nodes:
            args = [self._get(env, t) if t else None for t in node.inputs]
            outs = self._exec(node, args)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = self._apply_affine(name, value, affine[name]) if name in affine else value
        result = {}
        for name in want:
            value = self._get(env, name)
            etype = self._output_types.get(name)
            if etype in _QRANGE and value.is_floating_point():  # QuantizeLinear codes as a graph output
                value = value.to(_TORCH_DTYPES[etype])
            result[name] = value
        return result

    def forward(self, *args, affine: Mapping[str, tuple] | None = None):
        if len(args) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({self.input_names}), got {len(args)}")
        out = self.run(dict(zip(self.input_names, args, strict=True)), affine=affine)
        values = tuple(out[n] for n in self.output_names)
        return values[0] if len(values) == 1 else values

    # ----------------------------------------------------------------------------------------------- internals

    def _get(self, env: dict, name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        attr = self._buffer_of.get(name)
        if attr is None:
            raise KeyError(f"tensor {name!r} is not computed by this graph")
        return getattr(self, attr)

    @staticmethod
    def _apply_affine(name: str, y: torch.Tensor, params) -> torch.Tensor:
        scale, shift = params
        if y.ndim < 2 or scale.numel() != y.shape[1] or shift.numel() != y.shape[1]:
            raise ValueError(f"affine for {name!r}: {scale.numel()}/{shift.numel()} values, but the tensor has shape "
                             f"{tuple(y.shape)} (channel axis 1)")
        shape = [1, -1] + [1] * (y.ndim - 2)
        return scale.reshape(shape).to(y.dtype) * y + shift.reshape(shape).to(y.dtype)

    def _check_supported(self, node: _Node) -> None:
        if node.domain == MS_DOMAIN and node.op == "MatMulNBits":
            return
        if node.domain == "" and hasattr(self, f"_op_{node.op}"):
            return
        where = f"{node.domain}::{node.op}" if node.domain else node.op
        raise UnsupportedOpError(f"the ONNX->torch interpreter does not support op {where} (node {node.name!r})")

    def _exec(self, node: _Node, args: list) -> list[torch.Tensor]:
        fn = getattr(self, f"_op_{node.op}")
        try:
            out = fn(node, *args)
        except UnsupportedOpError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{node.op} node {node.name!r} failed: {type(exc).__name__}: {exc}") from exc
        return list(out) if isinstance(out, tuple | list) else [out]

    # ------------------------------------------------------------------------------------------------------ ops

    # elementwise -------------------------------------------------------------------------------------------
    def _op_Identity(self, n, x):
        return x

    def _op_Relu(self, n, x):
        return torch.relu(x)

    def _op_LeakyRelu(self, n, x):
        return F.leaky_relu(x, n.attrs.get("alpha", 0.01))

    def _op_Sigmoid(self, n, x):
        return torch.sigmoid(x)

    def _op_HardSigmoid(self, n, x):
        return torch.clamp(n.attrs.get("alpha", 0.2) * x + n.attrs.get("beta", 0.5), 0.0, 1.0)

    def _op_HardSwish(self, n, x):
        return F.hardswish(x)

    def _op_Tanh(self, n, x):
        return torch.tanh(x)

    def _op_Erf(self, n, x):
        return torch.erf(x)

    def _op_Exp(self, n, x):
        return torch.exp(x)

    def _op_Log(self, n, x):
        return torch.log(x)

    def _op_Sqrt(self, n, x):
        return torch.sqrt(x)

    def _op_Neg(self, n, x):
        return -x

    def _op_Abs(self, n, x):
        return torch.abs(x)

    def _op_Add(self, n, a, b):
        return a + b

    def _op_Sub(self, n, a, b):
        return a - b

    def _op_Mul(self, n, a, b):
        return a * b

    def _op_Div(self, n, a, b):
        if not a.is_floating_point() and not b.is_floating_point():
            return torch.div(a, b, rounding_mode="trunc")
        return a / b

    def _op_Pow(self, n, a, b):
        return torch.pow(a, b)

    def _op_Clip(self, n, x, lo=None, hi=None):
        if self.opset < 11:
            lo, hi = n.attrs.get("min"), n.attrs.get("max")
        if lo is not None:
            x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
        if hi is not None:
            x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
        return x

    def _op_Cast(self, n, x):
        to = n.attrs["to"]
        if to not in _TORCH_DTYPES:
            raise UnsupportedOpError(f"Cast node {n.name!r}: target type {to} is not supported")
        return x.to(_TORCH_DTYPES[to])

    # convolution and pooling ----------------------------------------------------------------------------------
    @staticmethod
    def _pads(n, spatial: Sequence[int], kernel: Sequence[int], strides, dilations) -> list[int]:
        """ONNX pads [b1, b2, ..., e1, e2, ...] resolved from auto_pad."""
        nd = len(spatial)
        auto = n.attrs.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(nd):
                out = -(-spatial[i] // strides[i])
                total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
                lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
                begin.append(lo)
                end.append(total - lo)
            return begin + end
        if auto == "VALID":
            return [0] * (2 * nd)
        return list(n.attrs.get("pads", [0] * (2 * nd)))

    @staticmethod
    def _torch_pad(pads: Sequence[int]) -> list[int]:
        """ONNX [b1..bn, e1..en] -> F.pad's (b_n, e_n, ..., b_1, e_1)."""
        nd = len(pads) // 2
        out = []
        for i in reversed(range(nd)):
            out += [pads[i], pads[i + nd]]
        return out

    def _op_Conv(self, n, x, w, b=None):
        nd = x.ndim - 2
        if nd not in (1, 2, 3):
            raise UnsupportedOpError(f"Conv node {n.name!r}: {nd}-D convolution")
        kernel = list(w.shape[2:])
        strides = list(n.attrs.get("strides", [1] * nd))
        dil = list(n.attrs.get("dilations", [1] * nd))
        pads = self._pads(n, list(x.shape[2:]), kernel, strides, dil)
        if pads[:nd] == pads[nd:]:
            padding = pads[:nd]
        else:
            x = F.pad(x, self._torch_pad(pads))
            padding = [0] * nd
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return conv(x, w, b, stride=strides, padding=padding, dilation=dil, groups=n.attrs.get("group", 1))

    def _op_MaxPool(self, n, x):
        if len(n.outputs) > 1 and n.outputs[1]:
            raise UnsupportedOpError(f"MaxPool node {n.name!r}: the Indices output is not supported")
        nd = x.ndim - 2
        kernel = list(n.attrs["kernel_shape"])
        strides = list(n.attrs.get("strides", [1] * nd))
        dil = list(n.attrs.get("dilations", [1] * nd))
        pads = self._pads(n, list(x.shape[2:]), kernel, strides, dil)
        ceil = bool(n.attrs.get("ceil_mode", 0))
        if pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
            padding = pads[:nd]
        else:
            x = F.pad(x, self._torch_pad(pads), value=-math.inf)
            padding = [0] * nd
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, kernel, strides, padding, dil, ceil_mode=ceil)

    def _op_AveragePool(self, n, x):
        nd = x.ndim - 2
        kernel = list(n.attrs["kernel_shape"])
        strides = list(n.attrs.get("strides", [1] * nd))
        if any(d != 1 for d in n.attrs.get("dilations", [1] * nd)):
            raise UnsupportedOpError(f"AveragePool node {n.name!r}: dilations are not supported")
        pads = self._pads(n, list(x.shape[2:]), kernel, strides, [1] * nd)
        ceil = bool(n.attrs.get("ceil_mode", 0))
        include = bool(n.attrs.get("count_include_pad", 0))
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        if not any(pads):
            return pool(x, kernel, strides, 0, ceil_mode=ceil)
        if pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
            return pool(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)
        xp = F.pad(x, self._torch_pad(pads))
        avg = pool(xp, kernel, strides, 0, ceil_mode=ceil)
        if include:
            return avg
        ones = F.pad(torch.ones_like(x[:1, :1]), self._torch_pad(pads))
        frac = pool(ones, kernel, strides, 0, ceil_mode=ceil)
        return avg / frac

    def _op_GlobalAveragePool(self, n, x):
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)

    def _op_GlobalMaxPool(self, n, x):
        return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)

    def _op_BatchNormalization(self, n, x, scale, bias, mean, var):
        if len([o for o in n.outputs if o]) > 1:
            raise UnsupportedOpError(f"BatchNormalization node {n.name!r}: training mode is not supported")
        shape = _axis_shape(x.ndim, 1, -1)
        inv = scale / torch.sqrt(var + n.attrs.get("epsilon", 1e-5))
        return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)

    # reductions ------------------------------------------------------------------------------------------------
    def _reduce(self, n, x, axes, fn):
        axes_in_input = {"ReduceSum": 13}.get(n.op, 18)
        if self.opset < axes_in_input:
            axes = n.attrs.get("axes")
        axes = _ints(axes) if axes is not None else []
        keep = bool(n.attrs.get("keepdims", 1))
        if not axes:
            if n.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        return fn(x, tuple(a % x.ndim for a in axes), keep)

    def _op_ReduceMean(self, n, x, axes=None):
        return self._reduce(n, x, axes, lambda t, d, k: t.mean(dim=d, keepdim=k))

    def _op_ReduceSum(self, n, x, axes=None):
        return self._reduce(n, x, axes, lambda t, d, k: t.sum(dim=d, keepdim=k))

    def _op_ReduceMax(self, n, x, axes=None):
        return self._reduce(n, x, axes, lambda t, d, k: t.amax(dim=d, keepdim=k))

    def _op_ReduceMin(self, n, x, axes=None):
        return self._reduce(n, x, axes, lambda t, d, k: t.amin(dim=d, keepdim=k))

    # linear algebra --------------------------------------------------------------------------------------------
    def _op_MatMul(self, n, a, b):
        return torch.matmul(a, b)

    def _op_Gemm(self, n, a, b, c=None):
        if n.attrs.get("transA", 0):
            a = a.transpose(0, 1)
        if n.attrs.get("transB", 0):
            b = b.transpose(0, 1)
        y = torch.matmul(a, b)
        alpha, beta = n.attrs.get("alpha", 1.0), n.attrs.get("beta", 1.0)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    def _op_Softmax(self, n, x):
        if self.opset >= 13:
            return torch.softmax(x, dim=n.attrs.get("axis", -1))
        axis = n.attrs.get("axis", 1) % x.ndim
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return torch.softmax(flat, dim=1).reshape(x.shape)

    def _op_LogSoftmax(self, n, x):
        if self.opset >= 13:
            return torch.log_softmax(x, dim=n.attrs.get("axis", -1))
        axis = n.attrs.get("axis", 1) % x.ndim
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return torch.log_softmax(flat, dim=1).reshape(x.shape)

    # shapes ----------------------------------------------------------------------------------------------------
    def _op_Constant(self, n):
        a = n.attrs
        if "value" in a:
            return _to_torch(a["value"][0])
        if "value_float" in a:
            return torch.tensor(a["value_float"], dtype=torch.float32)
        if "value_floats" in a:
            return torch.tensor(list(a["value_floats"]), dtype=torch.float32)
        if "value_int" in a:
            return torch.tensor(a["value_int"], dtype=torch.int64)
        if "value_ints" in a:
            return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
        raise UnsupportedOpError(f"Constant node {n.name!r}: attributes {sorted(a)} are not supported")

    def _op_Shape(self, n, x):
        shape = list(x.shape)
        start, end = n.attrs.get("start", 0), n.attrs.get("end", len(shape))
        return torch.tensor(shape[start:end], dtype=torch.int64)

    def _op_Reshape(self, n, x, shape):
        target = _ints(shape)
        if not n.attrs.get("allowzero", 0):
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        return x.reshape(target)

    def _op_Flatten(self, n, x):
        axis = n.attrs.get("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))

    def _op_Transpose(self, n, x):
        perm = n.attrs.get("perm") or list(reversed(range(x.ndim)))
        return x.permute(*perm)

    def _op_Concat(self, n, *xs):
        return torch.cat([x for x in xs if x is not None], dim=n.attrs["axis"])

    def _op_Gather(self, n, x, idx):
        axis = n.attrs.get("axis", 0) % x.ndim
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        out = torch.index_select(x, axis, idx.reshape(-1))
        return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))

    def _op_Unsqueeze(self, n, x, axes=None):
        axes = _ints(axes) if self.opset >= 13 else list(n.attrs["axes"])
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x

    def _op_Squeeze(self, n, x, axes=None):
        axes = _ints(axes) if self.opset >= 13 else list(n.attrs.get("axes", []))
        if not axes:
            return x.squeeze()
        for a in sorted((a % x.ndim for a in axes), reverse=True):
            x = x.squeeze(a)
        return x

    def _op_Slice(self, n, x, starts=None, ends=None, axes=None, steps=None):
        if self.opset < 10:
            starts, ends, axes = n.attrs["starts"], n.attrs["ends"], n.attrs.get("axes")
        starts, ends = _ints(starts), _ints(ends)
        axes = _ints(axes) if axes is not None and len(_ints(axes)) else list(range(len(starts)))
        steps = _ints(steps) if steps is not None and len(_ints(steps)) else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            if st <= 0:
                raise UnsupportedOpError(f"Slice node {n.name!r}: step {st} (only positive steps are supported)")
            dim = x.shape[a % x.ndim]
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            index[a % x.ndim] = slice(s, e, st)
        return x[tuple(index)]

    def _op_Pad(self, n, x, pads=None, value=None, axes=None):
        mode = n.attrs.get("mode", "constant")
        if self.opset < 11:
            pads, value = n.attrs["pads"], n.attrs.get("value", 0.0)
        pads = _ints(pads)
        if axes is not None:
            ax = [a % x.ndim for a in _ints(axes)]
            full = [0] * (2 * x.ndim)
            for i, a in enumerate(ax):
                full[a], full[a + x.ndim] = pads[i], pads[i + len(ax)]
            pads = full
        tp = self._torch_pad(pads)
        if mode == "constant":
            if isinstance(value, torch.Tensor):
                v = float(value.reshape(-1)[0]) if value.numel() else 0.0
            else:
                v = float(value or 0.0)
            return F.pad(x, tp, value=v)
        # torch pads the trailing dims only in reflect/replicate: drop leading zero pairs
        while len(tp) > 2 and tp[-2:] == [0, 0]:
            tp = tp[:-2]
        return F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate"}[mode])

    # quantization ----------------------------------------------------------------------------------------------
    def _qparams(self, n, x, scale, zp):
        """scale and zero point broadcast against x (per-tensor, per-axis or blocked)."""
        axis = n.attrs.get("axis", 1)
        block = n.attrs.get("block_size", 0)
        zp = torch.zeros((), dtype=torch.float32, device=x.device) if zp is None else zp.to(torch.float32)
        scale = scale.to(torch.float32)
        if scale.numel() == 1 and not block:
            return scale.reshape(()), zp.reshape(())
        axis %= x.ndim
        if block:
            scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
            if zp.ndim:
                zp = zp.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
            return scale, zp
        shape = _axis_shape(x.ndim, axis, -1)
        return scale.reshape(shape), zp.reshape(shape) if zp.numel() > 1 else zp.reshape(())

    def _op_DequantizeLinear(self, n, x, scale, zp=None):
        s, z = self._qparams(n, x, scale, zp)
        return (x.to(torch.float32) - z) * s

    def _op_QuantizeLinear(self, n, x, scale, zp=None):
        zp_name = n.inputs[2] if len(n.inputs) > 2 else ""
        etype = self._elem_type.get(zp_name) if zp_name else n.attrs.get("output_dtype", 2) or 2
        if etype is None and zp is not None:
            etype = _INT_TORCH_TO_ONNX.get(zp.dtype)
        if etype not in _QRANGE:
            raise UnsupportedOpError(f"QuantizeLinear node {n.name!r}: output type {etype} is not supported")
        qmin, qmax = _QRANGE[etype]
        s, z = self._qparams(n, x, scale, zp)
        # integer codes as float values; clipped straight-through gradient (clamp passes 0 where it saturates)
        return torch.clamp(_round_ste(x / s) + z, qmin, qmax)

    # com.microsoft ---------------------------------------------------------------------------------------------
    def _prepare_matmul_nbits(self, n: _Node, consts: dict) -> _Node:
        """Dequantize a MatMulNBits node's packed weights once; the node becomes A @ W.T (+ bias)."""
        a = n.attrs
        k, nout, bits, block = int(a["K"]), int(a["N"]), int(a.get("bits", 4)), int(a["block_size"])
        if bits not in MATMUL_NBITS_BITS:
            raise UnsupportedOpError(f"MatMulNBits node {n.name!r}: {bits}-bit weights are not supported "
                                     f"(supported: {MATMUL_NBITS_BITS})")
        ins = n.inputs + [""] * (6 - len(n.inputs))
        if ins[4]:
            raise UnsupportedOpError(f"MatMulNBits node {n.name!r}: g_idx (act-order) input is not supported")
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        n_blocks = -(-k // block)

        def unpack(packed: torch.Tensor) -> torch.Tensor:
            p = packed.to(torch.int32)
            parts = [(p >> (bits * j)) & mask for j in range(per_byte)]
            return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], p.shape[-1] * per_byte)

        q = unpack(consts[ins[1]].reshape(nout, n_blocks, -1)).to(torch.float32)  # [N, blocks, block]
        scales = consts[ins[2]].to(torch.float32).reshape(nout, n_blocks, 1)
        if ins[3]:
            zp = consts[ins[3]]
            if zp.is_floating_point():
                zp = zp.to(torch.float32).reshape(nout, n_blocks, 1)
            else:
                zp = unpack(zp.reshape(nout, -1))[:, :n_blocks].to(torch.float32).reshape(nout, n_blocks, 1)
        else:
            zp = torch.full((), float(1 << (bits - 1)))
        w = ((q - zp) * scales).reshape(nout, n_blocks * block)[:, :k].contiguous()
        wname = f"{n.name}::dequantized_weight"
        consts[wname] = w
        return _Node("_MatMulTransB", "", n.name, [ins[0], wname, ins[5]], n.outputs)

    def _op__MatMulTransB(self, n, x, w, bias=None):
        y = torch.matmul(x, w.transpose(0, 1))
        return y if bias is None else y + bias

    def _op_MatMulNBits(self, n, *args):  # only reached with non-constant weights
        raise UnsupportedOpError(f"MatMulNBits node {n.name!r}: weights must be initializers")
