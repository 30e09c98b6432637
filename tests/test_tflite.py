"""TFLite export (litert-torch, PT2E int8, ai-edge-quantizer weights), LiteRtRuntime's quantized I/O, run_artifact.

Tiny models convert in about a second each; the artifacts are shared per module. EfficientNet-Lite0 against ONNX
Runtime's INT8 is the e2e test at the end (benchmarks/tflite_vs_ort.py).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

import torch  # noqa: E402

from edgekit.context import Context  # noqa: E402
from edgekit.data import Dataset  # noqa: E402
from edgekit.errors import ConfigError, ExportError, UnsupportedOnTarget  # noqa: E402
from edgekit.export import tflite  # noqa: E402
from edgekit.export.tflite import Scheme, export_tflite, scheme_for  # noqa: E402
from edgekit.iospec import TensorSpec  # noqa: E402
from edgekit.plan import LayerChoice, Plan  # noqa: E402
from edgekit.verify import mean_cosine, sqnr_db  # noqa: E402

LAYERS = ("conv", "dw", "pw", "fc1", "fc2")
SPEC = (TensorSpec("image", ("batch", 3, 16, 16)),)


class Net(torch.nn.Module):
    """Conv+BN+ReLU6, a padded depthwise conv on a residual branch, a pointwise conv, and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.pad = torch.nn.ZeroPad2d(1)
        self.dw = torch.nn.Conv2d(16, 16, 3, groups=16)
        self.pw = torch.nn.Conv2d(16, 32, 1)
        self.fc1 = torch.nn.Linear(32, 512)
        self.fc2 = torch.nn.Linear(512, 10)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.bn(self.conv(x)))
        x = x + torch.relu(self.dw(self.pad(x)))
        x = torch.relu(self.pw(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def plan(**options: str) -> Plan:
    return Plan("sha", "cpu-arm64", "int8", tuple(LayerChoice(n, options.get(n, "w8a8")) for n in LAYERS))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    calib = Dataset("calib", {"image": rng.normal(size=(32, 3, 16, 16)).astype(np.float32)}, None, "random")
    evald = Dataset("eval", {"image": rng.normal(size=(24, 3, 16, 16)).astype(np.float32)}, None, "random")
    return calib, evald


@pytest.fixture(scope="module")
def reference(net, data):
    with torch.no_grad():
        return net(torch.from_numpy(data[1].inputs["image"])).numpy()


@pytest.fixture(scope="module")
def artifacts(net, data, tmp_path_factory):
    """fp32, uniform int8, and mixed (dw float, fc1 blockwise int4, fc2 weight-only int4, pw dynamic int4)."""
    out = tmp_path_factory.mktemp("tflite")
    calib = data[0]
    return {
        "fp32": export_tflite(net, SPEC, ("logits",), out / "fp32.tflite"),
        "int8": export_tflite(net, SPEC, ("logits",), out / "int8.tflite", plan=plan(), calib=calib),
        "mixed": export_tflite(net, SPEC, ("logits",), out / "mixed.tflite", calib=calib,
                               plan=plan(dw="fp32", fc1="w4g32s", fc2="w4g128", pw="w4a8")),
    }


def run(artifact, x: np.ndarray) -> np.ndarray:
    from edgekit.agent.backends import LiteRtRuntime

    return LiteRtRuntime(artifact.path).run({"image": x})["logits"]


def ops(artifact) -> list[tuple[str, list[str]]]:
    """(op name, dtypes of its non-empty inputs) per op, in graph order."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(artifact.path))
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    return [(op["op_name"], [dtypes[i] for i in op["inputs"] if i >= 0]) for op in it._get_ops_details()]


def weight_types(artifact) -> dict[str, str]:
    """Per FULLY_CONNECTED/CONV op (by position: fc0, conv1, ...): the type of the weight it reads, looking through
    a DEQUANTIZE (weight-only) to the stored tensor."""
    from ai_edge_litert.schema_py_generated import TensorType
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    names = {v: k for k, v in vars(TensorType).items() if not k.startswith("_")}
    model = fbu.read_model(str(artifact.path))
    sg = model.subgraphs[0]
    producer = {o: op for op in sg.operators for o in op.outputs}
    out = {}
    for op in sg.operators:
        name = fbu.opcode_to_name(model, op.opcodeIndex)
        if name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            w = op.inputs[1]
            src = producer.get(w)
            if src is not None and fbu.opcode_to_name(model, src.opcodeIndex) == "DEQUANTIZE":
                w = src.inputs[0]
            out[f"{name}{len(out)}"] = names[sg.tensors[w].type]
    return out


# ------------------------------------------------------------------------------------------------ fp32
def test_fp32_matches_torch_and_is_described(artifacts, data, reference):
    art = artifacts["fp32"]
    assert (art.format, art.runtime) == ("tflite", "tflite")
    assert [s.name for s in art.inputs] == ["image"] and [s.name for s in art.outputs] == ["logits"]
    assert art.inputs[0].dtype == "float32" and art.inputs[0].shape == (1, 3, 16, 16)
    assert len(art.sha256) == 64 and art.size == art.path.stat().st_size
    np.testing.assert_allclose(run(art, data[1].inputs["image"]), reference, rtol=1e-4, atol=1e-5)
    assert {dt for _, dts in ops(art) for dt in dts} <= {"float32", "int32"}


# ------------------------------------------------------------------------------------------------ int8
def test_int8_is_integer_end_to_end_and_close_to_torch(artifacts, data, reference):
    art = artifacts["int8"]
    out = run(art, data[1].inputs["image"])
    assert out.dtype == np.float32
    assert sqnr_db(reference, out) > 35.0, sqnr_db(reference, out)
    assert mean_cosine(reference, out) > 0.998
    assert art.size < 0.5 * artifacts["fp32"].size  # names and int32 biases weigh more in a tiny model
    graph = ops(art)
    # float in and out (strict QDQ quantizes inside the model); in between, integer only: ReLU/ReLU6 fused into
    # their convolutions, the symmetric pad folded into the depthwise conv, no float islands
    assert graph[0] == ("QUANTIZE", ["float32"]) and graph[-1][0] == "DEQUANTIZE", graph
    assert {name for name, _ in graph[1:-1]} <= {"TRANSPOSE", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN",
                                                "FULLY_CONNECTED"}, graph
    for name, dtypes in graph[1:-1]:
        assert set(dtypes) <= {"int8", "int32"}, (name, dtypes)
    assert (art.inputs[0].dtype, art.outputs[0].dtype) == ("float32", "float32")


def test_bias_correction_removes_the_mean_output_shift():
    layer = torch.nn.Linear(64, 8)
    torch.manual_seed(1)
    x = torch.randn(256, 64) + 0.5  # a non-zero input mean is what makes the shift
    calib = Dataset("c", {"x": x.numpy()}, None, "random")
    corrected = tflite.bias_correct(torch.nn.Sequential(layer), ["0"], calib, ["x"], Context())[0]
    scale = layer.weight.abs().amax(1, keepdim=True) / 127
    w_q = torch.round(layer.weight / scale) * scale
    with torch.no_grad():
        want = layer(x).mean(0)
        before = torch.nn.functional.linear(x, w_q, layer.bias).mean(0)
        after = torch.nn.functional.linear(x, w_q, corrected.bias).mean(0)
    assert (before - want).abs().max() > 1e-3
    assert (after - want).abs().max() < 1e-5


def test_symmetric_pads_fold_into_convs_exactly_and_asymmetric_ones_stay():
    model = torch.nn.Sequential(torch.nn.ZeroPad2d(2), torch.nn.Conv2d(3, 4, 5), torch.nn.ZeroPad2d((0, 1, 0, 1)),
                                torch.nn.Conv2d(4, 4, 3, stride=2))
    x = torch.randn(1, 3, 12, 12)
    gm = torch.export.export(model, (x,)).module()
    want = gm(x)
    assert tflite._fold_symmetric_pads(gm) == 1
    torch.testing.assert_close(gm(x), want, rtol=0, atol=0)
    assert sum(n.target is torch.ops.aten.pad.default for n in gm.graph.nodes) == 1


# ------------------------------------------------------------------------------------------------ per-layer plans
def test_plan_fp32_layer_stays_float_and_4bit_weights_shrink_the_file(artifacts, data, reference):
    art = artifacts["mixed"]
    graph = ops(art)
    dw = [dtypes for name, dtypes in graph if name == "DEPTHWISE_CONV_2D"]
    assert dw == [["float32", "float32", "float32"]]  # the plan's fp32 layer: float input, weight and bias
    conv = [dtypes for name, dtypes in graph if name == "CONV_2D"]
    assert conv[0][:2] == ["int8", "int8"]  # "conv" stays static int8
    types = weight_types(art)
    assert list(types.values()) == ["INT8", "FLOAT32", "INT4", "INT4", "INT4"], types  # conv dw pw fc1 fc2
    assert "DEQUANTIZE" in {name for name, _ in graph}  # fc2: weight-only, dequantized in the graph
    assert art.size < 0.35 * artifacts["fp32"].size
    out = run(art, data[1].inputs["image"])
    assert mean_cosine(reference, out) > 0.99 and sqnr_db(reference, out) > 15.0, sqnr_db(reference, out)


@pytest.mark.parametrize(("option", "kind", "want"), [
    ("fp32", "conv", Scheme("float")),
    ("w8a8", "depthwise_conv", Scheme("int8")),
    ("w8a8d", "depthwise_conv", Scheme("dynamic", 8)),
    ("w4a8", "conv", Scheme("dynamic", 4)),
    ("w4g128s", "linear", Scheme("dynamic", 4, 128)),
    ("w4g16s", "linear", Scheme("weight_only", 4)),  # 16 is no block size of ai-edge-quantizer
    ("w4g64", "linear", Scheme("weight_only", 4)),  # asymmetric: per channel, symmetric
    ("w4g32s", "conv", Scheme("weight_only", 4)),
    ("w8g64", "depthwise_conv", Scheme("weight_only", 8)),
])
def test_options_map_to_schemes(option, kind, want):
    assert scheme_for("layer", option, kind, columns=256) == want


def test_blocks_must_divide_the_input_columns():
    assert scheme_for("fc", "w4g64s", "linear", columns=96) == Scheme("weight_only", 4)


@pytest.mark.parametrize(("option", "kind"), [
    ("w2g64", "linear"), ("w3g128s", "linear"), ("sparse2:4+w8a8", "conv"), ("w8a8+ch8", "conv"),
    ("w4g64+r8", "linear"), ("w4g128+e16", "linear"), ("drop", "conv"), ("w4g128", "depthwise_conv"),
    ("w4a8", "depthwise_conv"), ("w8a8", "embedding"),
])
def test_options_tflite_cannot_express_are_refused_by_name(option, kind):
    with pytest.raises(UnsupportedOnTarget, match=f"layer 'blk.1'.*{option.replace('+', '.')}"):
        scheme_for("blk.1", option, kind)


def test_export_refuses_bad_plans_before_converting(net, data, tmp_path):
    out = tmp_path / "m.tflite"
    with pytest.raises(UnsupportedOnTarget, match="'dw'.*'w4g128'"):
        export_tflite(net, SPEC, ("logits",), out, plan=plan(dw="w4g128"), calib=data[0])
    with pytest.raises(UnsupportedOnTarget, match="'fc1'.*'w2g64'"):
        export_tflite(net, SPEC, ("logits",), out, plan=plan(fc1="w2g64"), calib=data[0])
    bad = Plan("sha", "cpu-arm64", "int8", (LayerChoice("nope", "w8a8"),))
    with pytest.raises(ConfigError, match="nope"):
        export_tflite(net, SPEC, ("logits",), out, plan=bad, calib=data[0])
    with pytest.raises(ConfigError, match="calibration"):
        export_tflite(net, SPEC, ("logits",), out, plan=plan())
    assert list(tmp_path.iterdir()) == []


def test_a_failed_conversion_leaves_no_file(net, data, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(tflite, "_finish", boom)
    with pytest.raises(ExportError, match="converter exploded"):
        export_tflite(net, SPEC, ("logits",), tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["litert_torch", "ai_edge_quantizer"])
def test_missing_packages_raise_export_error_with_the_install_hint(net, data, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ExportError, match=package) as info:
        export_tflite(net, SPEC, ("logits",), tmp_path / "m.tflite", plan=plan(fc2="w4g128"), calib=data[0])
    assert info.value.hint == "pip install 'edgekit[tflite]'"


# ------------------------------------------------------------------------------------------------ runtime, verify
@pytest.fixture(scope="module")
def quantized_io(net, data, tmp_path_factory):
    """A .tflite with int8 input and output tensors, as litert-torch's own PT2E recipe (not strict) writes it."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    xs = torch.from_numpy(data[0].inputs["image"])
    path = tmp_path_factory.mktemp("qio") / "qio.tflite"
    with tflite._quiet():
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(torch.export.export(net, (xs[:1],)).module(), quantizer)
        for i in range(len(xs)):
            prepared(xs[i : i + 1])
        edge = litert_torch.convert(convert_pt2e(prepared, fold_quantize=False), (xs[:1],),
                                    quant_config=QuantConfig(pt2e_quantizer=quantizer))
        edge.export(str(path))
    return path


def test_litert_runtime_feeds_floats_to_quantized_inputs(quantized_io, data, reference):
    from edgekit.agent.backends import LiteRtRuntime
    from edgekit.export.tflite import describe_tflite

    rt = LiteRtRuntime(quantized_io)
    d = rt._in[0]
    assert d["dtype"] == np.int8 and d["quantization"][0] > 0 and rt._out[0]["dtype"] == np.int8
    x = data[1].inputs["image"]
    batch = rt.run({rt.input_names[0]: x})[rt.output_names[0]]  # resized to 24
    single = np.concatenate([rt.run({rt.input_names[0]: x[i : i + 1]})[rt.output_names[0]] for i in range(len(x))])
    np.testing.assert_array_equal(batch, single)
    assert batch.dtype == np.float32 and batch.shape == reference.shape
    assert sqnr_db(reference, batch) > 30.0, sqnr_db(reference, batch)  # wrong (scale, zero point) give noise
    art = describe_tflite(quantized_io)
    assert (art.inputs[0].dtype, art.outputs[0].dtype) == ("float32", "float32")
    # quantization as TFLite's QUANTIZE: round half away from zero, then clip to the type's range
    scale, zp = d["quantization"]
    probe = np.array([0.5 * scale, -0.5 * scale, 1e6, -1e6], np.float32)
    np.testing.assert_array_equal(rt._feed(d, probe), [1 + zp, -1 + zp, 127, -128])
    np.testing.assert_array_equal(rt._feed(d, np.array([3], np.int8)), [3])  # integer feeds are taken as quantized


def test_run_artifact_runs_tflite_in_litert(artifacts, data, reference):
    from edgekit.verify import run_artifact

    out = run_artifact(artifacts["int8"], data[1], Context())
    assert list(out) == ["logits"]
    np.testing.assert_array_equal(out["logits"], run(artifacts["int8"], data[1].inputs["image"]))
    assert sqnr_db(reference, out["logits"]) > 25.0


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.e2e
def test_efficientnet_int8_tflite_meets_size_and_agreement_goals(tmp_path):
    from tests.bench_scripts import load_benchmark

    bench = load_benchmark("tflite_vs_ort")
    res = bench.run(tmp_path, calib_n=64, eval_n=128, rounds=1, per_round=2)
    assert all(c["passed"] for c in res["checks"].values()), res["checks"]
    assert res["variants"]["tflite-fp32"]["top1_agreement"] >= 0.99
