"""Graph edits (edgekit/compress/graphedit.py): residual-unit removal, low-rank factorization and EoRA compensation,
each checked in ONNX Runtime against a hand-built reference graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compress.graphedit import (
    RemovableUnit,
    add_compensation,
    factorize,
    layer_weight,
    lowrank_factors,
    removable_units,
    remove_units,
)
from edgekit.compress.lowrank import eora, svd_factors

F = TensorProto.FLOAT


def _model(nodes, inputs, output, inits, rank=2) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, F, [None] * rank)],
        [numpy_helper.from_array(v if np.asarray(v).dtype == np.int64 else np.asarray(v, np.float32), k)
         for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, **feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def _close(x, y):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- residual units

def _convnet(drop: frozenset[int] = frozenset()) -> onnx.ModelProto:
    """EfficientNet-style: stem, MBConv blocks 0 (residual), 1 (stride 2, 8->12: no residual), 2 and 3 (residual,
    3 reading 2's sum), head. Blocks in ``drop`` are left out: the reference for removing them."""
    rng = np.random.default_rng(0)
    inits = {"stem.w": rng.normal(0, 0.3, (8, 3, 3, 3)), "clip.min": 0.0, "clip.max": 6.0,
             "head.w": rng.normal(0, 0.3, (5, 12)), "head.b": rng.normal(0, 0.1, 5)}
    nodes = [helper.make_node("Conv", ["x", "stem.w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["s", "clip.min", "clip.max"], ["h0"])]
    cur = "h0"
    for i, (cin, cout, stride) in enumerate([(8, 8, 1), (8, 12, 2), (12, 12, 1), (12, 12, 1)]):
        p, mid = f"_blocks.{i}", 2 * cin
        inits |= {f"{p}.e.w": rng.normal(0, 0.3, (mid, cin, 1, 1)), f"{p}.e.b": rng.normal(0, 0.1, mid),
                  f"{p}.d.w": rng.normal(0, 0.3, (mid, 1, 3, 3)),
                  f"{p}.p.w": rng.normal(0, 0.3, (cout, mid, 1, 1)), f"{p}.p.b": rng.normal(0, 0.1, cout)}
        if i in drop:
            continue
        nodes += [
            helper.make_node("Conv", [cur, f"{p}.e.w", f"{p}.e.b"], [f"{p}.e"], name=f"{p}._expand_conv"),
            helper.make_node("Clip", [f"{p}.e", "clip.min", "clip.max"], [f"{p}.e6"]),
            helper.make_node("Conv", [f"{p}.e6", f"{p}.d.w"], [f"{p}.d"], name=f"{p}._depthwise_conv", group=mid,
                             pads=[1, 1, 1, 1], strides=[stride, stride]),
            helper.make_node("Clip", [f"{p}.d", "clip.min", "clip.max"], [f"{p}.d6"]),
            helper.make_node("Conv", [f"{p}.d6", f"{p}.p.w", f"{p}.p.b"], [f"{p}.p"], name=f"{p}._project_conv")]
        if cin == cout and stride == 1:
            nodes.append(helper.make_node("Add", [f"{p}.p", cur], [f"{p}.out"], name=f"add_{i}"))
            cur = f"{p}.out"
        else:
            cur = f"{p}.p"
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
              helper.make_node("Gemm", ["f", "head.w", "head.b"], ["y"], name="head", transB=1)]
    return _model(nodes, [("x", ["batch", 3, 8, 8])], "y", inits)  # [batch, 5]


_X = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_units_of_an_efficientnet_style_graph_are_found_exactly():
    units = removable_units(_convnet())
    assert [(u.name, u.kind, u.add, u.skip) for u in units] == [
        ("_blocks.0", "residual_block", "add_0", "h0"), ("_blocks.2", "residual_block", "add_2", "_blocks.1.p"),
        ("_blocks.3", "residual_block", "add_3", "_blocks.2.out")]
    assert units[0].layers == ("_blocks.0._expand_conv", "_blocks.0._depthwise_conv", "_blocks.0._project_conv")


@pytest.mark.parametrize("drop", [{0}, {2, 3}, {0, 2, 3}])
def test_removing_conv_blocks_equals_the_graph_without_them(drop):
    model = _convnet()
    before = model.SerializeToString()
    cut = remove_units(model, [f"_blocks.{i}" for i in sorted(drop)])
    assert model.SerializeToString() == before  # the input is not mutated
    onnx.checker.check_model(cut)
    _close(_run(cut, x=_X), _run(_convnet(frozenset(drop)), x=_X))
    names = {n.name for n in cut.graph.node}
    assert not any(n.startswith(f"_blocks.{i}.") for i in drop for n in names)
    assert len(cut.graph.initializer) == len(model.graph.initializer) - 5 * len(drop)  # dead weights are gone
    assert _params(cut) < _params(model)
    assert [u.name for u in removable_units(cut)] == [f"_blocks.{i}" for i in (0, 2, 3) if i not in drop]


def test_unknown_repeated_and_already_removed_units_are_clear_errors():
    model = _convnet()
    with pytest.raises(ValueError, match=r"unknown unit.*'_blocks\.1'.*\['_blocks\.0', '_blocks\.2', '_blocks\.3'\]"):
        remove_units(model, ["_blocks.1"])
    with pytest.raises(ValueError, match="more than once"):
        remove_units(model, ["_blocks.0", "_blocks.0"])
    once = remove_units(model, ["_blocks.0"])
    with pytest.raises(ValueError, match="removed earlier"):
        remove_units(once, ["_blocks.0"])
    assert remove_units(model, []).graph.node == model.graph.node  # nothing to remove: the same graph


def test_a_residual_mlp_whose_sum_is_the_graph_output():
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(0, 0.3, (16, 6)), "w2": rng.normal(0, 0.3, (6, 16))}
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="mlp.fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["o"], name="mlp.fc2", transB=1),
             helper.make_node("Add", ["x", "o"], ["y"], name="res")]
    model = _model(nodes, [("x", [3, 6])], "y", inits)
    [unit] = removable_units(model)
    assert unit == RemovableUnit("mlp.fc1:ffn", "ffn", "res", "x", ("mlp.fc1", "mlp.fc2"))
    cut = remove_units(model, [unit.name])
    x = rng.standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(cut, x=x), x)  # the graph's output keeps its name (an Identity of the skip)
    assert [n.op_type for n in cut.graph.node] == ["Identity"] and not cut.graph.initializer


def _transformer(drop: frozenset[str] = frozenset(), d: int = 8) -> onnx.ModelProto:
    """Two post-LN layers (single-head attention with a padding mask, then a GELU FFN); sublayers named
    ``"<layer>:attention"`` / ``"<layer>:ffn"`` in ``drop`` are left out."""
    rng = np.random.default_rng(3)
    inits = {"one": 1.0, "neg": -1e4, "axes": np.array([1], np.int64), "scale": 1 / np.sqrt(d), "sqrt2": np.sqrt(2.0),
             "half": 0.5, "ln.g": 1 + rng.normal(0, 0.1, d), "ln.b": rng.normal(0, 0.1, d)}
    # the mask subgraph, shared by every attention: (1 - mask) * -1e4, as [B, 1, S]
    nodes = [helper.make_node("Sub", ["one", "mask"], ["inv"]), helper.make_node("Mul", ["inv", "neg"], ["mb"]),
             helper.make_node("Unsqueeze", ["mb", "axes"], ["mask_bias"], name="mask_unsqueeze")]
    cur = "x"
    for layer in ("l0", "l1"):
        for w in ("q", "k", "v", "o"):
            inits |= {f"{layer}.{w}.w": rng.normal(0, 0.4, (d, d)), f"{layer}.{w}.b": rng.normal(0, 0.1, d)}
        inits |= {f"{layer}.f1.w": rng.normal(0, 0.4, (d, 2 * d)), f"{layer}.f1.b": rng.normal(0, 0.1, 2 * d),
                  f"{layer}.f2.w": rng.normal(0, 0.4, (2 * d, d)), f"{layer}.f2.b": rng.normal(0, 0.1, d)}
        p = f"{layer}."
        if f"{p}q:attention" not in drop:
            for w in ("q", "k", "v"):
                nodes += [helper.make_node("MatMul", [cur, f"{p}{w}.w"], [f"{p}{w}.m"], name=f"{p}{w}"),
                          helper.make_node("Add", [f"{p}{w}.m", f"{p}{w}.b"], [f"{p}{w}.t"])]
            nodes += [helper.make_node("Transpose", [f"{p}k.t"], [f"{p}kT"], perm=[0, 2, 1]),
                      helper.make_node("MatMul", [f"{p}q.t", f"{p}kT"], [f"{p}s0"]),
                      helper.make_node("Mul", [f"{p}s0", "scale"], [f"{p}s1"]),
                      helper.make_node("Add", [f"{p}s1", "mask_bias"], [f"{p}s2"]),
                      helper.make_node("Softmax", [f"{p}s2"], [f"{p}pr"], axis=-1),
                      helper.make_node("MatMul", [f"{p}pr", f"{p}v.t"], [f"{p}ctx"]),
                      helper.make_node("MatMul", [f"{p}ctx", f"{p}o.w"], [f"{p}o.m"], name=f"{p}o"),
                      helper.make_node("Add", [f"{p}o.m", f"{p}o.b"], [f"{p}o.t"]),
                      helper.make_node("Add", [f"{p}o.t", cur], [f"{p}res1"], name=f"{p}add1")]
            cur = f"{p}res1"
        nodes.append(helper.make_node("LayerNormalization", [cur, "ln.g", "ln.b"], [f"{p}ln1"], axis=-1))
        cur = f"{p}ln1"
        if f"{p}f1:ffn" not in drop:
            nodes += [helper.make_node("MatMul", [cur, f"{p}f1.w"], [f"{p}f1.m"], name=f"{p}f1"),
                      helper.make_node("Add", [f"{p}f1.m", f"{p}f1.b"], [f"{p}f1.t"]),
                      helper.make_node("Div", [f"{p}f1.t", "sqrt2"], [f"{p}g0"]),
                      helper.make_node("Erf", [f"{p}g0"], [f"{p}g1"]),
                      helper.make_node("Add", [f"{p}g1", "one"], [f"{p}g2"]),
                      helper.make_node("Mul", [f"{p}g2", "half"], [f"{p}g3"]),
                      helper.make_node("Mul", [f"{p}f1.t", f"{p}g3"], [f"{p}gelu"]),
                      helper.make_node("MatMul", [f"{p}gelu", f"{p}f2.w"], [f"{p}f2.m"], name=f"{p}f2"),
                      helper.make_node("Add", [f"{p}f2.m", f"{p}f2.b"], [f"{p}f2.t"]),
                      helper.make_node("Add", [f"{p}f2.t", cur], [f"{p}res2"], name=f"{p}add2")]
            cur = f"{p}res2"
        nodes.append(helper.make_node("LayerNormalization", [cur, "ln.g", "ln.b"], [f"{p}ln2"], axis=-1))
        cur = f"{p}ln2"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return _model(nodes, [("x", ["batch", 5, d]), ("mask", ["batch", 5])], "y", inits, rank=3)


def _tokens():
    rng = np.random.default_rng(4)
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0  # padding: the mask changes the outputs
    return {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "mask": mask}


def test_transformer_sublayers_are_attention_and_ffn_units():
    units = removable_units(_transformer())
    assert [(u.name, u.kind, u.add) for u in units] == [
        ("l0.q:attention", "attention", "l0.add1"), ("l0.f1:ffn", "ffn", "l0.add2"),
        ("l1.q:attention", "attention", "l1.add1"), ("l1.f1:ffn", "ffn", "l1.add2")]
    assert units[0].layers == ("l0.q", "l0.k", "l0.v", "l0.o") and units[0].skip == "x"
    assert units[3].layers == ("l1.f1", "l1.f2") and units[3].skip == "l1.ln1"


@pytest.mark.parametrize("drop", [{"l0.q:attention"}, {"l1.f1:ffn"}, {"l0.f1:ffn", "l1.q:attention"},
                                  {"l0.q:attention", "l1.q:attention"}])
def test_removing_transformer_sublayers_equals_the_graph_without_them(drop):
    model, feeds = _transformer(), _tokens()
    cut = remove_units(model, sorted(drop))
    onnx.checker.check_model(cut)
    _close(_run(cut, **feeds), _run(_transformer(frozenset(drop)), **feeds))
    mask_kept = "mask_unsqueeze" in {n.name for n in cut.graph.node}
    assert mask_kept == (sum("attention" in n for n in drop) < 2)  # shared: it goes with the last attention only
    assert [i.name for i in cut.graph.input] == ["x", "mask"]  # the interface stays
    assert _params(cut) < _params(model)


# ------------------------------------------------------------------------------------------------------- low rank

def _linear(op: str, w: np.ndarray, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, trans_a: int = 0
            ) -> onnx.ModelProto:
    """One layer ``fc`` between a Relu and a Tanh: MatMul (+bias Add), Gemm, or 1x1 Conv with stride 2, pads 1."""
    rng = np.random.default_rng(5)
    n = w.shape[1] if op == "MatMul" else w.shape[1 - trans_b] if op == "Gemm" else w.shape[0]
    inits = {"fc.w": w, "fc.b": rng.normal(0, 0.3, n)}
    if op == "MatMul":
        core = [helper.make_node("MatMul", ["r", "fc.w"], ["m"], name="fc"),
                helper.make_node("Add", ["m", "fc.b"], ["z"])]
        shape = [2, 3, w.shape[0]]
    elif op == "Gemm":
        core = [helper.make_node("Gemm", ["r", "fc.w", "fc.b"], ["z"], name="fc", transA=trans_a, transB=trans_b,
                                 alpha=alpha, beta=beta)]
        shape = [w.shape[trans_b], 4] if trans_a else [4, w.shape[trans_b]]
    else:
        core = [helper.make_node("Conv", ["r", "fc.w", "fc.b"], ["z"], name="fc", strides=[2, 2], pads=[1, 1, 1, 1])]
        shape = [2, w.shape[1], 5, 5]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), *core, helper.make_node("Tanh", ["z"], ["y"])]
    return _model(nodes, [("x", shape)], "y", inits, rank=len(shape))


_CASES = {  # op, W_eff [N, K] -> stored weight, extra Gemm attributes
    "matmul": ("MatMul", lambda w: w.T, {}),
    "gemm_transB1": ("Gemm", lambda w: w, {"trans_b": 1}),
    "gemm_transB0": ("Gemm", lambda w: w.T, {"trans_b": 0}),
    "gemm_alpha_beta": ("Gemm", lambda w: w / 0.5, {"trans_b": 1, "alpha": 0.5, "beta": 2.0}),
    "gemm_transA1": ("Gemm", lambda w: w, {"trans_b": 1, "trans_a": 1}),
    "conv1x1_stride2": ("Conv", lambda w: w[:, :, None, None], {}),
}


def _case(name: str, w_eff: np.ndarray) -> onnx.ModelProto:
    op, store, kw = _CASES[name]
    return _linear(op, store(w_eff).astype(np.float32), **kw)


def _input(model: onnx.ModelProto) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(6).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("case", list(_CASES))
def test_factorize_equals_the_dense_product(case):
    rng = np.random.default_rng(7)
    n, k, r = 12, 10, 3
    w = rng.normal(0, 0.4, (n, k)).astype(np.float32)
    model = _case(case, w)
    np.testing.assert_allclose(layer_weight(model, "fc"), w, rtol=1e-6)
    a, b = rng.normal(0, 0.4, (r, k)).astype(np.float32), rng.normal(0, 0.4, (n, r)).astype(np.float32)
    before = model.SerializeToString()
    fact = factorize(model, "fc", a, b)
    assert model.SerializeToString() == before  # the input is not mutated
    x = _input(model)
    _close(_run(fact, x=x), _run(_case(case, b @ a), x=x))
    names = [n.name for n in fact.graph.node]
    assert "fc" not in names and {"fc.lr1", "fc.lr2"} <= set(names)
    assert {"fc.lr1.weight", "fc.lr2.weight"} <= {i.name for i in fact.graph.initializer}
    assert "fc.w" not in {i.name for i in fact.graph.initializer}
    assert r < n * k / (n + k) and _params(fact) == _params(model) - n * k + r * (n + k)
    np.testing.assert_allclose(layer_weight(fact, "fc.lr2") @ layer_weight(fact, "fc.lr1"), b @ a, rtol=1e-5)


@pytest.mark.parametrize("case", list(_CASES))
def test_full_rank_factors_reproduce_the_model(case):
    w = np.random.default_rng(8).normal(0, 0.4, (12, 10)).astype(np.float32)
    model = _case(case, w)
    x = _input(model)
    _close(_run(factorize(model, "fc", *lowrank_factors(model, "fc", 10)), x=x), _run(model, x=x))


def test_activation_aware_factors_fit_the_layer_inputs_better():
    rng = np.random.default_rng(9)
    w = rng.normal(0, 0.4, (12, 10)).astype(np.float32)
    model = _case("matmul", w)
    x = (np.abs(rng.standard_normal((2, 3, 2))) @ np.abs(rng.standard_normal((2, 10)))).astype(np.float32)
    inputs = x  # what the layer sees (positive: the Relu passes it): rank 2, so rank-2 aware factors are exact
    exact = _run(model, x=x)
    err = {}
    for key, rows in (("svd", None), ("aware", inputs)):
        a, b = lowrank_factors(model, "fc", 2, rows)
        assert a.shape == (2, 10) and b.shape == (12, 2)
        err[key] = np.abs(_run(factorize(model, "fc", a, b), x=x) - exact).max()
    assert err["aware"] < 1e-3 < err["svd"], err
    with pytest.raises(ValueError, match="takes 10 inputs"):
        lowrank_factors(model, "fc", 2, np.ones((4, 3)))


@pytest.mark.parametrize("case", ["matmul", "gemm_transB0", "conv1x1_stride2"])
def test_compensation_adds_b_a_to_the_weight(case):
    rng = np.random.default_rng(10)
    w = rng.normal(0, 0.4, (12, 10)).astype(np.float32)
    wq = np.round(w * 4) / 4  # a coarsely quantized weight
    xs = rng.standard_normal((50, 10))
    u, v = eora(w, wq, xs.T @ xs, 4)  # lowrank's (U, V) = (b, a)
    model = _case(case, wq)
    comp = add_compensation(model, "fc", v, u)
    x = _input(model)
    _close(_run(comp, x=x), _run(_case(case, wq + u @ v), x=x))
    assert {"fc", "fc.comp1", "fc.comp2", "fc.comp_add"} <= {n.name for n in comp.graph.node}
    a, b = rng.standard_normal((2, 10)), rng.standard_normal((12, 2))  # plain random factors too
    _close(_run(add_compensation(model, "fc", a, b), x=x), _run(_case(case, wq + b @ a), x=x))
    with pytest.raises(ValueError, match="already has a compensation path"):
        add_compensation(comp, "fc", v, u)


def test_unsupported_layers_and_bad_factors_are_clear_errors():
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((2, 4)), rng.standard_normal((6, 2))
    conv3 = _linear("Conv", rng.standard_normal((6, 4, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="3x3 Conv"):
        factorize(conv3, "fc", a, b)
    dw = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=4)], [("x", [1, 4, 3, 3])], "y",
                {"w": rng.standard_normal((4, 1, 1, 1))}, rank=4)
    with pytest.raises(ValueError, match="grouped Conv"):
        add_compensation(dw, "dw", a, b)
    emb = _model([helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")], [], "y",
                 {"table": rng.standard_normal((5, 3)), "ids": np.array([0, 2])})
    with pytest.raises(ValueError, match="Gather"):
        factorize(emb, "emb", a, b)
    model = _case("matmul", rng.standard_normal((6, 4)))
    with pytest.raises(ValueError, match="no node named"):
        factorize(model, "nope", a, b)
    with pytest.raises(ValueError, match=r"a \[r, 4\] and b \[6, r\]"):
        factorize(model, "fc", b, a)  # swapped
    u, v = svd_factors(layer_weight(model, "fc"), 2)
    factorize(model, "fc", v, u)  # lowrank's (U, V) passed as (b, a) is right
