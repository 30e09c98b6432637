"""Least-squares refit after channel pruning (edgekit.compress.refit): the solution equals the ridge regression
computed directly in numpy, lowers the output error of the pruned graph on held-out samples, leaves an exact layer
alone, keeps a layer with too few rows, and rejects layers it cannot refit."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgekit.compress.channels import channel_groups, channel_importance, prune_channels
from edgekit.compress.refit import ALPHAS, prune_and_refit, refit
from tests.test_channels import ffn_graph, mbconv_graph


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _tensor(model, name, feed):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([name], feed)[0]


def _keep_top(model, group, n, feeds):
    imp = channel_importance(model, [group], feeds, centered=True)[group.name]
    return {group.name: np.sort(np.argsort(-imp, kind="stable")[:n])}


def _ffn_feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 5, 16)).astype(np.float32)} for _ in range(n)]


def test_refit_is_the_ridge_solution_and_beats_the_pruned_graph_on_held_out_data():
    model = ffn_graph()
    group = next(g for g in channel_groups(model) if g.producer == "ffn.in")
    train, held = _ffn_feeds(48, 0), _ffn_feeds(16, 1)
    keep = _keep_top(model, group, 32, train)
    pruned = prune_channels(model, keep, train[:1])
    fixed, stats = prune_and_refit(model, keep, train, groups=[group], alphas=(1e-2,))
    assert set(stats) == {"ffn.out"} and stats["ffn.out"]["after"] < 0.8 * stats["ffn.out"]["before"]
    assert stats["ffn.out"]["held_out"] and stats["ffn.out"]["alpha"] == 1e-2

    # reference: ridge regression of the original ffn.out pre-bias+bias output on the pruned graph's inputs
    x = np.concatenate([_tensor(pruned, "g", f).reshape(-1, 32) for f in train]).astype(np.float64)
    y = np.concatenate([_tensor(model, "y1", f).reshape(-1, 16) for f in train]).astype(np.float64)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    node = next(n for n in pruned.graph.node if n.name == "ffn.out")
    add = next(n for n in pruned.graph.node if n.name == "ffn.out_bias")
    theta0 = np.concatenate([inits[node.input[1]], inits[add.input[1]][None]], axis=0).astype(np.float64)
    gram = xa.T @ xa
    lam = 1e-2 * np.mean(np.diag(gram))
    theta = np.linalg.solve(gram + lam * np.eye(len(gram)), xa.T @ y + lam * theta0)
    got = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    fnode = next(n for n in fixed.graph.node if n.name == "ffn.out")
    fadd = next(n for n in fixed.graph.node if n.name == "ffn.out_bias")
    np.testing.assert_allclose(got[fnode.input[1]], theta[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[fadd.input[1]], theta[-1], rtol=1e-4, atol=1e-5)

    def err(m):
        return np.mean([np.linalg.norm(_run(m, f) - _run(model, f)) for f in held])

    assert err(fixed) < 0.8 * err(pruned)
    chosen, stats = prune_and_refit(model, keep, train, groups=[group])  # the strength picked on held-out samples
    assert stats["ffn.out"]["alpha"] in ALPHAS and err(chosen) < 0.8 * err(pruned)


def test_refit_conv_consumer_on_a_narrowed_producer():
    """blk2.expand's group is pruned; blk2.project (1x1 conv) is refit; pruning the head group too narrows a layer
    that is both a consumer (of blk2) and a producer (kept_outputs)."""
    model = mbconv_graph()
    rng = np.random.default_rng(3)
    feeds = [{"input": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    groups = {g.producer: g for g in channel_groups(model)}
    keep = {**_keep_top(model, groups["blk2.expand"], 10, feeds), **_keep_top(model, groups["head"], 14, feeds)}
    pruned = prune_channels(model, keep, feeds[:1])
    fixed, stats = prune_and_refit(model, keep, feeds, groups=list(groups.values()))
    assert stats["blk2.project"]["after"] < stats["blk2.project"]["before"]
    assert stats["fc"].get("kept")  # 24 rows for 15 features: too few to trust, the folded weights stay
    assert _run(fixed, feeds[0]).shape == (1, 10)

    def err(m):
        return np.mean([np.linalg.norm(_run(m, f) - _run(model, f)) for f in feeds])

    assert err(fixed) < err(pruned)


def test_refit_of_an_unchanged_layer_keeps_it_and_bad_layers_are_errors():
    model = ffn_graph()
    feeds = _ffn_feeds(8, 0)
    same, stats = refit(model, model, ["ffn.out"], feeds)
    assert stats["ffn.out"]["before"] < 1e-6 and stats["ffn.out"].get("kept")
    np.testing.assert_allclose(_run(same, feeds[0]), _run(model, feeds[0]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not in both graphs"):
        refit(model, model, ["nope"], feeds)
    with pytest.raises(ValueError, match="not refittable"):
        refit(model, model, ["ln"], feeds)
    with pytest.raises(ValueError, match="at least one"):
        refit(model, model, ["ffn.out"], [])


def test_validation_holds_out_whole_sources():
    """With sources (crops of a few photographs), the ridge strength is validated on every 4th source's samples, all
    of them, and never on all sources; without, on every 4th sample."""
    from edgekit.compress.refit import VALIDATION_EVERY, validation_mask

    plain = validation_mask(12)
    assert plain.tolist() == [i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in range(12)]
    assert not validation_mask(VALIDATION_EVERY - 1).any()  # too few samples to hold any out
    sources = [7, 3, 9, 5, 1] * 4  # five sources, round-robin; in order of appearance: 7 3 9 5 1
    mask = validation_mask(len(sources), sources)
    assert {s for s, m in zip(sources, mask) if m} == {5}  # the 4th source, every one of its samples
    assert all(m == (s == 5) for s, m in zip(sources, mask))
    two = validation_mask(6, [0, 1] * 3)  # fewer than 4 sources: the last one
    assert two.tolist() == [False, True] * 3
    assert validation_mask(8, [4] * 8).tolist() == plain[:8].tolist()  # one source: by sample order
    with pytest.raises(ValueError, match="sources"):
        validation_mask(4, [0, 1])


def test_refit_with_sources_chooses_the_ridge_on_an_unseen_source():
    """Samples that share a source share its quirks: a refit validated within the sources it fits picks a weak ridge
    that does not carry over; validated on a held-out source it chooses the strength that does (and says so)."""
    model = ffn_graph()
    group = next(g for g in channel_groups(model) if g.producer == "ffn.in")
    rng = np.random.default_rng(3)
    # four "photographs": each shifts every sample of its own by a fixed offset vector
    offsets = rng.normal(0, 2.0, (4, 16))
    feeds, sources = [], []
    for i in range(32):
        s = i % 4
        feeds.append({"x": (rng.normal(0, 0.3, (1, 5, 16)) + offsets[s]).astype(np.float32)})
        sources.append(s)
    keep = _keep_top(model, group, 24, feeds)
    _, by_sample = prune_and_refit(model, keep, feeds, groups=[group])
    _, by_source = prune_and_refit(model, keep, feeds, groups=[group], sources=sources)
    assert by_source["ffn.out"]["held_out"] and by_sample["ffn.out"]["held_out"]
    # validated on the unseen 4th source, the ridge is at least as strong
    assert by_source["ffn.out"]["alpha"] >= by_sample["ffn.out"]["alpha"]
