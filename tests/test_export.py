"""The ONNX exporter: dynamo first, the legacy exporter as a logged fallback, a clear error when both fail."""

import logging

import numpy as np
import pytest

from edgekit.context import Context
from edgekit.errors import ExportError
from edgekit.export.onnx import export_onnx
from edgekit.inventory import layer_inventory
from edgekit.model import load_model


@pytest.fixture(scope="module")
def digits_factory(tmp_path_factory):
    return load_model("edgekit.zoo:make_digits_cnn", input_shapes=[(1, 1, 8, 8)],
                      ctx=Context(cache_dir=tmp_path_factory.mktemp("cache")))


def _outputs(model, path, x):
    import onnxruntime as ort
    import torch

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model.module(torch.from_numpy(x)).numpy()
    return got, want


def test_dynamo_export_matches_torch_with_dynamic_batch(digits_factory, tmp_path):
    art = export_onnx(digits_factory, tmp_path / "m.onnx")
    assert art.inputs[0].shape[0] == "batch"
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    got, want = _outputs(digits_factory, art.path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # weighted layers are named after the modules that own them
    assert [layer.name for layer in layer_inventory(art.path)] == ["0", "2", "5", "9", "11"]


def test_falls_back_to_legacy_exporter_with_a_logged_reason(digits_factory, tmp_path, monkeypatch, caplog):
    import torch

    real = torch.onnx.export

    def dynamo_breaks(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    with caplog.at_level(logging.WARNING, logger="edgekit"):
        art = export_onnx(digits_factory, tmp_path / "m.onnx")
    assert "simulated dynamo failure" in caplog.text and "legacy" in caplog.text
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    got, want = _outputs(digits_factory, art.path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_both_exporters_failing_is_an_export_error(digits_factory, tmp_path, monkeypatch):
    import torch

    def broken(*args, **kw):
        raise RuntimeError("nope")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="both exporters"):
        export_onnx(digits_factory, tmp_path / "m.onnx")


def test_export_drops_the_exporters_debug_metadata(digits_factory, tmp_path):
    """The dynamo exporter tags every node with stack traces (this host's paths) and FX text: the exported file has
    none of it, so the same model exports to the same bytes from any checkout, and sizes are what the weights and
    graph need."""
    import onnx

    art = export_onnx(digits_factory, tmp_path / "m.onnx")
    proto = onnx.load(str(art.path))
    assert not [m.key for n in proto.graph.node for m in n.metadata_props]
    data = art.path.read_bytes()
    assert b"site-packages" not in data and b"stack_trace" not in data


def test_strip_export_debug_reaches_subgraphs_and_functions_and_keeps_other_metadata():
    from onnx import TensorProto, helper

    from edgekit.export.onnx import strip_export_debug

    def tagged(op, inputs, outputs, **attrs):
        node = helper.make_node(op, inputs, outputs, **attrs)
        helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": 'File "/home/me/x.py"', "namespace": "a/b",
                                         "pkg.onnxscript.rewriter.rule_name": "r", "owner": "kept"})
        return node

    branch = helper.make_graph([tagged("Identity", ["x"], ["y1"])], "then", [],
                               [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])])
    other = helper.make_graph([tagged("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [tagged("If", ["c"], ["y"], then_branch=branch, else_branch=other), tagged("F", ["y"], ["z"], domain="d")],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    func = helper.make_function("d", "F", ["a"], ["b"], [tagged("Identity", ["a"], ["b"])],
                                [helper.make_opsetid("", 18)])
    proto = helper.make_model(graph, functions=[func], opset_imports=[helper.make_opsetid("", 18),
                                                                      helper.make_opsetid("d", 1)])
    assert strip_export_debug(proto) == 5 * 3  # 3 keys on 5 nodes: If, F, one in each branch, one in the function
    nodes = [proto.graph.node[0], proto.graph.node[1], _branch_node(proto, "then_branch"),
             _branch_node(proto, "else_branch"), proto.functions[0].node[0]]
    assert all([(m.key, m.value) for m in n.metadata_props] == [("owner", "kept")] for n in nodes)
    assert strip_export_debug(proto) == 0


def _branch_node(proto, name):
    attr = next(a for a in proto.graph.node[0].attribute if a.name == name)
    return attr.g.node[0]
