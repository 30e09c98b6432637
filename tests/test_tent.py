"""The gradient tier of test-time adaptation: the ONNX -> torch interpreter against ONNX Runtime (FP32 exactly,
QDQ int8 up to ORT's integer kernels, int4 and blocked DequantizeLinear, MatMulNBits), the per-channel affine it
inserts, and TENT/EATA entropy minimization of those affine parameters on shifted digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgekit.agent_torch.onnx_torch import TorchGraph, UnsupportedOpError  # noqa: E402
from edgekit.agent_torch.tent import TorchRequiredError, adapt_entropy, torch_graph  # noqa: E402
from edgekit.datasets import digits  # noqa: E402
from edgekit.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _prep(images: np.ndarray) -> np.ndarray:
    """digits (N, 8, 8, 1) in [0, 1] -> the model's (N, 1, 8, 8), normalized like the built-in digits models."""
    return ((images - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32).copy()


def _shifted(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Contrast halved and Gaussian noise: a covariate shift that raises the entropy of a digits model."""
    rng = np.random.default_rng(seed)
    return np.clip(0.5 * images + rng.normal(0, 0.1, images.shape), 0, 1).astype(np.float32)


def _ort(model, feeds, **kw) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"], **kw).run(None, feeds)


def _entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(p * np.log(np.maximum(p, 1e-30))).sum(1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def bn_models(tmp_path_factory):
    return _bn_models(tmp_path_factory.mktemp("tent"))


def _train_bn_net(x, y):
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        net.train()
        for _ in range(12):
            order = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = order[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return net.eval()


def _bn_models(folder: Path) -> dict:
    """A small Conv-BN-ReLU digits classifier (trained ~1 s), exported with the dynamo exporter (BatchNorm folded
    into the Convs) and quantized to a QDQ int8 graph as edgekit builds them (ORT static, per-channel int8 weights,
    uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images, labels = digits("train")
    x, y = torch.from_numpy(_prep(images)), torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: more threads only contend (10x slower on a busy 2-core box)
    try:
        net = _train_bn_net(x, y)
    finally:
        torch.set_num_threads(threads)
    fp32_path = folder / "fp32.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(net, (x[:2],), str(fp32_path), dynamo=True, external_data=False, input_names=["input"],
                      output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    fp32 = onnx.load(str(fp32_path))
    assert "BatchNormalization" not in {n.op_type for n in fp32.graph.node}

    calib = _prep(digits("calibration")[0][:64])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"input": item}

    int8_path = folder / "int8.onnx"
    quantize_static(str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    int8 = onnx.load(str(int8_path))
    layers = [{"name": n.name, "tensor": n.output[0], "channels": c}
              for n, c in zip([n for n in fp32.graph.node if n.op_type == "Conv"], (16, 32), strict=True)]
    layers8 = [{"name": n.name, "tensor": n.output[0], "channels": c}
               for n, c in zip([n for n in int8.graph.node if n.op_type == "Conv"], (16, 32), strict=True)]
    return {"fp32": fp32, "int8": int8, "layers": {"fp32": layers, "int8": layers8}}


@pytest.fixture(scope="module")
def eval_digits():
    images, labels = digits("evaluation")
    return images, labels


# ---------------------------------------------------------------------------------------------- interpreter numerics


def test_fp32_graph_matches_onnx_runtime(bn_models, eval_digits):
    x = _prep(eval_digits[0])
    ref = _ort(bn_models["fp32"], {"input": x})[0]
    with torch.no_grad():
        got = TorchGraph(bn_models["fp32"])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_qdq_int8_graph_matches_onnx_runtime_integer_kernels(bn_models, eval_digits):
    x = _prep(eval_digits[0])
    ref = _ort(bn_models["int8"], {"input": x})[0]  # QLinearConv & co. after ORT's QDQ fusion
    graph = TorchGraph(bn_models["int8"])
    with torch.no_grad():
        got = graph(torch.from_numpy(x)).numpy()
    assert _cosine(got, ref) >= 0.999
    per_sample = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert per_sample.min() >= 0.99
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    # weights were dequantized once: no DequantizeLinear of an initializer runs per call
    assert sum(n.op == "DequantizeLinear" for n in graph._nodes) < sum(
        n.op_type == "DequantizeLinear" for n in bn_models["int8"].graph.node)


def test_qdq_fake_quant_passes_a_clipped_straight_through_gradient():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8),
                                                                                              "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "fq", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    xs = np.array([-1.0, 0.26, 3.0, 30.0], np.float32)  # below range, inside, inside, above (255 * 0.1)
    t = torch.from_numpy(xs).requires_grad_()
    out = TorchGraph(model)(t)
    np.testing.assert_allclose(out.detach().numpy(), _ort(model, {"x": xs})[0], atol=1e-6)
    out.sum().backward()
    assert t.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_opset17_graph_of_many_ops_matches_onnx_runtime():
    """Conv variants (asymmetric pads, SAME_UPPER, dilations, groups, depthwise), pools with padding, shape arithmetic
    (Shape/Gather/Unsqueeze/Concat/Reshape), ReduceMean with axes as an attribute, Softmax and friends."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (8, 2, 3, 3)), init("w2b", (8, 1, 3, 3)),
             init("w3", (8, 8, 1, 1)),
             init("fc", (8, 6)), init("fcb", (6,)), init("gw", (6, 4)), init("gb", (4,)),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array([0], np.int64), "zero_idx"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[0, 1, 2, 1], strides=[1, 2]),
        n("Clip", ["c1", "lo", "hi"], ["r1"]),
        n("Conv", ["r1", "w2"], ["c2a"], group=4, auto_pad="SAME_UPPER"),
        n("Conv", ["c2a", "w2b"], ["c2"], group=8, dilations=[2, 1], pads=[2, 1, 2, 1]),
        n("Sigmoid", ["c2"], ["s2"]),
        n("Mul", ["c2", "s2"], ["m2"]),
        n("MaxPool", ["m2"], ["p2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1]),
        n("AveragePool", ["p2"], ["a2"], kernel_shape=[2, 2], pads=[1, 1, 0, 0]),
        n("Conv", ["a2", "w3"], ["c3"]),
        n("Div", ["c3", "three"], ["d3"]),
        n("Sub", ["d3", "c3"], ["e3"]),
        n("GlobalAveragePool", ["e3"], ["g"]),
        n("ReduceMean", ["c3"], ["rm"], axes=[2, 3], keepdims=1),
        n("Add", ["g", "rm"], ["gsum"]),
        n("Shape", ["gsum"], ["shp"]),
        n("Gather", ["shp", "zero_idx"], ["batch"], axis=0),
        n("Concat", ["batch", "minus1"], ["newshape"], axis=0),
        n("Reshape", ["gsum", "newshape"], ["flat"]),
        n("Gemm", ["flat", "fc", "fcb"], ["h"], alpha=0.5, beta=2.0),
        n("Relu", ["h"], ["hr"]),
        n("Unsqueeze", ["hr", "one_axis"], ["hu"]),
        n("Transpose", ["hu"], ["ht"], perm=[0, 2, 1]),
        n("Flatten", ["ht"], ["hf"], axis=-2),
        n("MatMul", ["hf", "gw"], ["mm"]),
        n("Add", ["mm", "gb"], ["logits_raw"]),
        n("Softmax", ["logits_raw"], ["probs"], axis=-1),
        n("Identity", ["logits_raw"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 11, 13])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    x = rng.normal(size=(3, 3, 11, 13)).astype(np.float32)
    ref = _ort(model, {"x": x})
    with torch.no_grad():
        got = TorchGraph(model)(torch.from_numpy(x))
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-5, rtol=1e-4)


def test_int4_and_blocked_dequantize_match_onnx_runtime():
    """Opset 21: a Conv whose int4 weight is dequantized per output channel, a MatMul whose uint8 weight is
    dequantized in blocks of 4 along K."""
    rng = np.random.default_rng(1)
    w4 = rng.integers(-8, 8, (6, 2, 3, 3)).astype(np.int8)
    w4_init = helper.make_tensor("w4", TensorProto.INT4, w4.shape, w4.reshape(-1).tolist())
    wb = rng.integers(0, 256, (12, 5)).astype(np.uint8)
    inits = [w4_init, numpy_helper.from_array(rng.uniform(0.01, 0.05, 6).astype(np.float32), "w4_s"),
             numpy_helper.from_array(wb, "wb"),
             numpy_helper.from_array(rng.uniform(0.001, 0.01, (3, 5)).astype(np.float32), "wb_s"),
             numpy_helper.from_array(rng.integers(100, 150, (3, 5)).astype(np.uint8), "wb_z")]
    n = helper.make_node
    nodes = [n("DequantizeLinear", ["w4", "w4_s"], ["w"], axis=0),
             n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             n("GlobalAveragePool", ["c"], ["g"]),
             n("Flatten", ["g"], ["f"]),
             n("Concat", ["f", "f"], ["ff"], axis=1),
             n("DequantizeLinear", ["wb", "wb_s", "wb_z"], ["wbf"], axis=0, block_size=4),
             n("MatMul", ["ff", "wbf"], ["y"])]
    graph = helper.make_graph(nodes, "q4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    ref = _ort(model, {"x": x})[0]
    with torch.no_grad():
        got = TorchGraph(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (2, True)])
def test_matmulnbits_matches_onnx_runtime(bits, symmetric):
    from edgekit.compress.wquant import rtn
    from edgekit.export.lowbit import apply_weight_only, weight_matrix

    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((72, 96)) * 0.2).astype(np.float32)  # K = 72: the last block of 32 is padded
    w2 = (rng.standard_normal((10, 96)) * 0.2).astype(np.float32)
    b2 = rng.standard_normal(10).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 72])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(a, k) for a, k in ((w1, "W1"), (w2, "W2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inits = {i.name: i for i in model.graph.initializer}
    qs = {nd.name: rtn(weight_matrix(nd, inits), bits, 32, symmetric=symmetric) for nd in nodes if nd.name}
    nbits = apply_weight_only(model, qs, accuracy_level=0)
    assert [nd.op_type for nd in nbits.graph.node].count("MatMulNBits") == 2
    x = rng.standard_normal((5, 72)).astype(np.float32)
    ref = _ort(nbits, {"x": x})[0]
    with torch.no_grad():
        got = TorchGraph(nbits)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_unsupported_ops_are_named():
    n = helper.make_node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([n("Relu", ["x"], ["r"]), n("Einsum", ["r"], ["y"], name="e1",
                                                                             equation="ij->ij")], "g", [x], [y]))
    with pytest.raises(UnsupportedOpError, match=r"Einsum.*'e1'"):
        TorchGraph(model)
    w = numpy_helper.from_array(np.zeros((3, 1, 12), np.uint8), "B")
    s = numpy_helper.from_array(np.ones(3, np.float32), "S")
    three = n("MatMulNBits", ["x", "B", "S"], ["y"], name="q3", domain="com.microsoft", K=3, N=3, bits=3,
              block_size=32)
    model = helper.make_model(helper.make_graph([three], "g", [x], [y], [w, s]))
    with pytest.raises(UnsupportedOpError, match=r"MatMulNBits.*'q3'.*3-bit"):
        TorchGraph(model)


# ---------------------------------------------------------------------------------------------- affine insertion


def test_affine_on_a_tensor_equals_the_graph_edited_with_mul_add(bn_models, eval_digits):
    model = bn_models["fp32"]
    tensor = bn_models["layers"]["fp32"][1]["tensor"]
    x = _prep(eval_digits[0][:32])
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for node in edited.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = "affine_out"
    at = next(k for k, nd in enumerate(edited.graph.node) if tensor in nd.output) + 1
    edited.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                                     numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    edited.graph.node.insert(at, helper.make_node("Mul", [tensor, "two"], ["affine_mul"]))
    edited.graph.node.insert(at + 1, helper.make_node("Add", ["affine_mul", "one"], ["affine_out"]))
    ref = _ort(edited, {"input": x})[0]

    scale, shift = torch.full((32,), 2.0), torch.full((32,), 1.0)
    graph = TorchGraph(model, affine={tensor: (scale, shift)})
    with torch.no_grad():
        got = graph(torch.from_numpy(x)).numpy()
        plain = TorchGraph(model).run({"input": x}, outputs=[tensor])[tensor]
        seen = graph.run({"input": x}, outputs=[tensor])[tensor]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(got - _ort(model, {"input": x})[0]).max() > 0.1  # it did change something
    torch.testing.assert_close(seen, 2 * plain + 1)  # consumers (and callers) see the corrected tensor
    with pytest.raises(KeyError, match="not computed"):
        graph.run({"input": x}, affine={"no_such_tensor": (scale, shift)})


def test_affine_gradients_reach_scale_and_shift_through_qdq(bn_models, eval_digits):
    layer = bn_models["layers"]["int8"][0]
    scale = torch.ones(layer["channels"], requires_grad=True)
    shift = torch.zeros(layer["channels"], requires_grad=True)
    out = TorchGraph(bn_models["int8"])(torch.from_numpy(_prep(eval_digits[0][:16])),
                                       affine={layer["tensor"]: (scale, shift)})
    torch.log_softmax(out, -1)[:, 0].sum().backward()
    assert scale.grad.abs().sum() > 0 and shift.grad.abs().sum() > 0
    assert torch.isfinite(scale.grad).all() and torch.isfinite(shift.grad).all()


# ---------------------------------------------------------------------------------------------- TENT / EATA


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("method", ["tent", "eata"])
def test_entropy_minimization_lowers_entropy_on_shifted_digits(bn_models, eval_digits, precision, method):
    model, layers = bn_models[precision], bn_models["layers"][precision]
    x = _prep(_shifted(eval_digits[0][:128]))
    before = _entropy(_ort(model, {"input": x})[0]).mean()
    scale, shift, info = adapt_entropy(model, layers, {}, {}, x, method=method, lr=1e-2, steps=5)
    assert set(scale) == set(shift) == {la["tensor"] for la in layers}
    for la in layers:
        assert scale[la["tensor"]].shape == (la["channels"],) and scale[la["tensor"]].dtype == np.float32
        assert np.isfinite(scale[la["tensor"]]).all() and np.isfinite(shift[la["tensor"]]).all()
    assert info["steps"] == 5 and np.isfinite(info["loss"])
    assert info["entropy_before"] == pytest.approx(before, rel=0.05, abs=0.01)
    assert info["entropy_after"] < 0.95 * info["entropy_before"]
    if method == "tent":
        assert info["selected"] == len(x)
    # the returned parameters, applied again, give finite logits with the lower entropy
    affine = {t: (torch.from_numpy(scale[t]), torch.from_numpy(shift[t])) for t in scale}
    with torch.no_grad():
        logits = torch_graph(model).run({"input": x}, affine=affine)["logits"].numpy()
    assert np.isfinite(logits).all()
    assert _entropy(logits).mean() == pytest.approx(info["entropy_after"], rel=1e-4)


def test_eata_uses_only_confident_samples_and_continues_from_given_values(bn_models, eval_digits):
    model, layers = bn_models["fp32"], bn_models["layers"]["fp32"]
    clean = _prep(eval_digits[0][:48])
    noise = np.random.default_rng(3).uniform(-1, 1, (48, 1, 8, 8)).astype(np.float32) * 0.3
    x = np.concatenate([clean, noise])
    entropy = _entropy(_ort(model, {"input": x})[0])
    margin = 0.4 * np.log(10)
    assert 0 < (entropy < margin).sum() < len(x)
    _, _, info = adapt_entropy(model, layers, {}, {}, x, method="eata", lr=1e-3)
    assert info["selected"] == int((entropy < margin).sum()) < len(x)
    assert info["e_margin"] == pytest.approx(margin)
    assert info["probs_mean"].shape == (10,)
    # nothing reliable: no step, the given values come back unchanged (keyed by the Conv name here)
    start_s = {la["name"]: np.full(la["channels"], 1.5, np.float32) for la in layers}
    start_t = {la["name"]: np.full(la["channels"], 0.25, np.float32) for la in layers}
    scale, shift, info = adapt_entropy(model, layers, start_s, start_t, x, method="eata", e_margin=0.0, key="name")
    assert info["selected"] == 0 and info["steps"] == 0
    for k in start_s:
        np.testing.assert_array_equal(scale[k], start_s[k])
        np.testing.assert_array_equal(shift[k], start_t[k])
    # the redundancy filter drops samples whose softmax is like the running mean
    _, _, info = adapt_entropy(model, layers, {}, {}, clean, method="eata", d_margin=0.5,
                               probs_mean=np.eye(10, dtype=np.float32)[int(np.bincount(
                                   _ort(model, {"input": clean})[0].argmax(1)).argmax())])
    reliable = int((_entropy(_ort(model, {"input": clean})[0]) < margin).sum())
    assert 0 < info["selected"] < reliable


def test_adapt_entropy_caches_the_graph_and_checks_its_arguments(bn_models):
    model, layers = bn_models["fp32"], bn_models["layers"]["fp32"]
    assert torch_graph(model) is torch_graph(model.SerializeToString())
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(ConfigError, match="method"):
        adapt_entropy(model, layers, {}, {}, x, method="sgd")
    with pytest.raises(ConfigError, match="not computed"):
        adapt_entropy(model, [{"tensor": "nope", "channels": 3}], {}, {}, x)
    with pytest.raises(ConfigError, match="channels"):
        adapt_entropy(model, layers, {layers[0]["tensor"]: np.ones(3)}, {}, x)
    with pytest.raises(ConfigError, match="no input"):
        adapt_entropy(model, layers, {}, {}, x, input_name="image")


def test_tent_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgekit.agent, edgekit.agent_torch.tent as t\n"
            "try:\n"
            "    t.adapt_entropy(b'', [], {}, {}, None)\n"
            "except t.TorchRequiredError as e:\n"
            "    from edgekit.errors import ConfigError\n"
            "    assert isinstance(e, ImportError) and isinstance(e, ConfigError) and 'torch' in str(e)\n"
            "    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert TorchRequiredError.__mro__.index(ConfigError) < TorchRequiredError.__mro__.index(ImportError)


# ---------------------------------------------------------------------------------------------- real artifacts


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_built_digits_artifacts_match_onnx_runtime(run_cli, tmp_path, eval_digits, precision):
    run_cli("build", "--model", "builtin:digits-cnn", "--precision", precision, "--out", tmp_path, "--json",
            "--no-latency")
    model = onnx.load(str(tmp_path / "digits-cnn" / "model.onnx"))
    x = _prep(eval_digits[0])
    ref = _ort(model, {"input": x})[0]
    with torch.no_grad():
        got = TorchGraph(model)(torch.from_numpy(x)).numpy()
    if precision == "fp32":
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    else:
        assert _cosine(got, ref) >= 0.999
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert (got.argmax(1) == eval_digits[1]).mean() > 0.9
