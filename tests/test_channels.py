"""Structured channel pruning (edgekit.compress.channels): group discovery, exact pruning against the masked
reference, importance, rounding and input validation, on small synthetic graphs and the exported digits CNN."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compress.channels import (
    ChannelGroup,
    channel_groups,
    channel_importance,
    masked_model,
    prune_by_ratio,
    prune_channels,
    round_channels,
)


def _t(name: str, arr) -> onnx.TensorProto:
    arr = np.asarray(arr)
    return numpy_helper.from_array(arr.astype(np.int64 if arr.dtype.kind == "i" else np.float32), name)


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _conv(name, x, out, cin, cout, rng, k=1, pads=0, group=1, bias=True, inits=None):
    inits.append(_t(f"{name}.weight", rng.normal(0, 0.4, (cout, cin // group, k, k))))
    inputs = [x, f"{name}.weight"]
    if bias:
        inits.append(_t(f"{name}.bias", rng.normal(0, 0.5, cout)))
        inputs.append(f"{name}.bias")
    pad = pads if isinstance(pads, list) else [pads] * 4
    return helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[k, k], pads=pad, group=group)


def _clip(x, out):
    return helper.make_node("Clip", [x, "zero", "six"], [out], name=f"clip_{out}")


def mbconv_graph(seed: int = 0) -> onnx.ModelProto:
    """EfficientNet-Lite style: stem, a block with a residual Add, a block without, head, pooling, FC."""
    rng, inits = np.random.default_rng(seed), [_t("zero", 0.0), _t("six", 6.0)]
    nodes = [
        _conv("stem", "input", "s", 3, 8, rng, k=3, pads=1, inits=inits), _clip("s", "sa"),
        _conv("blk1.expand", "sa", "e1", 8, 24, rng, inits=inits), _clip("e1", "e1a"),
        _conv("blk1.dw", "e1a", "d1", 24, 24, rng, k=3, pads=1, group=24, inits=inits), _clip("d1", "d1a"),
        _conv("blk1.project", "d1a", "p1", 24, 8, rng, inits=inits),
        helper.make_node("Add", ["p1", "sa"], ["r1"], name="residual"),
        _conv("blk2.expand", "r1", "e2", 8, 16, rng, inits=inits), _clip("e2", "e2a"),
        _conv("blk2.dw", "e2a", "d2", 16, 16, rng, k=3, pads=[0, 0, 1, 1], group=16, inits=inits),
        _clip("d2", "d2a"),
        _conv("blk2.project", "d2a", "p2", 16, 12, rng, inits=inits),
        _conv("head", "p2", "h", 12, 20, rng, inits=inits), _clip("h", "ha"),
        helper.make_node("ReduceMean", ["ha", "axes"], ["pooled"], name="pool", keepdims=1),
        helper.make_node("Reshape", ["pooled", "flat"], ["flatv"], name="flatten"),
        helper.make_node("Gemm", ["flatv", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits += [_t("axes", np.array([-1, -2])), _t("flat", np.array([-1, 20])),
              _t("fc.weight", rng.normal(0, 0.3, (10, 20))), _t("fc.bias", rng.normal(0, 0.1, 10))]
    return _model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])


def ffn_graph(seed: int = 0, act: str = "gelu", out_bias: bool = True) -> onnx.ModelProto:
    """MiniLM style: an attention-like branch (heads reshape) with a residual, then an FFN with an erf-GELU (or a
    Sigmoid), a residual Add and LayerNormalization."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.normal(0, 0.3, shape)  # noqa: E731
    inits = [_t("wq", w(16, 16)), _t("bq", w(16)), _t("heads", np.array([0, 0, 4, 4])), _t("merge", [0, 0, 16]),
             _t("wo", w(16, 16)), _t("bo", w(16)), _t("w1", w(16, 64)), _t("b1", w(64)), _t("sqrt2", np.sqrt(2.0)),
             _t("one", 1.0), _t("half", 0.5), _t("w2", w(64, 16)), _t("b2", w(16)), _t("ln.scale", 1 + w(16)),
             _t("ln.bias", w(16))]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q"),
        helper.make_node("Add", ["q0", "bq"], ["q1"], name="q_bias"),
        helper.make_node("Reshape", ["q1", "heads"], ["q2"], name="split_heads"),
        helper.make_node("Softmax", ["q2"], ["q3"], name="softmax", axis=-1),
        helper.make_node("Reshape", ["q3", "merge"], ["q4"], name="merge_heads"),
        helper.make_node("MatMul", ["q4", "wo"], ["o0"], name="o"),
        helper.make_node("Add", ["o0", "bo"], ["o1"], name="o_bias"),
        helper.make_node("Add", ["o1", "x"], ["h"], name="attn_residual"),
        helper.make_node("MatMul", ["h", "w1"], ["f0"], name="ffn.in"),
        helper.make_node("Add", ["f0", "b1"], ["f1"], name="ffn.in_bias"),
    ]
    if act == "gelu":
        nodes += [helper.make_node("Div", ["f1", "sqrt2"], ["g0"], name="gelu_div"),
                  helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
                  helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
                  helper.make_node("Mul", ["half", "g2"], ["g3"], name="gelu_half"),
                  helper.make_node("Mul", ["f1", "g3"], ["g"], name="gelu")]
    else:
        nodes.append(helper.make_node("Sigmoid", ["f1"], ["g"], name="sigmoid"))
    nodes.append(helper.make_node("MatMul", ["g", "w2"], ["y0" if out_bias else "y1"], name="ffn.out"))
    if out_bias:
        nodes.append(helper.make_node("Add", ["y0", "b2"], ["y1"], name="ffn.out_bias"))
    else:
        inits = [i for i in inits if i.name != "b2"]
    nodes += [helper.make_node("Add", ["y1", "h"], ["y2"], name="ffn_residual"),
              helper.make_node("LayerNormalization", ["y2", "ln.scale", "ln.bias"], ["out"], name="ln", axis=-1)]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 16])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 5, 16])])


def sigmoid_conv_graph(consumer: str = "valid", seed: int = 0, batch="N") -> onnx.ModelProto:
    """Conv 1x1 -> Sigmoid (a dropped channel becomes 0.5, not 0) -> a consumer without bias: a 3x3 conv without
    padding ("valid"), the same with padding ("padded"), or AveragePool counting its padding, then a 1x1 conv."""
    rng, inits, side = np.random.default_rng(seed), [], 5 if consumer == "valid" else 7
    nodes = [_conv("producer", "input", "a", 4, 12, rng, inits=inits),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid")]
    if consumer == "pool":
        nodes += [helper.make_node("AveragePool", ["s"], ["sp"], name="avg", kernel_shape=[3, 3], pads=[1] * 4,
                                   count_include_pad=1),
                  _conv("consumer", "sp", "out", 12, 6, rng, bias=False, inits=inits)]
    else:
        nodes.append(_conv("consumer", "s", "out", 12, 6, rng, k=3, pads=int(consumer == "padded"), bias=False,
                           inits=inits))
    return _model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 4, 7, 7])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 6, side, side])])


def chain_graph(seed: int = 0, beta: float = 1.0) -> onnx.ModelProto:
    """Two chained groups whose dropped channels are 0.5 (Sigmoid): the middle conv and the Gemm have no bias, so
    folding creates one, and the middle conv's new bias must then lose the rows of its own pruned channels."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [_conv("a", "input", "a0", 3, 10, rng, inits=inits), helper.make_node("Sigmoid", ["a0"], ["a1"]),
             _conv("b", "a1", "b0", 10, 8, rng, bias=False, inits=inits), helper.make_node("Sigmoid", ["b0"], ["b1"]),
             helper.make_node("GlobalAveragePool", ["b1"], ["b2"]), helper.make_node("Flatten", ["b2"], ["b3"]),
             helper.make_node("Gemm", ["b3", "fc.weight"], ["out"], name="fc", alpha=0.7, beta=beta)]
    inits.append(_t("fc.weight", rng.normal(0, 0.5, (8, 5))))
    return _model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 5, 5])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])])


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from edgekit.export.onnx import name_weighted_nodes
    from edgekit.zoo import make_digits_cnn

    torch.manual_seed(0)
    net = make_digits_cnn().eval()
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    torch.onnx.export(net, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=True, external_data=False,
                      input_names=["input"], dynamic_shapes=({0: "batch"},))
    model = onnx.load(str(path))
    name_weighted_nodes(model)
    return model


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def _feed(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    inp = model.graph.input[0]
    shape = [d.dim_value or batch for d in inp.type.tensor_type.shape.dim]
    return {inp.name: np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def _signature(groups: list[ChannelGroup]) -> dict:
    return {g.name: (g.producer, g.passthrough, g.consumers, g.channels) for g in groups}


def test_groups_mbconv_keep_blocks_and_head_but_not_residual_convs():
    groups = channel_groups(mbconv_graph())
    assert _signature(groups) == {
        "blk1.expand": ("blk1.expand", ("blk1.dw",), ("blk1.project",), 24),
        "blk2.expand": ("blk2.expand", ("blk2.dw",), ("blk2.project",), 16),
        "blk2.project": ("blk2.project", (), ("head",), 12),  # no residual: feeds only the head conv
        "head": ("head", (), ("fc",), 20),  # through Clip, ReduceMean and the flattening Reshape
    }  # stem and blk1.project feed the residual Add: not prunable
    assert groups[0].layers == ("blk1.expand", "blk1.dw", "blk1.project")


def test_groups_ffn_only_and_not_attention_heads():
    assert _signature(channel_groups(ffn_graph())) == {"ffn.in": ("ffn.in", (), ("ffn.out",), 64)}
    assert _signature(channel_groups(ffn_graph(act="sigmoid", out_bias=False))) == \
        {"ffn.in": ("ffn.in", (), ("ffn.out",), 64)}


def test_groups_chain_through_global_pool_and_flatten():
    assert _signature(channel_groups(chain_graph())) == {"a": ("a", (), ("b",), 10), "b": ("b", (), ("fc",), 8)}


def test_groups_digits(digits_model):
    assert _signature(channel_groups(digits_model)) == {
        "0": ("0", (), ("2",), 16), "2": ("2", (), ("5",), 32),  # 2 -> ReLU -> MaxPool -> 5
        "5": ("5", (), ("9",), 64), "9": ("9", (), ("11",), 64),
    }


def _half(groups: list[ChannelGroup], seed: int = 1) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    keep = {g.name: np.sort(rng.choice(g.channels, g.channels // 2, replace=False)) for g in groups}
    return keep, {g.name: np.setdiff1d(np.arange(g.channels), keep[g.name]) for g in groups}


@pytest.mark.parametrize("build", ["mbconv", "ffn", "ffn_sigmoid_nobias", "digits", "valid_conv", "chain",
                                   "chain_beta0"])
def test_pruned_model_equals_masked_model(build, digits_model):
    model = {"mbconv": mbconv_graph, "ffn": ffn_graph, "digits": lambda: digits_model,
             "ffn_sigmoid_nobias": lambda: ffn_graph(act="sigmoid", out_bias=False),
             "valid_conv": sigmoid_conv_graph, "chain": chain_graph, "chain_beta0": lambda: chain_graph(beta=0.0),
             }[build]()
    before = model.SerializeToString()
    groups = channel_groups(model)
    keep, drop = _half(groups)
    pruned = prune_channels(model, keep, feeds=[_feed(model, 2, seed=5)])
    onnx.checker.check_model(pruned, full_check=True)
    assert model.SerializeToString() == before  # the input model is left alone
    assert _params(pruned) < _params(model)
    masked = masked_model(model, drop)
    x = _feed(model, 3, seed=9)
    got, want = _run(pruned, x), _run(masked, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - _run(model, x)).max() > 1e-3  # the masking did change the model
    # the weights really shrank: each producer now has half its output channels
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    nodes = {n.name: n for n in pruned.graph.node}
    for g in groups:
        w = shapes[nodes[g.producer].input[1]]
        assert g.channels // 2 in w and g.channels not in w


def test_prune_without_feeds_uses_zero_input():
    model = mbconv_graph(seed=3)
    keep, drop = _half(channel_groups(model), seed=4)
    x = _feed(model, 2, seed=0)
    np.testing.assert_allclose(_run(prune_channels(model, keep), x), _run(masked_model(model, drop), x),
                               rtol=1e-4, atol=1e-5)


def test_padded_consumer_with_nonzero_constant_raises():
    model = sigmoid_conv_graph("padded")  # sigmoid(0) = 0.5 would be wrong at the zero-padded borders
    keep = {"producer": np.arange(6)}
    with pytest.raises(ValueError, match="'producer'.*padded conv 'consumer'"):
        prune_channels(model, keep)
    with pytest.raises(ValueError, match="'producer'.*not constant"):  # average pool counting its zero padding
        prune_channels(sigmoid_conv_graph("pool"), keep)


def test_round_channels():
    assert round_channels(10, 64, 8) == 16
    assert round_channels(16, 64, 8) == 16
    assert round_channels(0, 64, 8) == 8
    assert round_channels(70, 64, 8) == 64
    assert round_channels(3, 4, 8) == 4
    assert round_channels(5, 10, 1) == 5
    with pytest.raises(ValueError, match="multiple"):
        round_channels(4, 10, 0)


def test_importance_ranks_a_channel_with_zero_consumer_weights_lowest():
    model = ffn_graph()
    w2 = next(i for i in model.graph.initializer if i.name == "w2")
    arr = numpy_helper.to_array(w2).copy()
    arr[7] = 0
    w2.CopyFrom(numpy_helper.from_array(arr, "w2"))
    groups = channel_groups(model)
    scores = channel_importance(model, groups, [_feed(model, 4, seed=s) for s in range(2)])
    assert set(scores) == {"ffn.in"} and scores["ffn.in"].shape == (64,)
    assert scores["ffn.in"][7] == 0 and int(np.argmin(scores["ffn.in"])) == 7
    assert (np.delete(scores["ffn.in"], 7) > 0).all()


def test_importance_splits_feeds_for_a_fixed_batch_model():
    model = sigmoid_conv_graph(batch=2)
    groups = channel_groups(model)
    x = np.random.default_rng(0).normal(size=(6, 4, 7, 7)).astype(np.float32)
    whole = channel_importance(model, groups, [{"input": x}])  # run as three batches of 2
    parts = channel_importance(model, groups, [{"input": x[i:i + 2]} for i in range(0, 6, 2)])
    np.testing.assert_allclose(whole["producer"], parts["producer"], rtol=1e-6)
    keep, drop = _half(groups)
    pruned = prune_channels(model, keep, feeds=[{"input": x}])
    np.testing.assert_allclose(_run(pruned, {"input": x[:2]}), _run(masked_model(model, drop), {"input": x[:2]}),
                               rtol=1e-4, atol=1e-5)


def test_bad_input_raises_clear_value_errors():
    model = ffn_graph()
    with pytest.raises(ValueError, match="unknown channel group 'nope'"):
        prune_channels(model, {"nope": np.arange(4)})
    with pytest.raises(ValueError, match="outside"):
        prune_channels(model, {"ffn.in": np.array([0, 64])})
    with pytest.raises(ValueError, match="empty"):
        prune_channels(model, {"ffn.in": np.array([], dtype=np.int64)})
    with pytest.raises(ValueError, match="repeated"):
        prune_channels(model, {"ffn.in": np.array([1, 1, 2])})
    with pytest.raises(ValueError, match="unknown channel group"):
        masked_model(model, {"q": np.arange(2)})  # attention projections are not a prunable group
    with pytest.raises(ValueError, match="calibration"):
        channel_importance(model, channel_groups(model), [])


def test_prune_by_ratio_keeps_the_most_important_channels():
    model = ffn_graph(seed=2)
    groups = channel_groups(model)
    feeds = [_feed(model, 4, seed=1)]
    scores = channel_importance(model, groups, feeds)
    pruned, kept = prune_by_ratio(model, groups, scores, {"ffn.in": 0.3}, multiple=8, feeds=feeds)
    assert kept == {"ffn.in": 24}  # ceil(0.3 * 64) = 20, rounded up to a multiple of 8
    assert {i.name: tuple(i.dims) for i in pruned.graph.initializer}["w1"] == (16, 24)
    top = np.sort(np.argsort(-scores["ffn.in"], kind="stable")[:24])
    drop = {"ffn.in": np.setdiff1d(np.arange(64), top)}
    x = _feed(model, 2, seed=3)
    np.testing.assert_allclose(_run(pruned, x), _run(masked_model(model, drop), x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ratio"):
        prune_by_ratio(model, groups, scores, {"ffn.in": 0.0})
