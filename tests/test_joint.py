"""The joint option space (edgekit.joint, edgekit.structure, the option grammar of edgekit.plan): units, narrowed costs,
Pareto pruning of unit rows, the structural half of a plan against references, and the allocator on the digits CNN."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from edgekit.errors import ConfigError
from edgekit.joint import Entry, Unit, _combine, _structures, narrowed, pareto, rank_candidates
from edgekit.plan import LayerChoice, Plan, check_option, parse_option, tolerance_class


# -- the option grammar --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "base", "ch", "rank", "sparse", "kind"), [
    ("w8a8", "w8a8", None, None, None, "quantize"),
    ("fp32", "fp32", None, None, None, "float"),
    ("w8a8+ch96", "w8a8", 96, None, None, "prune+quantize"),
    ("fp32+ch16", "fp32", 16, None, None, "prune+float"),
    ("w8a8d+r64", "w8a8d", None, 64, None, "low-rank+quantize"),
    ("w4g32+ch48", "w4g32", 48, None, None, "prune+quantize"),
    ("sparse2:4+w8a8", "w8a8", None, None, "sparse2:4", "sparse+quantize"),
    ("drop", "drop", None, None, None, "drop"),
])
def test_option_grammar(option, base, ch, rank, sparse, kind):
    p = parse_option(option)
    assert (p.base, p.channels, p.rank, p.sparsity, p.kind) == (base, ch, rank, sparse, kind)
    assert p.structural == (option not in ("w8a8", "fp32"))


@pytest.mark.parametrize("bad", ["w8a8+ch0", "drop+ch3", "w8a8+r", "w8a8+ch12+ch4", "ch16", "w8a8+r16+ch8",
                                 "sparse3:4+w8a8", "w5a8+ch8"])
def test_option_grammar_rejects(bad):
    with pytest.raises(ConfigError):
        check_option(bad)


def test_structural_plan_round_trips_and_keeps_its_tolerance_class(tmp_path):
    plan = Plan("0" * 64, "cpu-x86", "mixed", (LayerChoice("a", "w8a8+ch32"), LayerChoice("b", "drop"),
                                                LayerChoice("c", "w4g32+ch32"), LayerChoice("d", "fp32+r16")))
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and again.is_structural
    assert tolerance_class(plan) == "int4"
    assert not Plan("0" * 64, "t", "int8", (LayerChoice("a", "w8a8"),)).is_structural


# -- Pareto pruning of unit rows ----------------------------------------------------------------------------------
def _random_entries(rng, n, layer="x"):
    return [Entry({layer: f"o{i}"}, float(rng.integers(0, 5)), int(rng.integers(0, 5)), float(rng.integers(0, 5)))
            for i in range(n)]


def test_pareto_keeps_exactly_the_non_dominated_entries():
    rng = np.random.default_rng(0)
    for _ in range(20):
        entries = _random_entries(rng, 30)
        kept = pareto(entries)
        vec = [(e.distortion, e.bytes, e.latency_ms) for e in entries]
        for i, v in enumerate(vec):
            dominated = any(all(a <= b for a, b in zip(w, v, strict=True)) and w != v for w in vec)
            duplicate = v in vec[:i]
            assert (entries[i] in kept) == (not dominated and not duplicate)


def test_combined_front_loses_nothing_a_budgeted_solver_could_want():
    """For every (bytes, latency) budget, the best distortion over the pruned product equals brute force."""
    rng = np.random.default_rng(1)
    parts = [_random_entries(rng, 6, layer=f"l{k}") for k in range(3)]
    front = _combine(parts, 0.5)
    full = [Entry({}, 0.5 + sum(e.distortion for e in c), sum(e.bytes for e in c), sum(e.latency_ms for e in c))
            for c in itertools.product(*parts)]
    assert len(front) < len(full)
    for bb, lb in itertools.product(range(0, 16, 2), range(0, 16, 2)):
        ok_full = [e.distortion for e in full if e.bytes <= bb and e.latency_ms <= lb]
        ok_front = [e.distortion for e in front if e.bytes <= bb and e.latency_ms <= lb]
        assert (min(ok_full) if ok_full else None) == (min(ok_front) if ok_front else None)


def test_structures_cap_the_product_of_group_widths():
    class G:
        def __init__(self, name):
            self.name = name

    unit = Unit("u", ("a",), tuple(G(f"g{i}") for i in range(4)))
    counts = {f"g{i}": [8, 16, 24] for i in range(4)}  # 4^4 = 256 combinations > MAX_STRUCTURES
    got = _structures(unit, counts)
    assert {} in got and {"g0": 8, "g1": 8, "g2": 8, "g3": 8} in got and {"g2": 16} in got
    assert len(got) == len({json.dumps(s, sort_keys=True) for s in got}) <= 1 + 3 + 4 * 3
    small = _structures(Unit("u", ("a",), (G("g0"), G("g1"))), {"g0": [8], "g1": [8, 16]})
    assert len(small) == 2 * 3


# -- narrowed layers: shapes, params and bytes agree with a really pruned graph ------------------------------------
def test_narrowed_layers_match_the_pruned_graph(digits_fp32):
    import onnx

    from edgekit.compress.channels import channel_groups, prune_channels
    from edgekit.cost import layer_bytes, layer_geometry
    from edgekit.inventory import layer_inventory

    model = onnx.load(str(digits_fp32))
    groups = {g.name: g for g in channel_groups(model)}
    g = groups[next(n for n, g in groups.items() if g.passthrough == () and g.channels == 32)]
    pruned = prune_channels(model, {g.name: np.arange(0, 32, 2)})
    before = {layer.name: layer for layer in layer_inventory(model)}
    after = {layer.name: layer for layer in layer_inventory(pruned)}
    geo, geo_after = layer_geometry(model), layer_geometry(pruned)
    for name in g.layers:
        cin = 16 if name in g.consumers else None
        cout = 16 if name == g.producer else None
        info, new_geo = narrowed(before[name], geo[name], cin, cout)
        assert info.weight_shape == after[name].weight_shape
        assert info.params == after[name].params
        assert info.macs == after[name].macs
        assert new_geo.input_shape == geo_after[name].input_shape
        assert new_geo.output_shape == geo_after[name].output_shape
        for option in ("fp32", "w8a8"):
            assert layer_bytes(info, option, geometry=new_geo) == layer_bytes(after[name], option,
                                                                               geometry=geo_after[name])


def test_rank_candidates_only_for_large_linear_layers():
    from edgekit.inventory import LayerInfo

    big = LayerInfo("m", "MatMul", "linear", "w", (384, 1536), 384 * 1536, 0)
    assert rank_candidates(big, None) == [80, 160]  # fractions 1/4 and 1/2 of 384*1536/1920 = 307.2, by 16
    assert rank_candidates(LayerInfo("s", "MatMul", "linear", "w", (64, 64), 4096, 0), None) == []
    assert rank_candidates(LayerInfo("c", "Conv", "conv", "w", (256, 256, 3, 3), 1, 0), None) == []
    assert rank_candidates(LayerInfo("p", "Conv", "conv", "w", (256, 512, 1, 1), 1, 0), None) == [48, 80]


# -- on the trained digits CNN ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The built-in (trained) digits CNN as FP32 ONNX, its calibration data, and what the allocator needs."""
    from types import SimpleNamespace

    from edgekit.context import Context
    from edgekit.data import load_data
    from edgekit.export.onnx import export_onnx
    from edgekit.fsutil import sha256_file
    from edgekit.inventory import layer_inventory
    from edgekit.model import load_model

    ctx = Context(progress=False)
    m = load_model("builtin:digits-cnn", ctx=ctx)
    work = tmp_path_factory.mktemp("joint")
    fp32 = export_onnx(m, work / "digits-fp32.onnx")
    calib = load_data(m.default_calib, m.inputs, m.preprocessing, role="calibration", limit=64, seed=0)
    return SimpleNamespace(fp32=fp32, calib=calib, ctx=ctx, work=work, layers=layer_inventory(fp32.path),
                           model=SimpleNamespace(sha256=sha256_file(fp32.path), task="classification"))


@pytest.fixture(scope="module")
def digits_fp32(digits):
    return digits.fp32.path


def test_pruned_graph_equals_the_masked_graph(digits):
    """apply_structure keeps each group's most important channels; the smaller graph computes what the original
    computes with the other channels masked (their producer rows and biases zeroed)."""
    import onnx
    import onnxruntime as ort

    from edgekit.compress.channels import channel_groups, channel_importance, masked_model
    from edgekit.structure import apply_structure, sample_feeds

    model = onnx.load(str(digits.fp32.path))
    groups = [g for g in channel_groups(model) if g.channels >= 32]
    assert len(groups) >= 2
    keep = {g.name: g.channels // 2 for g in groups}
    choices = tuple(LayerChoice(layer.name, f"fp32+ch{keep[layer.name]}" if layer.name in keep else "fp32")
                    for layer in digits.layers)
    plan = Plan(digits.model.sha256, "cpu-x86", "mixed", choices)
    edited, precision_plan, summary = apply_structure(digits.fp32.path, plan, digits.calib)
    assert summary["pruned"] == {g.name: [g.channels, keep[g.name]] for g in groups}
    assert all(c.option == "fp32" for c in precision_plan.layers)
    importance = channel_importance(model, groups, sample_feeds(digits.calib))
    drop = {g.name: np.sort(np.argsort(-importance[g.name], kind="stable")[keep[g.name]:]) for g in groups}
    x = digits.calib.inputs[next(iter(digits.calib.inputs))][:32]

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
            m.graph.input[0].name: x})[0]

    np.testing.assert_allclose(run(edited), run(masked_model(model, drop)), rtol=1e-4, atol=1e-5)
    assert sum(i.ByteSize() for i in edited.graph.initializer) < sum(i.ByteSize() for i in model.graph.initializer)


def test_plans_that_do_not_fit_the_graph_are_clear_errors(digits):
    from edgekit.structure import apply_structure

    first = digits.layers[-1].name  # the classifier: in no group as a producer, in no removable branch
    for option in ("drop", "w8a8+ch4"):
        choices = tuple(LayerChoice(layer.name, option if layer.name == first else "fp32") for layer in digits.layers)
        with pytest.raises(ConfigError):
            apply_structure(digits.fp32.path, Plan("x", "cpu-x86", "mixed", choices), digits.calib)


def test_joint_space_contains_the_bits_space_and_meets_a_size_budget(digits):
    """Same tables, same solver: under the same budget the joint optimum can only be at least as good (it contains
    every bits-only plan); the artifact it builds meets the size it was asked."""
    from edgekit.compress.quant import W8A8Config
    from edgekit.joint import JointAllocator
    from edgekit.tables import Budget
    from edgekit.targets import load_target

    common = {"profile": load_target("cpu-x86"), "model": digits.model, "fp32": digits.fp32, "layers": digits.layers,
              "calib": digits.calib, "cfg": W8A8Config(), "ctx": digits.ctx}
    bits = JointAllocator(**common, work=digits.work / "bits", structure=False)
    joint = JointAllocator(**common, work=digits.work / "joint", structure=True)
    assert not any(len(u.layers) > 1 for u in bits.space.units)
    budget = Budget(size_bytes=30_000)
    pb, ab = bits.allocate(budget)
    pj, aj = joint.allocate(budget)
    assert not pb.is_structural
    assert pj.budget["predicted"]["distortion"] <= pb.budget["predicted"]["distortion"] + 1e-12
    assert aj["applied"][1].size <= 30_000 and ab["applied"][1].size <= 30_000
    assert aj["joint"]["space"] == "joint" and aj["joint"]["structure"]["groups"]
    for c in pj.layers:
        check_option(c.option)
