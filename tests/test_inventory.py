from edgekit.export.onnx import describe, name_weighted_nodes
from edgekit.inventory import layer_inventory
from tests.onnx_graphs import conv_net


def test_inventory_kinds_params_and_macs():
    layers = layer_inventory(conv_net())
    assert [l.name for l in layers] == ["n0", "n1", "n2", "n3"]
    assert [l.kind for l in layers] == ["conv", "depthwise_conv", "linear", "linear"]
    assert [l.params for l in layers] == [8 * 3 * 9 + 8, 8 * 9, 4 * 8 + 4, 4 * 5]
    # stem: every output pixel (8x8) of 8 channels reads 3x3x3 inputs
    assert layers[0].macs == 8 * 3 * 9 * 64
    assert layers[1].macs == 8 * 9 * 64
    assert layers[2].macs == 32 and layers[3].macs == 20


def test_weighted_nodes_are_named_after_their_weights(tmp_path):
    model = conv_net()
    assert name_weighted_nodes(model) == 4
    assert [l.name for l in layer_inventory(model)] == ["stem", "dw", "fc", "head"]
    assert name_weighted_nodes(model) == 0  # idempotent


def test_describe_reads_the_interface(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(conv_net(), str(path))
    art = describe(path)
    assert [t.name for t in art.inputs] == ["input"]
    assert art.inputs[0].shape == ("batch", 3, 8, 8)
    assert art.outputs[0].shape == ("batch", 5)
    assert len(art.sha256) == 64 and art.size == path.stat().st_size
