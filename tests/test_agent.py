"""The on-device agent: install with probation and rollback, inference, monitoring, adaptation, upload queue."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgekit.agent import Agent, AgentConfig
from edgekit.agent.adapt import AdaptState, InputWindow, NormAdapter
from edgekit.agent.monitor import MonitorConfig
from edgekit.agent.normtable import load_table
from edgekit.agent.probation import ProbationConfig
from edgekit.agent.runtime import OrtRuntime
from edgekit.agent.state import State
from edgekit.bundle import open_bundle
from edgekit.errors import AgentError, SignatureError
from tests.agent_bundles import build_bundles, inputs


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, test_models_importable):
    return build_bundles(tmp_path_factory.mktemp("agent-bundles"))


@pytest.fixture(scope="module")
def v1_dir(bundles, tmp_path_factory):
    return open_bundle(bundles["v1"], workdir=tmp_path_factory.mktemp("v1") / "b").root


def _agent(tmp_path, **kw) -> Agent:
    kw.setdefault("adapt_when", "never")
    kw.setdefault("adapt_async", False)  # reproducible; test_background_adaptation covers the default
    kw.setdefault("probation", ProbationConfig(requests=20))
    kw.setdefault("monitor", MonitorConfig(time_share=None))  # watch every request: deterministic tests
    return Agent.open(tmp_path / "state", AgentConfig(**kw))


def test_bundle_ships_sketch_and_adapt_table(v1_dir):
    manifest = json.loads((v1_dir / "manifest.json").read_text())
    assert manifest["reference"] == {"sketch": "sketch.json", "adapt": "adapt.json"}
    sketch = json.loads((v1_dir / "sketch.json").read_text())
    assert {"max_softmax", "entropy", "energy", "input_mean", "input_std"} <= set(sketch["scores"])
    assert len(sketch["scores"]["entropy"]) == sketch["samples"] > 0
    assert abs(sum(sketch["classes"]) - 1) < 1e-4
    layers = load_table(v1_dir / "adapt.json")
    assert [la.name for la in layers] == ["0", "3"]  # both BatchNorm-folded convs
    assert all(la.weight_kind == "qdq" and la.bias_kind == "qdq" for la in layers)


@pytest.fixture(scope="module")
def v2_dir(bundles, tmp_path_factory):
    return open_bundle(bundles["v2"], workdir=tmp_path_factory.mktemp("v2") / "b").root


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_overrides_make_the_layer_compute_the_affine(v1_dir, v2_dir, which, kind):
    """scale * y + shift, written into the weight scale and int32 bias (INT8) or the float weight and bias (FP32),
    is what the model then computes."""
    import onnx

    root = v1_dir if kind == "int8" else v2_dir
    layers = load_table(root / "adapt.json")
    assert {la.weight_kind for la in layers} == {"qdq" if kind == "int8" else "float"}
    adapter = NormAdapter(onnx.load(str(root / "model.onnx")), layers)
    window = InputWindow(64)
    for x in inputs(32, seed=3):
        window.add({"input": x[None]})
    m0, v0 = adapter._stats(AdaptState(), window)[which]
    rng = np.random.default_rng(which)
    la = layers[which]
    s, t = rng.uniform(0.5, 2.0, la.channels), rng.uniform(-1, 1, la.channels)
    state = AdaptState(1, {la.name: s.astype(np.float32)}, {la.name: t.astype(np.float32)})
    m1, v1 = adapter._stats(state, window)[which]
    np.testing.assert_allclose(m1, s * m0 + t, atol=1e-3)
    np.testing.assert_allclose(v1, s * s * v0, rtol=1e-3)
    # the serving path (the real Conv, NCHWc-optimized for FP32) sees the same change as the stats copy
    x = inputs(4, seed=5)
    src = OrtRuntime(root / "model.onnx").run({"input": x})
    adapted = OrtRuntime(root / "model.onnx", overrides=adapter.overrides(state)).run({"input": x})
    edited = onnx.load(str(root / "model.onnx"))
    for init in edited.graph.initializer:
        if init.name in adapter.overrides(state):
            init.CopyFrom(onnx.numpy_helper.from_array(adapter.overrides(state)[init.name], init.name))
    ref = OrtRuntime(edited.SerializeToString()).run({"input": x})
    np.testing.assert_allclose(adapted["output"], ref["output"], atol=1e-5)
    assert not np.allclose(adapted["output"], src["output"], atol=1e-3)


def test_norm_adaptation_moves_statistics_back_to_source(v1_dir):
    import onnx

    layers = load_table(v1_dir / "adapt.json")
    adapter = NormAdapter(onnx.load(str(v1_dir / "model.onnx")), layers, prior=8)
    window = InputWindow(64)
    for x in inputs(64, seed=4, shift=0.8, gain=0.4):
        window.add({"input": x[None]})

    def gap(state):
        return [float(np.abs(m - np.asarray(la.src_mean)).mean() + np.abs(np.sqrt(v) - np.asarray(la.src_std)).mean())
                for la, (m, v) in zip(layers, adapter._stats(state, window))]

    before = gap(AdaptState())
    state = AdaptState()
    for _ in range(3):
        state = adapter.update(state, window)
    after = gap(state)
    assert all(a < 0.35 * b for a, b in zip(after, before)), (before, after)


def test_install_and_infer_match_the_runtime(bundles, v1_dir, tmp_path):
    agent = _agent(tmp_path)
    assert agent.status()["model"] is None
    with pytest.raises(AgentError, match="no model"):
        agent.infer({"input": inputs(1)})
    res = agent.install(bundles["v1"])
    assert res == {"installed": True, "slot": "a", "version": 1, "probation": False}
    raw = OrtRuntime(v1_dir / "model.onnx")
    for x in inputs(5, seed=9):
        np.testing.assert_allclose(agent.infer({"input": x[None]})["output"], raw.run({"input": x[None]})["output"],
                                   rtol=0, atol=1e-6)
    assert agent.install(bundles["v1"])["installed"] is False  # already serving
    with pytest.raises(AgentError, match="shape"):
        agent.infer({"input": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(AgentError, match="takes inputs"):
        agent.infer({"x": inputs(1)})
    nan = np.full((1, 3, 16, 16), np.nan, np.float32)
    agent.infer({"input": nan})  # answered (as a raw session would); counted when watched (here: every request)
    st = agent.status()
    assert st["counters"]["requests"] == 6 and st["latency_ms"]["p50"] > 0
    agent.close()
    assert State(tmp_path / "state").counters()["nonfinite_inputs"] == 1  # the pending batch is scored at close
    checking = Agent.open(tmp_path / "state", AgentConfig(check_inputs=True))
    with pytest.raises(AgentError, match="NaN"):
        checking.infer({"input": nan})
    checking.close()


def test_update_passes_probation_and_commits(bundles, tmp_path):
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    assert agent.install(bundles["v2"]) == {"installed": True, "slot": "b", "version": 2, "probation": True}
    assert agent.status()["slots"]["probation"]["previous_version"] == 1
    for x in inputs(20, seed=5):
        agent.infer({"input": x[None]})
    st = agent.status()
    assert st["slots"] == {"active": "b", "previous": "a", "probation": None}
    assert st["model"]["version"] == 2 and st["events"][0]["kind"] == "commit"
    agent.close()
    again = _agent(tmp_path)  # durable
    assert again.status()["model"]["version"] == 2 and again.probation is None
    res = again.rollback()
    assert res["version"] == 1 and again.status()["slots"]["active"] == "a"


def test_update_that_disagrees_is_rolled_back(bundles, tmp_path):
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    agent.install(bundles["bad"])
    assert agent.status()["model"]["version"] == 3
    for x in inputs(20, seed=6):
        agent.infer({"input": x[None]})
    st = agent.status()
    assert st["model"]["version"] == 1 and st["slots"]["active"] == "a" and st["slots"]["previous"] is None
    assert st["events"][0]["kind"] == "rollback" and "agrees with the previous model" in st["events"][0]["detail"]
    assert st["counters"]["rollbacks"] == 1


def test_restarts_during_probation_roll_back(bundles, tmp_path):
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    agent.install(bundles["v2"])
    del agent  # "crash": no close, probation undecided
    first = _agent(tmp_path)
    assert first.status()["model"]["version"] == 2 and first.probation is not None
    second = _agent(tmp_path)  # a second boot during the same probation: crash loop → previous model
    assert second.status()["model"]["version"] == 1 and second.probation is None


def test_corrupt_active_slot_falls_back_to_previous(bundles, tmp_path):
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    agent.install(bundles["v2"], probation=False)
    agent.close()
    model = tmp_path / "state" / "slots" / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])
    again = _agent(tmp_path)
    assert again.status()["model"]["version"] == 1
    assert again.infer({"input": inputs(1)})["output"].shape == (1, 10)


def test_untrusted_bundle_is_refused_and_serving_continues(bundles, tmp_path):
    from edgekit.keys import generate_keypair

    _, pub = generate_keypair(tmp_path / "keys", name="other")
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    agent.config.trusted_keys = (str(pub),)
    agent.slots.trusted_keys = agent.config.public_keys()
    with pytest.raises(SignatureError):
        agent.install(bundles["v2"])
    assert agent.status()["model"]["version"] == 1
    assert not list((tmp_path / "state" / "slots").glob(".staging-*"))


def test_upload_selection_queue_and_budget(bundles, tmp_path):
    from edgekit.agent.select import SelectConfig

    agent = _agent(tmp_path, select=SelectConfig(warmup=20, band=(0.2, 0.95), budget_bytes_per_day=20000, every=1,
                                                  time_share=None))
    agent.install(bundles["v1"])
    for x in inputs(120, seed=8):
        agent.infer({"input": x[None]})
    st = agent.status()["queue"]
    assert 0 < st["size"] == st["acknowledged"] < 120 - 20
    assert st["queued"] == st["acknowledged"] + st["over_budget"]  # handed over = written + refused
    assert st["bytes_today"] <= 20000 and st["over_budget"] > 0  # the budget stopped it
    items = agent.uploads(limit=3)
    sample = np.load(__import__("io").BytesIO(items[0]["payload"]))["input"]
    assert sample.shape == (1, 3, 16, 16) and 0 <= items[0]["meta"]["prediction"] < 10
    assert agent.ack([i["id"] for i in items]) == 3
    agent.close()
    assert _agent(tmp_path).status()["queue"]["size"] == st["size"] - 3  # durable


def test_selector_band_and_redundancy():
    from edgekit.agent.select import SelectConfig, Selector

    sel = Selector(SelectConfig(warmup=50, band=(0.5, 0.9)))
    rng = np.random.default_rng(0)
    for e in rng.uniform(0, 1, 50):  # warm-up: nothing is selected while the band forms
        assert sel.consider({"x": rng.standard_normal(64)}, float(e)) is None
    picked = []
    for e in rng.uniform(0, 1, 400):
        f = sel.consider({"x": rng.standard_normal(64)}, float(e))
        if f is not None:
            sel.accepted(f)
            picked.append(e)
    assert sel.stats["band_low"] > 150 and sel.stats["band_high"] > 20
    assert len(picked) > 80 and 0.4 < min(picked) and max(picked) < 0.95  # the band: quantiles 0.5..0.9
    x = {"x": rng.standard_normal(64)}
    f = sel.consider(x, 0.7)
    sel.accepted(f)
    assert sel.consider({"x": x["x"] * 1.01 + 0.001}, 0.7) is None and sel.stats["redundant"] == 1  # a near-copy


def test_sampler_keeps_a_task_within_its_time_share():
    from edgekit.agent.sampler import FLOOR, Sampler

    s = Sampler(every=4, time_share=0.01, seed=0)
    assert s.p == 0.25  # at most one in `every` before any cost is known
    for _ in range(3):
        s.ran(cost_s=200e-6, latency_s=2.5e-3)  # 200 us of work per 2.5 ms run: 1 % allows one in eight
    assert s.p == pytest.approx(0.01 * 2.5e-3 / 200e-6)
    s.ran(cost_s=1.0, latency_s=2.5e-3)  # one slow call (a cold start) does not starve the task: the median rules
    assert s.p == pytest.approx(0.01 * 2.5e-3 / 200e-6)
    for _ in range(20):
        s.ran(cost_s=1.0, latency_s=1e-3)
    assert s.p == FLOOR  # never below the floor
    for _ in range(20):
        s.ran(cost_s=1e-6, latency_s=1e-3)
    assert s.p == 0.25  # never above one in `every`
    due = sum(s.due() for _ in range(40000))
    assert 0.23 < due / 40000 < 0.27
    free = Sampler(every=1, time_share=None)
    free.ran(cost_s=1.0, latency_s=1e-6)
    assert free.p == 1.0 and all(free.due() for _ in range(100))


def test_drift_alarm_and_adaptation_on_shifted_stream(bundles, tmp_path):
    from edgekit.agent.monitor import MonitorConfig

    agent = _agent(tmp_path, adapt_when="drift", adapt_every=8,
                   monitor=MonitorConfig(window=60, check_every=20, on_checks=2, off_checks=2,
                                                 time_share=None))
    agent.install(bundles["v1"])
    for x in inputs(100, seed=10):
        agent.infer({"input": x[None]})
    assert not agent.status()["drift"]["alarm"] and agent.adapt_state.is_source()
    for x in inputs(200, seed=11, shift=1.5, gain=0.3):
        agent.infer({"input": x[None]})
    st = agent.status()
    assert agent.monitor.alarm_changes >= 1  # the alarm went on (adaptation may since have brought the scores back)
    assert st["adaptation"]["version"] > 0 and not agent.adapt_state.is_source()
    agent.close()
    restored = _agent(tmp_path, adapt_when="drift")  # the adaptation state survives a restart
    assert restored.adapt_state.version == agent.adapt_state.version


def test_background_adaptation_swaps_the_session_in(bundles, tmp_path):
    agent = _agent(tmp_path, adapt_when="always", adapt_every=8, adapt_async=True)
    agent.install(bundles["v1"])
    first = agent.model.runtime
    for x in inputs(40, seed=14, shift=1.0, gain=0.5):
        agent.infer({"input": x[None]})
    agent.wait_adaptation(timeout=60)
    assert agent.adapt_state.version >= 1 and agent.model.runtime is not first
    agent.close()


def test_collapse_resets_adaptation(bundles, tmp_path):
    from edgekit.agent.adapt import GuardConfig

    agent = _agent(tmp_path, adapt_when="always", adapt_every=4, guard=GuardConfig(window=20, class_share=0.5))
    agent.install(bundles["v1"])
    agent.guard.ref_max_share = 0.1  # the random test model is itself lopsided on its reference data
    x = inputs(1, seed=12)
    for _ in range(80):  # one input over and over: every prediction is the same class
        agent.infer({"input": x})
    st = agent.status()
    assert st["counters"].get("adapt_resets", 0) >= 1
    assert any(e["kind"] == "adapt-reset" and "prediction collapse" in e["detail"] for e in st["events"])


def test_lame_fixes_noisy_predictions_on_clusters():
    from edgekit.agent.adapt import Lame

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 3
    labels = rng.integers(0, 4, 200)
    feats = centers[labels] + rng.standard_normal((200, 16)) * 0.5
    logits = np.eye(4)[labels] * 1.0 + rng.standard_normal((200, 4)) * 0.9  # noisy classifier
    lame = Lame(window=64)
    adapted = np.concatenate([lame(logits[i:i + 1], feats[i:i + 1]) for i in range(200)])
    base = (logits.argmax(1) == labels)[64:].mean()
    ours = (adapted.argmax(1) == labels)[64:].mean()
    assert ours > base + 0.05, (base, ours)
    np.testing.assert_allclose(adapted.sum(1), 1, atol=1e-6)


def test_skip_similar_frames(bundles, tmp_path):
    agent = _agent(tmp_path, skip_similar=0.9995, upload=False)
    agent.install(bundles["v1"])
    x = inputs(2, seed=13)
    a = agent.infer({"input": x[:1]})
    b = agent.infer({"input": x[:1] * 1.0001})
    c = agent.infer({"input": x[1:]})
    np.testing.assert_array_equal(a["output"], b["output"])  # cosine 1: skipped with probability 1
    assert not np.allclose(a["output"], c["output"])  # a different input is run
    assert agent.status()["counters"]["skipped"] == 1
    rng = np.random.default_rng(0)  # a slowly drifting input: skipped often, never all the time
    frame = x[:1].copy()
    for _ in range(200):
        frame = frame + rng.standard_normal(frame.shape).astype(np.float32) * 0.003
        agent.infer({"input": frame})
    skipped = agent.status()["counters"]["skipped"] - 1
    assert 20 < skipped < 190


def test_agent_config_round_trip_and_errors(tmp_path):
    from edgekit.errors import ConfigError

    cfg = AgentConfig(adapt=("norm", "lame"), adapt_every=3)
    cfg.save(tmp_path)
    assert AgentConfig.load(tmp_path) == cfg
    with pytest.raises(ConfigError, match="tier"):
        AgentConfig(adapt=("magic",))
    (tmp_path / "config.json").write_text('{"nope": 1}')
    with pytest.raises(ConfigError, match="nope"):
        AgentConfig.load(tmp_path)


def test_state_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AgentError, match="cannot open the agent state"):
        Agent.open(blocker / "state")


def test_interrupted_install_leaves_no_staging(bundles, tmp_path, monkeypatch):
    agent = _agent(tmp_path)
    agent.install(bundles["v1"])
    from edgekit.agent import updater

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(updater, "_fsync_tree", boom)
    with pytest.raises(OSError):
        agent.install(bundles["v2"])
    assert agent.status()["model"]["version"] == 1
    assert not list((tmp_path / "state" / "slots").glob(".*"))
    shutil.rmtree(tmp_path / "state")


def test_ort_sessions_stop_spinning_between_runs(v1_dir):
    """An idle session's spinning threads would take the cores from the next one (timings of one model moved by
    1.4x with ten sessions loaded): every OrtRuntime stops its threads' spinning when a run returns."""
    rt = OrtRuntime(v1_dir / "model.onnx", threads=2)
    assert rt.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
