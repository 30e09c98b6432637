"""Cost model (bytes exact, latency measured or roofline) and the per-layer hardware probe."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgekit.agent.runtime import OrtRuntime
from edgekit.compress.quant import W8A8Config, quantize_w8a8
from edgekit.cost import (
    HardwareTable,
    LayerGeometry,
    cost_table,
    hardware_table_path,
    layer_bytes,
    layer_geometry,
    layer_signature,
    roofline_ms,
)
from edgekit.data import Dataset
from edgekit.errors import ConfigError
from edgekit.inventory import LayerInfo, layer_inventory
from edgekit.plan import LayerChoice, Plan
from edgekit.probe import (
    LAYOUT_OPS,
    ProfiledUnit,
    integer_io,
    kernel_ms,
    one_layer_model,
    probe,
    quantize_unit,
    write_hardware_table,
)
from edgekit.targets import load_target

OPTIONS = ["fp32", "w8a8"]


@pytest.fixture(scope="module")
def profile():
    return load_target("cpu-x86")


def _quantized(fp32_path, out, config):
    layers = layer_inventory(fp32_path)
    plan = Plan("0" * 64, "cpu-x86", "int8", tuple(LayerChoice(l.name, "w8a8") for l in layers))
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    return quantize_w8a8(fp32_path, out, plan, Dataset(name="r", inputs={"input": x}, labels=None, source="r"), config)


def _initializer_bytes(model, node) -> int:
    """Bytes of every initializer behind a layer's weight and bias (through their DequantizeLinear nodes)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    total = 0
    for name in node.input[1:]:
        src = producer.get(name)
        names = [name] if src is None else [i for i in src.input if i in inits]
        total += sum(inits[n].nbytes for n in names if n in inits)
    return total


# -- bytes ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [True, False])
def test_layer_bytes_match_the_qdq_file(fp32, tmp_path, bias_correction):
    if "bias_correction" not in {f.name for f in dataclasses.fields(W8A8Config)} and not bias_correction:
        pytest.skip("this edgekit has no bias correction switch")
    config = dataclasses.replace(W8A8Config(calib_samples=8), **(
        {"bias_correction": bias_correction} if "bias_correction" in W8A8Config.__dataclass_fields__ else {}))
    q = onnx.load(str(_quantized(fp32, tmp_path / "int8.onnx", config)))
    fp = onnx.load(str(fp32))
    geo = layer_geometry(fp)
    nodes_q = {n.name: n for n in q.graph.node}
    nodes_f = {n.name: n for n in fp.graph.node}
    layers = layer_inventory(fp)
    assert [l.name for l in layers] == ["stem", "dw", "fc", "head"]
    for layer in layers:
        assert layer_bytes(layer, "fp32") == _initializer_bytes(fp, nodes_f[layer.name]), layer.name
        got = layer_bytes(layer, "w8a8", geometry=geo[layer.name], bias_correction=bias_correction)
        assert got == _initializer_bytes(q, nodes_q[layer.name]), layer.name
    # without geometry the exporter's conventions (Gemm transB=1) give the same numbers
    assert [layer_bytes(l, "w8a8", bias_correction=bias_correction) for l in layers] == [
        layer_bytes(l, "w8a8", geometry=geo[l.name], bias_correction=bias_correction) for l in layers]


def test_layer_bytes_formula_and_unknown_option():
    conv = LayerInfo("c", "Conv", "conv", "c.weight", (16, 8, 3, 3), 16 * 8 * 9 + 16, 0)
    assert layer_bytes(conv, "fp32") == 4 * (16 * 72 + 16)
    assert layer_bytes(conv, "w8a8") == 16 * 72 + 16 * (4 + 1) + 16 * 12
    mm = LayerInfo("m", "MatMul", "linear", "m.weight", (32, 10), 320, 320)
    assert layer_bytes(mm, "w8a8") == 320 + 10 * 5  # per output column, never a bias
    # weight-only (MatMulNBits): K=32 in one group of 32 -> 16 packed bytes, a float32 scale and a 4-bit zero point
    # (one byte per row) per output row
    assert layer_bytes(mm, "w4g32") == 10 * 16 + 10 * 4 + 10 * 1
    assert layer_bytes(mm, "w4g32s") == 10 * 16 + 10 * 4
    assert layer_bytes(mm, "w8a8d") == 320 + 10 * 5
    # w4a8: int4 weights two per byte, per channel an fp32 scale and an int4 zero point, the int32 bias as w8a8
    assert layer_bytes(conv, "w4a8") == 16 * 72 // 2 + 16 * 4 + 8 + 16 * 12
    with pytest.raises(ConfigError):
        layer_bytes(conv, "w4a16")


# -- roofline -------------------------------------------------------------------------------------------------------
def _conv(macs, w=(64, 64, 3, 3)):
    return LayerInfo("c", "Conv", "conv", "c.weight", w, int(np.prod(w)) + w[0], macs)


def test_roofline_is_monotonic_and_int8_is_cheaper(profile):
    small, big = _conv(64 * 576 * 28 * 28), _conv(64 * 576 * 56 * 56)
    for opt in OPTIONS:
        assert 0 < roofline_ms(small, opt, profile) < roofline_ms(big, opt, profile)
        assert roofline_ms(big, opt, profile, batch=4) > roofline_ms(big, opt, profile)
    assert profile.hardware.peak_gops["int8"] > profile.hardware.peak_gops["fp32"]
    assert roofline_ms(big, "w8a8", profile) < roofline_ms(big, "fp32", profile)
    # compute-bound: exactly 2·MACs / peak
    assert roofline_ms(big, "fp32", profile) == pytest.approx(2 * big.macs / (profile.hardware.peak_gops["fp32"] * 1e6))


def test_roofline_memory_bound_uses_bandwidth(profile):
    fc = LayerInfo("fc", "Gemm", "linear", "fc.weight", (4096, 4096), 4096 * 4096 + 4096, 4096 * 4096)
    moved = 4 * fc.params + (4096 + 4096) * 4  # fp32 weights + input row + output row
    expected = moved / (profile.hardware.bandwidth_gbs * 1e9) * 1e3
    assert expected > 2 * fc.macs / (profile.hardware.peak_gops["fp32"] * 1e6)  # really memory bound
    assert roofline_ms(fc, "fp32", profile) == pytest.approx(expected)
    int8_moved = layer_bytes(fc, "w8a8") + (4096 + 4096)
    assert roofline_ms(fc, "w8a8", profile) == pytest.approx(int8_moved / (profile.hardware.bandwidth_gbs * 1e6))


def test_roofline_falls_back_to_fp32_peak(profile):
    hw = profile.hardware.model_copy(update={"peak_gops": {"fp32": 100.0}})
    only_fp32 = profile.model_copy(update={"hardware": hw})
    big = _conv(64 * 576 * 56 * 56)
    assert roofline_ms(big, "w8a8", only_fp32) == pytest.approx(2 * big.macs / 100e6)


# -- signatures and the cost table ----------------------------------------------------------------------------------
def test_geometry_and_signatures(fp32):
    geo = layer_geometry(fp32)
    layers = {l.name: l for l in layer_inventory(fp32)}
    assert geo["stem"].input_shape == (3, 8, 8) and geo["stem"].output_shape == (8, 8, 8)
    assert geo["stem"].activation == "Relu" and geo["stem"].reads_graph_input
    assert geo["fc"].activation is None and geo["head"].writes_graph_output
    assert geo["fc"].out_channels == 4 and geo["head"].out_channels == 5
    sigs = {n: layer_signature(layers[n], geo[n]) for n in layers}
    assert sigs["stem"] == "Conv/conv w=8x3x3x3 in=3x8x8 s=1x1 p=1,1,1,1 d=1x1 g=1 b=1 act=Relu"
    assert "g=8" in sigs["dw"] and sigs["dw"].startswith("Conv/depthwise_conv")
    assert len(set(sigs.values())) == 4
    strided = dataclasses.replace(geo["stem"], attrs=tuple((k, (2, 2) if k == "strides" else v)
                                                          for k, v in geo["stem"].attrs))
    assert layer_signature(layers["stem"], strided) != sigs["stem"]
    assert layer_signature(layers["stem"], None) is None


def test_cost_table_prefers_measured_entries(fp32, profile):
    layers, geo = layer_inventory(fp32), layer_geometry(fp32)
    stem = layers[0]
    hw = HardwareTable(entries={layer_signature(stem, geo["stem"]): {"fp32": {"median_ms": 0.5, "runs": 3},
                                                                      "w8a8": {"median_ms": 0.7, "runs": 3}}},
                       meta={"batch": 1}, label="hardware/cpu-x86.json")
    opts = {l.name: OPTIONS for l in layers if l.name != "head"}
    table = cost_table(layers, profile, opts, hardware=hw, geometry=geo)
    assert set(table.entries) == {"stem", "dw", "fc"} and table.target == "cpu-x86"
    assert table.entries["stem"]["fp32"].latency_ms == 0.5 and table.entries["stem"]["w8a8"].latency_ms == 0.7
    assert table.entries["stem"]["w8a8"].source == "measured:hardware/cpu-x86.json"
    for name in ("dw", "fc"):
        for opt in OPTIONS:
            e = table.entries[name][opt]
            assert e.source == "roofline"
            assert e.latency_ms == pytest.approx(roofline_ms(layers[[l.name for l in layers].index(name)], opt,
                                                             profile, geometry=geo[name]))
    assert table.entries["dw"]["w8a8"].bytes == layer_bytes(layers[1], "w8a8", geometry=geo["dw"])
    assert table.entries["stem"]["fp32"].bytes == 4 * stem.params
    # a table measured at another batch size, or no geometry to form signatures: all roofline
    for t in (cost_table(layers, profile, opts, hardware=hw, geometry=geo, batch=8),
              cost_table(layers, profile, opts, hardware=hw), cost_table(layers, profile, opts, hardware=None)):
        assert {e.source for row in t.entries.values() for e in row.values()} == {"roofline"}


# -- hardware tables ------------------------------------------------------------------------------------------------
def test_hardware_table_round_trip_and_missing_file(tmp_path, profile, caplog):
    assert HardwareTable.for_profile(profile, root=tmp_path) is None
    assert hardware_table_path(profile, tmp_path) == tmp_path / "hardware" / "cpu-x86.json"
    assert HardwareTable.for_profile(profile.model_copy(update={"hardware_table": None})) is None
    table = HardwareTable(entries={"Conv/conv w=1": {"fp32": {"median_ms": 1.25, "runs": 10}}},
                          meta={"batch": 1, "cpu": "x"}, layers={"m.onnx": {"a": "Conv/conv w=1"}})
    write_hardware_table(table, tmp_path / "hardware" / "cpu-x86.json", command="edgekit hardware probe")
    back = HardwareTable.for_profile(profile, root=tmp_path)
    assert back is not None and back.label == "hardware/cpu-x86.json"
    assert back.entries == table.entries and back.layers == table.layers
    assert back.meta["command"] == "edgekit hardware probe" and back.latency("Conv/conv w=1", "fp32") == 1.25
    assert back.latency("Conv/conv w=1", "w8a8") is None and back.latency(None, "fp32") is None
    merged = back.merge(HardwareTable(entries={"Conv/conv w=1": {"w8a8": {"median_ms": 0.5, "runs": 1}}}))
    assert set(merged.entries["Conv/conv w=1"]) == {"fp32", "w8a8"}
    (tmp_path / "bad.json").write_text(json.dumps({"version": 99, "entries": {}}))
    with pytest.raises(ConfigError):
        HardwareTable.load(tmp_path / "bad.json")
    # a target with ai.edgekit kernels reading a table probed without them (and the reverse) is warned about
    edgekit_profile = profile.model_copy(update={"custom_op_domains": ["ai.edgekit"]})
    with caplog.at_level("WARNING", logger="edgekit.cost"):
        assert HardwareTable.for_profile(profile, root=tmp_path) is not None
        assert not caplog.records
        assert HardwareTable.for_profile(edgekit_profile, root=tmp_path) is not None
    assert "probed without ai.edgekit kernels" in caplog.text
    with pytest.raises(ConfigError):
        HardwareTable.load(tmp_path / "nothing.json")


# -- the probe ------------------------------------------------------------------------------------------------------
def _intermediates(path, names, x):
    import onnxruntime as ort

    m = onnx.load(str(path))
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


def test_one_layer_models_compute_the_real_layer(fp32, tmp_path):
    import onnxruntime as ort

    model, geo = onnx.load(str(fp32)), layer_geometry(fp32)
    x = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)
    # inputs and outputs of each unit in the full model: (input tensor, output after the fused activation)
    io = {"stem": ("input", "r1"), "dw": ("r1", "r2"), "fc": ("f", "g"), "head": ("g", "logits")}
    acts = _intermediates(fp32, ["r1", "r2", "f", "g"], x) | {"input": x}
    for name, (src, dst) in io.items():
        unit = one_layer_model(model, name, geo[name])
        onnx.checker.check_model(unit)
        assert [n.op_type for n in unit.graph.node][1:] == (["Relu"] if name in ("stem", "dw") else [])
        y = ort.InferenceSession(unit.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": acts[src]})[0]
        np.testing.assert_allclose(y, acts[dst], rtol=1e-5, atol=1e-5, err_msg=name)
    # copies run side by side on the same input; copy 0 is the real layer, and ORT keeps every copy
    for name in ("stem", "fc"):
        unit = one_layer_model(model, name, geo[name], copies=3)
        assert [o.name for o in unit.graph.output] == ["y_0", "y_1", "y_2"]
        ys = ort.InferenceSession(unit.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": acts[io[name][0]]})
        np.testing.assert_allclose(ys[0], acts[io[name][1]], rtol=1e-5, atol=1e-5)
        assert not np.array_equal(ys[0], ys[1])
    # the int8 unit takes and returns uint8 (no boundary Quantize/Dequantize) and runs
    path = tmp_path / "stem.onnx"
    onnx.save(one_layer_model(model, "stem", geo["stem"], copies=3), str(path))
    core, ok = integer_io(onnx.load(str(quantize_unit(path, tmp_path / "stem_q.onnx", (1, 3, 8, 8)))))
    assert ok and core.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.type.tensor_type.elem_type for o in core.graph.output} == {onnx.TensorProto.UINT8}
    sess = ort.InferenceSession(core.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": np.random.default_rng(0).integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)})
    assert len(outs) == 3 and all(o.dtype == np.uint8 and o.shape == (1, 8, 8, 8) for o in outs)
    # ORT runs int8 convolutions in NHWC: the Transposes it adds at the unit's edges are not the layer's time
    onnx.save(core, str(tmp_path / "core.onnx"))
    OrtRuntime(tmp_path / "core.onnx", optimized_model_path=tmp_path / "opt.onnx")
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert optimized.count("QLinearConv") == 3 and "QuantizeLinear" not in optimized
    if any(op in LAYOUT_OPS for op in optimized):
        unit = ProfiledUnit(tmp_path / "core.onnx", threads=1, tmp=tmp_path)
        assert unit.feeds["x"].dtype == np.uint8
        for _ in range(13):
            unit.run({})
        prof = unit.profile(skip=3)
        assert prof[0] > 0 and prof[1]["Transpose"] > 0 and prof[1]["QLinearConv"] > 0
        assert 0 < kernel_ms(prof) < kernel_ms(prof, exclude=()) < prof[0] / 1e3
        assert kernel_ms(prof) == pytest.approx(prof[1]["QLinearConv"] / 1e3)  # three copies' worth


def test_probe_measures_every_layer_and_option(fp32, profile):
    seen = []

    def track(it, description, total=None):
        seen.append((description, total))
        return it

    table = probe(fp32, OPTIONS, rounds=1, per_round=3, threads=1, progress=track)
    layers, geo = layer_inventory(fp32), layer_geometry(fp32)
    assert seen == [("probing fp32.onnx", 4)]
    assert set(table.layers["fp32.onnx"]) == {l.name for l in layers}
    for layer in layers:
        entry = table.entries[layer_signature(layer, geo[layer.name])]
        assert set(entry) == set(OPTIONS)
        for opt in OPTIONS:
            assert entry[opt]["median_ms"] > 0 and entry[opt]["runs"] == 3 * 4  # 4 copies per call
            # the layer's own kernels: per-call overhead and the layout changes at the unit's edges left out
            assert 0 < entry[opt]["median_ms"] < entry[opt]["wall_ms"]
        assert entry["w8a8"]["quantize_in_ms"] > 0 and entry["w8a8"]["dequantize_out_ms"] > 0
    assert table.meta["threads"] == 1 and table.meta["batch"] == 1 and table.meta["onnxruntime"]
    ct = cost_table(layers, profile, {l.name: OPTIONS for l in layers}, hardware=table, geometry=geo)
    assert all(e.source.startswith("measured:") for row in ct.entries.values() for e in row.values())
    # a second probe with the table finds nothing left to measure
    again = probe(fp32, ["fp32"], rounds=1, per_round=3, table=table)
    assert again.entries == table.entries
    with pytest.raises(ConfigError):
        probe(fp32, ["w4a16"])  # not a probe-able option (weight-only is w<bits>g<group>)


def test_geometry_dataclass_is_plain():
    g = LayerGeometry("a", "Gemm", (10, 4), (4,), (10,), (("transB", 0),), False)
    assert g.out_channels == 4 and g.attr("transB") == 0 and g.attr("missing", 7) == 7


def test_cost_and_probe_import_no_torch():
    import subprocess
    import sys

    code = "import sys, edgekit.cost, edgekit.probe; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_probe_for_a_target_with_edgekit_kernels_times_them(fp32, tmp_path, monkeypatch):
    from edgekit.kernels import ort_native
    from edgekit.probe import _weight_only_unit, measure_unit

    if ort_native.library_path() is None:
        pytest.skip("native ai.edgekit library not built")
    model, geo = onnx.load(str(fp32)), layer_geometry(fp32)
    for layer, op in (("dw", "QLinearDepthwiseConv"), ("stem", "QLinearConvDirect")):
        unit = tmp_path / layer
        unit.mkdir()
        out = measure_unit(model, layer, geo[layer], ["w8a8"], unit, rounds=1, per_round=3, threads=1,
                           edgekit_ops=True)
        assert out["w8a8"]["median_ms"] > 0 and out["w8a8"]["quantize_in_ms"] > 0
        nodes = onnx.load(str(unit / "w8a8.onnx")).graph.node
        # each copy runs as the target's op, between the layout changes kernel_ms leaves out; nothing else runs
        assert sorted({(n.domain, n.op_type) for n in nodes}) == [("", "Transpose"), ("ai.edgekit", op)]
        assert sum(n.op_type == op for n in nodes) == 4
    fc = tmp_path / "fc.onnx"
    onnx.save(one_layer_model(model, "fc", geo["fc"]), str(fc))
    low = _weight_only_unit(fc, tmp_path / "fc_w3.onnx", "w3g32", edgekit_ops=True)
    assert [(n.domain, n.op_type) for n in onnx.load(str(low)).graph.node if n.domain] == [("ai.edgekit",
                                                                                              "MatMulLowBit")]
    table = probe(fp32, ["fp32", "w8a8"], rounds=1, per_round=3, threads=1, edgekit_ops=True)
    assert "ai.edgekit" in table.meta["kernels"] and len(table.entries) == len(layer_inventory(fp32))
    plain = probe(fp32, ["fp32"], rounds=1, per_round=3, threads=1)
    assert "kernels" not in plain.meta
    with pytest.raises(ConfigError, match="with ai.edgekit kernels to a table measured without"):
        probe(fp32, ["w8a8"], rounds=1, per_round=3, table=plain, edgekit_ops=True)
    with pytest.raises(ConfigError, match="without ai.edgekit kernels to a table measured with"):
        probe(fp32, ["w8a8"], rounds=1, per_round=3, table=table)
    monkeypatch.setattr(ort_native, "register_native", lambda so: False)
    with pytest.raises(ConfigError, match="native library"):
        ProfiledUnit(unit / "w8a8.onnx", threads=1, tmp=tmp_path, native=True)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe\x00binary", "cannot read hardware table"),
    (b'{"version": 1, "entries": 5}', "'entries' must be a JSON object"),
    (b"[1, 2]", "is a JSON list, not an object"),
])
def test_a_malformed_hardware_table_is_a_config_error(tmp_path, content, match):
    """Found by a CLI sweep: binary data and wrong types gave UnicodeDecodeError / AttributeError."""
    from edgekit.cost import HARDWARE_SCHEMA_VERSION, HardwareTable
    from edgekit.errors import ConfigError

    path = tmp_path / "t.json"
    path.write_bytes(content.replace(b'"version": 1', f'"version": {HARDWARE_SCHEMA_VERSION}'.encode()))
    with pytest.raises(ConfigError, match=match):
        HardwareTable.load(path)
