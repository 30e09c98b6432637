"""Pre-flight: does a graph fit the target's TensorRT version, before any compression work and again on the export.

Every node and encoding is checked against what the version's ONNX parser and builder accept
(``../shared/design/TENSORRT.md``): the parser's operator table and opset range, Q/DQ rules (symmetric int8, strictly
positive constant scales, ``axis`` written, INT4 blocks only from TensorRT 10 on 2-D MatMul/Gemm weights), plugin
nodes (names, STRING version/namespace, INT8 packed weights, the plugin library on the target), FP8 and 2:4 against the
GPU. ``check`` returns every problem; ``require`` raises one ``UnsupportedOnTarget`` naming them all.

Operator tables: onnx-tensorrt ``docs/operators.md`` at 8.5 (opsets up to 17) and 10.0 (opsets 9-20); 8.6 adds
LayerNormalization, 10.x GroupNormalization and Gelu. ONNX Runtime's integer forms (QLinear*, *Integer,
DynamicQuantizeLinear) and ``com.microsoft`` ops are not TensorRT ops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgekit.errors import UnsupportedOnTarget

# onnx-tensorrt 8.5 "Supported: Y" rows (docs/operators.md)
_OPS_85 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())
_OPS_86 = _OPS_85 | {"LayerNormalization"}
_OPS_10 = _OPS_86 | {"GroupNormalization", "Gelu"}
_ORT_ONLY = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                       "QLinearAdd", "QLinearMul", "QGemm"})
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FP8 = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")


@dataclass(frozen=True)
class Problem:
    node: str
    op: str
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.message} — {self.hint}"


def supported_ops(version: str) -> frozenset[str]:
    major, minor = (int(x) for x in version.split(".")[:2])
    if major >= 10:
        return _OPS_10
    return _OPS_86 if (major, minor) >= (8, 6) else _OPS_85


def opset_range(version: str) -> tuple[int, int]:
    """ONNX opsets the parser reads; 21 for TensorRT 10 (blocked INT4 DequantizeLinear, TENSORRT.md §3)."""
    major = int(version.split(".")[0])
    return (9, 21) if major >= 10 else (7, 17)


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Checker:
    def __init__(self, model, version: str, sm: tuple[int, int], plugin_ops: Iterable[str]) -> None:
        from onnx import numpy_helper

        self.model, self.version, self.sm = model, version, sm
        self.major = int(version.split(".")[0])
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.arrays = {}
        self._np = numpy_helper
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.plugin_ops = set(plugin_ops)
        self.problems: list[Problem] = []

    def add(self, node, message: str, hint: str) -> None:
        self.problems.append(Problem(node.name or "(unnamed)", node.op_type, message, hint))

    def array(self, name: str):
        if name not in self.arrays:
            self.arrays[name] = self._np.to_array(self.inits[name]) if name in self.inits else None
        return self.arrays[name]

    def dtype(self, name: str) -> str | None:
        from onnx import TensorProto

        init = self.inits.get(name)
        return None if init is None else TensorProto.DataType.Name(init.data_type)

    def run(self) -> list[Problem]:
        lo, hi = opset_range(self.version)
        for op in self.model.opset_import:
            if op.domain in ("", "ai.onnx") and not lo <= op.version <= hi:
                self.problems.append(Problem("(model)", "opset", f"opset {op.version} is outside TensorRT "
                                             f"{self.version}'s range {lo}-{hi}",
                                             f"export the model with an opset between {lo} and {hi}"))
        ops = supported_ops(self.version)
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                self.plugin(node)
            elif node.op_type in _ORT_ONLY:
                self.add(node, "an ONNX Runtime integer op, not a TensorRT op",
                         "export for TensorRT with Q/DQ (edgekit does this for TensorRT targets)")
            elif node.op_type not in ops:
                self.add(node, f"not an operator TensorRT {self.version}'s ONNX parser supports",
                         "replace it in the model, or run this model on a target whose runtime is ONNX Runtime")
            elif node.op_type in _QDQ:
                self.qdq(node)
            elif node.op_type in ("Conv", "ConvTranspose") and not self.constant_weight(node.input[1]):
                self.add(node, "the weight is not an initializer", "TensorRT needs constant convolution weights")
        return self.problems

    def constant_weight(self, name: str) -> bool:
        if name in self.inits:
            return True
        prod = next((n for n in self.graph.node if name in n.output), None)
        return prod is not None and prod.op_type == "DequantizeLinear" and prod.input[0] in self.inits

    def qdq(self, node) -> None:
        scale = node.input[1] if len(node.input) > 1 else ""
        s = self.array(scale) if scale else None
        if s is None:
            self.add(node, "the scale is not an initializer", "TensorRT needs static scales")
        elif not np.all(s > 0):
            self.add(node, "a scale is not strictly positive", "replace zero scales (all-zero channels) by 1")
        zp = node.input[2] if len(node.input) > 2 else ""
        if zp:
            z = self.array(zp)
            if z is None or np.any(z != 0):
                self.add(node, "the zero-point is not a constant zero", "TensorRT quantization is symmetric")
            kind = self.dtype(zp)
            if kind == "UINT8":
                self.add(node, "a UINT8 zero-point (asymmetric uint8)", "use symmetric INT8 (zero-point 0, int8)")
            if kind in _FP8 and self.sm < (8, 9):
                self.add(node, "FP8 needs compute capability 8.9 or newer", "use INT8 on this GPU")
        block = _attr(node, "block_size", 0)
        qtype = self.dtype(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if qtype in ("INT4", "UINT4") or block:
            self.int4(node, qtype, block)
        elif s is not None and s.ndim == 1 and s.size > 1 and _attr(node, "axis") is None:
            self.add(node, "a per-axis scale without an explicit axis",
                     "write axis: TensorRT 10.1 read a missing one as 0, newer parsers as 1")
        if s is not None and s.ndim >= 1 and s.size > 1 and node.input[0] not in self.inits:
            self.add(node, "per-axis or block scales on an activation", "only constant weights take per-axis scales")

    def int4(self, node, qtype: str | None, block: int) -> None:
        if self.major < 10:
            self.add(node, f"INT4 does not exist in TensorRT {self.version}", "use INT8 weights for TensorRT 8.x")
            return
        if qtype == "UINT4":
            self.add(node, "UINT4 weights", "TensorRT INT4 is symmetric: signed INT4, no zero-point")
        if block not in (64, 128):
            self.add(node, f"INT4 block size {block}", "TensorRT takes blocks of 64 or 128")
        w = self.array(node.input[0])
        users = self.consumers.get(node.output[0], [])
        if w is None or w.ndim != 2 or not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            self.add(node, "INT4 on something other than a 2-D MatMul/Gemm weight",
                     "TensorRT 10 runs INT4 weight-only on 2-D MatMul/Gemm weights only")

    def plugin(self, node) -> None:
        from edgekit.export.trt_plugins import PLUGIN_NAMESPACE, PLUGINS

        names = {spec.plugin_name for spec in PLUGINS.values()}
        if node.op_type in PLUGINS and node.domain == PLUGIN_NAMESPACE:
            self.add(node, "an ai.edgekit node not in TensorRT plugin form",
                     "rewrite it with edgekit.export.trt_plugins.to_tensorrt_nodes")
            return
        if node.op_type not in names:
            self.add(node, f"a custom op of domain {node.domain!r} that no TensorRT plugin of edgekit implements",
                     "run this model on ONNX Runtime, or register a TensorRT plugin for it")
            return
        if node.op_type not in self.plugin_ops:
            self.add(node, "the target does not list edgekit's TensorRT plugin library",
                     "add 'ai.edgekit' to the target's custom_op_domains once the plugins are built for it")
        for key in ("plugin_version", "plugin_namespace"):
            a = next((a for a in node.attribute if a.name == key), None)
            if a is None or a.type != a.STRING:
                self.add(node, f"{key} is missing or not a STRING attribute", "TensorRT reads an INT one as ''")
        for name in node.input:
            if self.dtype(name) == "UINT8":
                self.add(node, f"input {name} is a UINT8 initializer (the parser converts it to INT32)",
                         "store packed bytes as INT8 (TENSORRT.md rule 4)")


def check(model, version: str, sm: str | tuple[int, int], *, plugins: bool = False, sparse: bool = False
          ) -> list[Problem]:
    """Every way ``model`` (ModelProto) does not fit TensorRT ``version`` on a GPU of compute capability ``sm``;
    ``plugins``: the target carries edgekit's plugin library; ``sparse``: the engine will use 2:4 weights."""
    from edgekit.export.trt_plugins import PLUGINS

    cc = tuple(int(x) for x in sm.split(".")) if isinstance(sm, str) else tuple(sm)
    plugin_ops = [s.plugin_name for s in PLUGINS.values()] if plugins else []
    problems = _Checker(model, version, cc, plugin_ops).run()
    if sparse and cc < (8, 0):
        problems.append(Problem("(model)", "sparsity", f"2:4 sparse weights need sparse tensor cores (sm >= 8.0), "
                                f"this GPU is sm {sm}", "remove sparse2:4 options for this target"))
    return problems


def require(model, profile, *, sparse: bool = False, stage: str = "graph") -> None:
    """Raise ``UnsupportedOnTarget`` naming every problem of ``model`` for ``profile``'s TensorRT."""
    if profile.tensorrt is None:
        raise UnsupportedOnTarget(f"target {profile.name} has no TensorRT version")
    problems = check(model, profile.tensorrt.version, profile.hardware.sm or "0.0",
                     plugins=profile.edgekit_kernels, sparse=sparse)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise UnsupportedOnTarget(
            f"TensorRT {profile.tensorrt.version} pre-flight failed for the {stage} ({len(problems)} problem(s)):\n  "
            f"{shown}{more}",
            hint="fix the nodes named above, or build for a target whose runtime is ONNX Runtime "
                 "(e.g. --target cpu-x86)")
