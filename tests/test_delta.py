"""Deltas (``edgekit.delta``): per-tensor encodings within their error bound, and the whole path — a changed-bias
release made into a delta, installed by the agent onto the base it serves, refused when tampered, and replaced by
the full bundle when the device runs another base."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekit.bundle import open_bundle, pack, seal
from edgekit.delta import DeltaBaseMismatch, DeltaError, decode, encode, make_delta
from edgekit.errors import BundleError
from tests.agent_bundles import build_bundles, inputs


@pytest.mark.parametrize("size, expect_bits", [(1e-4, 2), (3e-2, 8)])
def test_encode_takes_the_fewest_bits_within_the_bound(size, expect_bits):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (64, 32)).astype(np.float32)
    if expect_bits == 2:  # a change of one size everywhere: 2 bits (3 levels) are exact
        new = (base + size * np.sign(rng.normal(size=base.shape))).astype(np.float32)
    else:
        new = (base + rng.normal(0, size, base.shape)).astype(np.float32)
    bound = 1e-3
    meta, codes = encode(base, new, bound)
    assert meta["encoding"] == "int" and meta["bits"] == expect_bits
    got = decode(base, meta, codes)
    assert np.abs(got - new).max() <= bound * np.abs(new).max() + 1e-6
    if meta["bits"] > 2:  # one bit fewer would have broken the bound: the choice is minimal
        fewer = {3: 2, 4: 3, 8: 4, 16: 8}[meta["bits"]]
        levels = (1 << (fewer - 1)) - 1
        d = new.astype(np.float64) - base
        scale = np.abs(d).max() / levels
        assert np.abs(np.clip(np.round(d / scale), -levels, levels) * scale - d).max() > bound * np.abs(new).max()


def test_encode_zero_and_raw_cases():
    a = np.ones((4,), np.float32)
    assert encode(a, a.copy(), 1e-3) == ({"encoding": "zero"}, None)
    meta, codes = encode(a, np.ones((5,), np.float32), 1e-3)
    assert meta == {"encoding": "raw"} and codes.shape == (5,)
    noisy = np.random.default_rng(1).normal(0, 1, 1000).astype(np.float32)
    meta, _ = encode(np.zeros(1000, np.float32), noisy, 1e-7)  # tighter than 16 bits can hold
    assert meta == {"encoding": "raw"}
    with pytest.raises(DeltaError, match="unknown delta encoding"):
        decode(a, {"encoding": "zstd"}, None)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, test_models_importable):
    """v1 (INT8 tiny_bn_cnn), an adapted v1 (every float bias nudged, as a cloud adaptation job would), the delta."""
    from edgekit.context import Context
    from edgekit.keys import dev_key, load_private_key

    root = tmp_path_factory.mktemp("delta")
    built = build_bundles(root / "built")
    key = load_private_key(dev_key(Context().cache_dir))
    base = open_bundle(built["v1"], workdir=root / "v1")
    adapted = root / "adapted"
    shutil.copytree(base.root, adapted)
    for name in ("manifest.json", "manifest.sig"):
        (adapted / name).unlink()
    model = onnx.load(str(adapted / "model.onnx"))
    rng = np.random.default_rng(0)
    changed = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim == 1 and a.size > 1:  # float biases of the Q/DQ graph
            init.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.05, a.shape)).astype(np.float32), init.name))
            changed.append(init.name)
    assert changed
    onnx.save(model, str(adapted / "model.onnx"))
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "schema_version")}
    manifest["version"] = base.manifest["version"] + 10
    art = manifest["artifact"]
    from edgekit.fsutil import sha256_file

    manifest["artifact"] = {**art, "sha256": sha256_file(adapted / "model.onnx"),
                            "size": (adapted / "model.onnx").stat().st_size}
    seal(adapted, manifest, key)
    new_archive = pack(adapted, root / "adapted.ekb")
    res = make_delta(built["v1"], new_archive, root / "out", key, error_bound=1e-3, full=str(root / "out" /
                                                                                             "tiny.ekb"))
    return {"built": built, "res": res, "changed": changed, "root": root, "key": key}


def test_delta_holds_only_the_changed_tensors_and_is_tiny(releases):
    res = releases["res"]
    assert res.stats["tensors"] == len(releases["changed"])
    assert res.stats["payload_bytes"] < res.stats["model_bytes"] / 4, res.stats
    with tarfile.open(res.delta) as tar:
        names = set(tar.getnames())
    # the model and the files the base already has stay out (the tiny bundle's manifest is most of what is left)
    assert {"delta.json", "delta.npz", "manifest.json", "manifest.sig"} <= names and "model.onnx" not in names
    assert res.stats["files_from_base"] >= 3 and not names & {"sketch.json", "report.html"}
    # the result bundle is the adapted model within the bound
    result = onnx.load(str(res.bundle_dir / "model.onnx"))
    adapted = onnx.load(str(releases["root"] / "adapted" / "model.onnx"))
    got = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
    for init in adapted.graph.initializer:
        want = numpy_helper.to_array(init)
        assert np.abs(got[init.name].astype(np.float64) - want).max() <= 1e-3 * np.abs(want).max() + 1e-7


def test_agent_installs_the_delta_onto_its_base(releases, tmp_path):
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.runtime import OrtRuntime

    res = releases["res"]
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        assert agent.install(releases["built"]["v1"], probation=False)["installed"]
        out = agent.install(res.delta, probation=False)
        assert out["installed"] and out["version"] == json.loads((res.bundle_dir / "manifest.json").read_text())[
            "version"]
        x = inputs(2)
        ref = OrtRuntime(res.bundle_dir / "model.onnx").run({"input": x})
        got = agent.infer({"input": x})
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6)
    finally:
        agent.close()


def _edited(delta: Path, folder: Path, edit) -> Path:
    """The delta unpacked into ``folder`` with ``edit(meta)`` applied to its delta.json."""
    with tarfile.open(delta) as tar:
        tar.extractall(folder, filter="data")
    meta = json.loads((folder / "delta.json").read_text())
    edit(meta)
    (folder / "delta.json").write_text(json.dumps(meta))
    return folder


def test_tampered_delta_is_refused(releases, tmp_path):
    from edgekit.agent import Agent, AgentConfig

    res = releases["res"]

    def scale_up(meta):
        name = next(iter(meta["tensors"]))
        if meta["tensors"][name].get("encoding") == "int":
            meta["tensors"][name]["scale"] *= 1.5

    folder = _edited(res.delta, tmp_path / "d", scale_up)
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        agent.install(releases["built"]["v1"], probation=False)
        with pytest.raises(BundleError, match="sha256|hash|does not match|differs"):
            agent.install(folder, probation=False)
        assert agent.status()["model"]["version"] == 1  # still serving the base
    finally:
        agent.close()


def test_delta_on_another_base_falls_back_to_the_full_bundle(releases, tmp_path):
    from edgekit.agent import Agent, AgentConfig

    res = releases["res"]
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        agent.install(releases["built"]["v2"], probation=False)  # FP32 v2, not the delta's base
        out = agent.install(res.delta, probation=False)
        assert out["installed"] and agent.status()["model"]["sha256"] == json.loads(
            (res.bundle_dir / "manifest.json").read_text())["artifact"]["sha256"]
    finally:
        agent.close()
    # without a full bundle to fall back to, a clear error
    folder = _edited(res.delta, tmp_path / "nofull", lambda meta: meta.update(full=None))
    agent = Agent.open(tmp_path / "state2", AgentConfig())
    try:
        agent.install(releases["built"]["v2"], probation=False)
        with pytest.raises(DeltaBaseMismatch, match="another model"):
            agent.install(folder, probation=False)
    finally:
        agent.close()


def test_make_delta_refuses_other_graphs(releases, tmp_path):
    with pytest.raises(DeltaError, match="more than their weights"):
        make_delta(releases["built"]["v1"], releases["built"]["v2"], tmp_path, releases["key"])


def test_cli_delta_make(releases, run_cli, tmp_path):
    res = run_cli("delta", "make", releases["built"]["v1"], releases["root"] / "adapted.ekb", "--out", tmp_path,
                  "--json")
    summary = json.loads(res.stdout)
    assert Path(summary["delta"]).is_file() and summary["tensors"] == len(releases["changed"])
