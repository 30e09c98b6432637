"""TensorRT plugins for the ai.edgekit ops (runtimes/tensorrt/): the ONNX node form the TensorRT parser maps to the
plugins (edgekit.export.trt_plugins), the C++ core's identity matching the Python one, and the core compiled and
unit-tested on the CPU (g++) and its CUDA part compiled for every target (nvcc, no GPU).

Not tested here, because TensorRT cannot be installed in CI: the TensorRT wrappers (edgekit_trt_plugins_v3.cpp,
_v2.cpp, _register.cpp) are never compiled, not even parsed (they need NvInfer.h). runtimes/tensorrt/README.md says
what was run where."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.export import trt_plugins
from edgekit.export.trt_plugins import TensorRTPluginError, plugin_fields, to_tensorrt_nodes
from edgekit.kernels import attention, lowbit, sparse24
from edgekit.kernels.cuda import build

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "runtimes" / "tensorrt"
HEADER = TRT_DIR / "edgekit_trt_core.h"
needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


# ---- models ----


def _model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.edgekit", 1)])


def lowbit_model(bits=4, gs=32, K=100, N=24, zp=True, bias=False, **extra):
    rng = np.random.default_rng(bits)
    W = rng.standard_normal((N, K)).astype(np.float32)
    packed, scales, zps = lowbit.quantize_rtn(W, bits, gs, symmetric=not zp)
    inits = [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(scales, "S")]
    names = ["A", "W", "S"]
    if zp:
        inits.append(numpy_helper.from_array(zps, "Z"))
        names.append("Z")
    if bias:  # the optional 5th input (zero_points "" when symmetric)
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"))
        names += [""] * (4 - len(names)) + ["bias"]
    node = lowbit.make_node(names, ["Y"], K=K, N=N, bits=bits, group_size=gs, name="fc1")
    node.attribute.extend(helper.make_attribute(k, v) for k, v in extra.items())
    return _model(
        [node, helper.make_node("Relu", ["Y"], ["R"])],
        inits,
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("R", TensorProto.FLOAT, ["batch", N])],
    )


def sparse_model(K=40, N=12, int8=False):
    rng = np.random.default_rng(1)
    values, indices = sparse24.pack(sparse24.random_2of4(rng, N, K))
    inits = [numpy_helper.from_array(values, "V"), numpy_helper.from_array(indices, "I")]
    names = ["A", "V", "I"]
    if int8:
        q, scale = sparse24.quantize_int8_rows(values)
        inits = [numpy_helper.from_array(q, "V"), inits[1], numpy_helper.from_array(scale, "WS")]
        names.append("WS")
    node = sparse24.make_node(names, ["Y"], K=K, N=N, name="sp")
    return _model(
        [node],
        inits,
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, N])],
    )


def attention_model(**attrs):
    node = attention.make_node(["Q", "K", "V"], ["O"], name="attn", **attrs)
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 16, 64]) for n in ("Q", "K", "V", "O")]
    return _model([node], [], vi[:3], vi[3:])


def _set(model, name, value):
    for a in model.graph.node[0].attribute:
        if a.name == name:
            a.i = value
    return model


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ---- the mapping ----


@pytest.mark.parametrize("bits,gs,zp", [(4, 32, True), (3, 128, False), (2, 64, True), (8, 32, False)])
def test_lowbit_node_form_and_bit_exact_int8(bits, gs, zp):
    model = lowbit_model(bits, gs, zp=zp, accuracy_level=4)
    before = model.SerializeToString()
    out = to_tensorrt_nodes(model)
    assert model.SerializeToString() == before  # the input is not modified
    onnx.checker.check_model(out)
    node = out.graph.node[0]
    assert (node.op_type, node.domain, node.name) == ("EdgekitMatMulLowBit", "ai.edgekit", "fc1")
    attrs = _attrs(node)
    assert attrs == {"K": 100, "N": 24, "bits": bits, "group_size": gs,
                     "plugin_version": b"1", "plugin_namespace": b"ai.edgekit"}
    types = {a.name: a.type for a in node.attribute}
    assert types["plugin_version"] == types["plugin_namespace"] == onnx.AttributeProto.STRING
    assert types["K"] == onnx.AttributeProto.INT
    assert list(node.output) == ["Y"] and node.input[0] == "A" and node.input[2] == "S"
    W8 = _init(out, node.input[1])
    assert W8.dtype == np.int8 and node.input[1] == "W_int8"
    orig = _init(model, "W")
    assert np.array_equal(W8.view(np.uint8), orig) and W8.tobytes() == orig.tobytes()  # same bytes
    assert (W8 < 0).any() == (orig >= 128).any()
    if zp:
        Z8 = _init(out, node.input[3])
        assert Z8.dtype == np.int8 and Z8.tobytes() == _init(model, "Z").tobytes()
    names = {t.name for t in out.graph.initializer}
    assert "W" not in names and "Z" not in names and "S" in names  # no UINT8 initializer is left behind
    assert all(t.data_type != TensorProto.UINT8 for t in out.graph.initializer)
    assert out.graph.node[1].op_type == "Relu"


@pytest.mark.parametrize("zp", [True, False])
def test_lowbit_bias_is_split_into_a_following_add(zp):
    """The plugin has no bias input: MatMulLowBit(..., bias) maps to the plugin (3-4 inputs) then an ONNX Add."""
    model = lowbit_model(4, 32, zp=zp, bias=True, accuracy_level=4)
    before = model.SerializeToString()
    out = to_tensorrt_nodes(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out)
    plugin, add, relu = out.graph.node
    assert plugin.op_type == "EdgekitMatMulLowBit" and plugin.name == "fc1"
    assert len(plugin.input) == (4 if zp else 3) and all(plugin.input)
    assert add.op_type == "Add" and add.domain == "" and list(add.input) == [plugin.output[0], "bias"]
    assert list(add.output) == ["Y"] and plugin.output[0] != "Y" and relu.input[0] == "Y"
    assert "bias" in {t.name for t in out.graph.initializer}
    assert len({n.name for n in out.graph.node}) == 3


def test_shared_initializer_kept_for_other_users_and_converted_once():
    model = lowbit_model(zp=False)
    node2 = helper.make_node("MatMulLowBit", ["A", "W", "S"], ["Y2"], domain="ai.edgekit", name="fc2",
                             K=100, N=24, bits=4, group_size=32)
    model.graph.node.append(node2)
    model.graph.node.append(helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT))  # another user of W
    out = to_tensorrt_nodes(model)
    a, b = (n for n in out.graph.node if n.op_type == "EdgekitMatMulLowBit")
    assert a.input[1] == b.input[1] == "W_int8"
    names = [t.name for t in out.graph.initializer]
    assert names.count("W_int8") == 1 and "W" in names  # still read by the Cast


def test_sparse24_float_variant():
    model = sparse_model()
    out = to_tensorrt_nodes(model)
    onnx.checker.check_model(out)
    node = out.graph.node[0]
    assert node.op_type == "EdgekitMatMulSparse24"
    assert _attrs(node) == {"K": 40, "N": 12, "plugin_version": b"1", "plugin_namespace": b"ai.edgekit"}
    values = _init(out, node.input[1])
    assert values.dtype == np.float16 and np.array_equal(values, _init(model, "V").astype(np.float16))
    idx = _init(out, node.input[2])
    assert idx.dtype == np.int8 and idx.tobytes() == _init(model, "I").tobytes()


def test_attention_fields_always_written():
    out = to_tensorrt_nodes(attention_model())
    node = out.graph.node[0]
    assert node.op_type == "EdgekitAttentionInt8" and list(node.input) == ["Q", "K", "V"]
    attrs = _attrs(node)
    assert attrs["q_block"] == 1 and attrs["k_block"] == 64 and attrs["smooth_q"] == 1
    assert attrs["sm_scale"] == pytest.approx(0.125)
    attrs = _attrs(to_tensorrt_nodes(attention_model(q_block=32, k_block=16, smooth_q=False, sm_scale=0.2))
                   .graph.node[0])
    assert (attrs["q_block"], attrs["k_block"], attrs["smooth_q"]) == (32, 16, 0)
    assert attrs["sm_scale"] == pytest.approx(0.2)


def test_plugin_fields_are_what_the_creator_receives():
    out = to_tensorrt_nodes(lowbit_model(bits=3, gs=128))
    fields = plugin_fields(out.graph.node[0])
    assert [f.name for f in fields] == ["K", "N", "bits", "group_size"]  # plugin_version/namespace select, not fields
    assert all(f.type == "kINT32" and f.data.dtype == np.int32 and f.length == 1 for f in fields)
    assert [int(f.data[0]) for f in fields] == [100, 24, 3, 128]
    att = plugin_fields(to_tensorrt_nodes(attention_model(sm_scale=0.3)).graph.node[0])
    sm = next(f for f in att if f.name == "sm_scale")
    assert sm.type == "kFLOAT32" and sm.data.dtype == np.float32 and sm.data[0] == np.float32(0.3)
    with pytest.raises(TensorRTPluginError, match="to_tensorrt_nodes"):
        plugin_fields(lowbit_model().graph.node[0])
    # an int64 attribute reaches the creator truncated to int32, as the parser does (TENSORRT.md §1)
    node = helper.make_node("EdgekitMatMulSparse24", ["A", "V", "I"], ["Y"], K=2**32 + 8, N=4)
    assert int(plugin_fields(node)[0].data[0]) == 8


# ---- refusals ----


@pytest.mark.parametrize(
    "model,match",
    [
        (lambda: lowbit_model(foo=1), r"\['foo'\] have no TensorRT plugin field"),
        (lambda: lowbit_model(accuracy_level=1), "accuracy_level=1 is not supported"),
        (lambda: lowbit_model(bits=4, gs=32, K=2**31 + 31, N=1, zp=False), None),  # built below: too large
        (lambda: sparse_model(int8=True), "int8 variants"),
        (lambda: _set(attention_model(), "q_block", 0), "q_block and k_block must be >= 1"),
        (lambda: _set(attention_model(), "smooth_q", 2), "smooth_q must be 0 or 1"),
    ],
    ids=["unknown-attribute", "accuracy-level", "int32-overflow", "sparse-int8", "attention-block", "smooth-q"],
)
def test_refusals(model, match):
    if match is None:  # a K beyond int32, without building a 2**31-column weight
        m = _set(lowbit_model(zp=False), "K", 2**31 + 31)
        match = "does not fit int32"
    else:
        m = model()
    with pytest.raises(TensorRTPluginError, match=match) as info:
        to_tensorrt_nodes(m)
    assert "node" in str(info.value)  # names the node


def test_refuses_bad_inputs_and_unknown_ops():
    m = _set(lowbit_model(zp=False), "group_size", 16)
    with pytest.raises(TensorRTPluginError, match="group_size=16"):
        to_tensorrt_nodes(m)
    m = lowbit_model(zp=False)
    m.graph.node.insert(0, helper.make_node("Identity", ["W"], ["Wc"]))
    m.graph.node[1].input[1] = "Wc"  # packed weights computed at run time: a UINT8 intermediate
    with pytest.raises(TensorRTPluginError, match="must be a graph initializer"):
        to_tensorrt_nodes(m)
    m = _set(lowbit_model(zp=False), "K", 140)  # B_packed's row length no longer matches
    with pytest.raises(TensorRTPluginError, match="B_packed"):
        to_tensorrt_nodes(m)
    m = lowbit_model(zp=False)
    m.graph.node.append(helper.make_node("Mystery", ["A"], ["Z"], domain="ai.edgekit"))
    with pytest.raises(TensorRTPluginError, match="has no TensorRT plugin"):
        to_tensorrt_nodes(m)
    inner = helper.make_graph([attention.make_node(["Q", "K", "V"], ["O2"])], "then", [],
                              [helper.make_tensor_value_info("O2", TensorProto.FLOAT, None)])
    m = attention_model()
    m.graph.node.append(helper.make_node("If", ["c"], ["X"], then_branch=inner, else_branch=inner))
    with pytest.raises(TensorRTPluginError, match="control-flow"):
        to_tensorrt_nodes(m)
    m = attention_model()
    m.graph.node[0].attribute.append(helper.make_attribute("note", "hi"))
    with pytest.raises(TensorRTPluginError, match="type STRING"):
        to_tensorrt_nodes(m)


# ---- the C++ core agrees with Python ----


def _header_constants():
    text = HEADER.read_text()
    strings = dict(re.findall(r'constexpr char (k\w+)\[\] = "([^"]*)";', text))
    lists = {name: re.findall(r'"(\w+)"', body)
             for name, body in re.findall(r"constexpr const char\* (k\w+Fields)\[\] = \{([^}]*)\};", text)}
    return strings, lists


def test_core_header_identity_matches_python():
    strings, lists = _header_constants()
    assert strings["kPluginNamespace"] == trt_plugins.PLUGIN_NAMESPACE == trt_plugins.DOMAIN
    assert strings["kPluginVersion"] == trt_plugins.PLUGIN_VERSION
    for op, spec in trt_plugins.PLUGINS.items():
        assert strings[f"k{op}Name"] == spec.plugin_name
        assert lists[f"k{op}Fields"] == [name for name, _ in spec.fields]
    # the core's field types (field_specs in the .cpp) match the Python kinds
    cpp = (TRT_DIR / "edgekit_trt_core.cpp").read_text()
    for _op, spec in trt_plugins.PLUGINS.items():
        for name, kind in spec.fields:
            want = "kINT32" if kind == "INT" else "kFLOAT32"
            assert re.search(rf'\{{"{name}", FieldType::{want}\}}', cpp), (name, want)
    # plugin names collide with no ONNX op (TENSORRT.md rule 1)
    onnx_ops = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    assert not {s.plugin_name for s in trt_plugins.PLUGINS.values()} & onnx_ops


def test_wrappers_reference_the_core_identity():
    """The wrappers cannot be compiled here (no TensorRT headers); this only checks they use the shared identity
    and implement the entry points TensorRT looks for."""
    v3 = (TRT_DIR / "edgekit_trt_plugins_v3.cpp").read_text()
    v2 = (TRT_DIR / "edgekit_trt_plugins_v2.cpp").read_text()
    reg = (TRT_DIR / "edgekit_trt_register.cpp").read_text()
    for name in ("getCapabilityInterface", "getFieldsToSerialize", "attachToContext", "getOutputShapes",
                 "supportsFormatCombination", "createPlugin", "TensorRTPhase::kRUNTIME", "return kPluginVersion;",
                 "return kPluginNamespace;"):
        assert name in v3, name
    for name in ("IPluginV2DynamicExt", "deserializePlugin", "getOutputDimensions", "NV_TENSORRT_MAJOR < 10"):
        assert name in v2, name
    for name in ("getCreators(int32_t& nbCreators)", "getPluginCreators(int32_t& nbCreators)", "setLoggerFinder",
                 "registerCreator(*list[i], kPluginNamespace)"):
        assert name in reg, name
    for path in TRT_DIR.iterdir():
        if path.suffix in (".h", ".cpp", ".cu", ".py", ".txt", ".md"):
            assert len(path.read_text().splitlines()) <= 800, path


# ---- compile and run the core ----


@needs_gxx
def test_core_cpu_unit_test_binary(tmp_path):
    exe = tmp_path / "test_core"
    cmd = ["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
           str(TRT_DIR / "test_core.cpp"), str(TRT_DIR / "edgekit_trt_core.cpp")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("OK ") and int(proc.stdout.split()[1]) > 150


@needs_nvcc
def test_core_cuda_part_compiles_for_every_target(tmp_path):
    supported = build.supported_archs()
    archs = [a for a in ("sm_75", "sm_87", "sm_89", "sm_90") if a in supported]
    assert {"sm_87", "sm_89", "sm_90"} <= set(archs)
    cmd = [build.find_nvcc(), "-O3", "-std=c++17", "-c", "-o", str(tmp_path / "enqueue.o"),
           str(TRT_DIR / "edgekit_trt_enqueue.cu")]
    for arch in archs:  # one call, SASS for each (ptxas runs per arch)
        num = arch.removeprefix("sm_")
        cmd[1:1] = ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_nvcc
def test_core_links_with_all_three_kernel_sources(tmp_path):
    """One shared library holds the three kernel sources (each defines edgekit_cuda_error_string, renamed per
    source as CMakeLists.txt does), the enqueue code, the core and the C shim, with nothing undefined of ours."""
    nvcc = build.find_nvcc()
    objs = []
    for stem in ("matmul_lowbit", "matmul_sparse24", "attention_int8"):
        objs.append(tmp_path / f"{stem}.o")
        subprocess.run([nvcc, "-O1", "-std=c++17", "-arch=sm_87", "-Xcompiler", "-fPIC",
                        f"-Dedgekit_cuda_error_string=edgekit_cuda_error_string_{stem}", "-c",
                        str(build.SOURCES[stem]), "-o", str(objs[-1])], check=True, capture_output=True)
    for src in ("edgekit_trt_enqueue.cu", "edgekit_trt_core.cpp", "edgekit_trt_shim.cpp"):
        objs.append(tmp_path / f"{src}.o")
        subprocess.run([nvcc, "-O1", "-std=c++17", "-arch=sm_87", "-Xcompiler", "-fPIC", "-c", str(TRT_DIR / src),
                        "-o", str(objs[-1])], check=True, capture_output=True)
    lib = tmp_path / "libedgekit_trt_core.so"
    proc = subprocess.run([nvcc, "-shared", "-arch=sm_87", *map(str, objs), "-o", str(lib), "-lcudart",
                           "-Xlinker", "--no-undefined"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for sym in ("edgekit_trt_core_run", "edgekit_trt_core_state", "edgekit_matmul_lowbit_f32",
                "edgekit_matmul_sparse24_f16", "edgekit_attention_int8_d64"):
        assert re.search(rf" T {sym}$", nm, re.M), sym
