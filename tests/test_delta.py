"""Deltas (``edgekit.delta``): per-tensor encodings within their error bound, and the whole path — a changed-bias
release made into a delta, installed by the agent onto the base it serves, refused when tampered, and replaced by
the full bundle when the device runs another base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekit.bundle import open_bundle, pack, seal
from edgekit.delta import (
    BITS,
    DeltaBaseMismatch,
    DeltaError,
    _pack_codes,
    _unpack_codes,
    decode,
    encode,
    make_delta,
    read_delta,
    write_delta,
)
from edgekit.errors import BundleError
from edgekit.fsutil import sha256_file
from tests.agent_bundles import build_bundles, inputs


@pytest.mark.parametrize("size, expect_bits", [(1e-4, 2), (3e-2, 5)])
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
        fewer = BITS[BITS.index(meta["bits"]) - 1]
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
    manifest["artifact"] = {**art, "sha256": sha256_file(adapted / "model.onnx"),
                            "size": (adapted / "model.onnx").stat().st_size}
    seal(adapted, manifest, key)
    new_archive = pack(adapted, root / "adapted.ekb")
    res = make_delta(built["v1"], new_archive, root / "out", key, error_bound=1e-3, full=str(root / "out" /
                                                                                             "tiny.ekb"))
    return {"built": built, "res": res, "changed": changed, "root": root, "key": key, "base_root": base.root}


def test_delta_holds_only_the_changed_tensors_and_is_tiny(releases):
    res = releases["res"]
    assert res.stats["tensors"] == len(releases["changed"])
    assert res.stats["codes_bytes"] < res.stats["model_bytes"] / 4, res.stats
    manifest, sig, meta, codes, files = read_delta(res.delta, releases["base_root"])
    # the model and the files the base already has stay out: only the manifest, its signature and the codes
    assert files == {} and meta["artifact"] == "model.onnx" and len(codes) == res.stats["codes_bytes"]
    assert manifest == (res.bundle_dir / "manifest.json").read_bytes()
    assert sig == (res.bundle_dir / "manifest.sig").read_bytes()
    assert res.stats["delta_bytes"] < len(codes) + 700, res.stats  # manifest + signature: a few hundred bytes
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


def _edited(delta: Path, base_root: Path, out: Path, edit) -> Path:
    """A copy of ``delta`` at ``out`` with ``edit(meta)`` applied to its meta."""
    manifest, sig, meta, codes, files = read_delta(delta, base_root)
    edit(meta)
    write_delta(out, base_root, manifest, sig, meta, codes, files)
    return out


def test_tampered_delta_is_refused(releases, tmp_path):
    from edgekit.agent import Agent, AgentConfig

    res = releases["res"]

    def scale_up(meta):
        meta["changes"]["t"][0][1]["scale"] *= 1.5

    tampered = _edited(res.delta, releases["base_root"], tmp_path / "t.ekd", scale_up)
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        agent.install(releases["built"]["v1"], probation=False)
        with pytest.raises(BundleError, match="sha256|hash|does not match|differs"):
            agent.install(tampered, probation=False)
        assert agent.status()["model"]["version"] == 1  # still serving the base
        # bytes flipped anywhere: a clear error, never a traceback or a half-installed model
        raw = bytearray(res.delta.read_bytes())
        for pos in (5, len(raw) // 2, len(raw) - 3):
            bad = bytearray(raw)
            bad[pos] ^= 0x5A
            (tmp_path / "bad.ekd").write_bytes(bytes(bad))
            with pytest.raises(BundleError):
                agent.install(tmp_path / "bad.ekd", probation=False)
        (tmp_path / "short.ekd").write_bytes(bytes(raw[: len(raw) // 3]))
        with pytest.raises(BundleError):
            agent.install(tmp_path / "short.ekd", probation=False)
        assert agent.status()["model"]["version"] == 1
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
    nofull = _edited(res.delta, releases["base_root"], tmp_path / "nofull.ekd", lambda meta: meta.update(full=None))
    agent = Agent.open(tmp_path / "state2", AgentConfig())
    try:
        agent.install(releases["built"]["v2"], probation=False)
        with pytest.raises(DeltaBaseMismatch, match="another model"):
            agent.install(nofull, probation=False)
    finally:
        agent.close()


def test_norm_layer_changes_ship_as_scale_and_shift(releases, tmp_path):
    """A per-channel affine change of the norm layers (what adaptation makes) is shipped as 2 numbers per channel,
    and the device rebuilds the int8 graph's weight scales, int32 biases and bias scales from them."""
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.normtable import initial_values, load_table, overrides

    base = open_bundle(releases["built"]["v1"], workdir=tmp_path / "base")
    layers = load_table(base.root / "adapt.json")
    assert layers and all(la.weight_kind == "qdq" for la in layers)
    model = onnx.load(str(base.root / "model.onnx"))
    rng = np.random.default_rng(3)
    scale = {la.name: rng.uniform(0.8, 1.25, la.channels) for la in layers}
    shift = {la.name: rng.normal(0, 0.1, la.channels) for la in layers}
    new = overrides(layers, initial_values(model, layers), scale, shift)
    res = _resealed(base, new, tmp_path, releases["key"], version_step=20)
    delta = make_delta(releases["built"]["v1"], res, tmp_path / "out", releases["key"], error_bound=1e-2)
    assert delta.stats["norm_layers"] == len(layers) and delta.stats["tensors"] == 0, delta.stats
    channels = sum(la.channels for la in layers)
    assert delta.stats["codes_bytes"] <= 2 * channels * 2, delta.stats  # at most 16 bits per number
    # the rebuilt tensors are the given ones within the bound
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(delta.bundle_dir / "model.onnx")).graph.initializer}
    for name, want in new.items():
        assert np.abs(got[name].astype(np.float64) - want).max() <= 1e-2 * np.abs(want).max() + 1e-9, name
    agent = Agent.open(tmp_path / "state", AgentConfig())
    try:
        agent.install(releases["built"]["v1"], probation=False)
        assert agent.install(delta.delta, probation=False)["installed"]
        assert agent.status()["model"]["sha256"] == sha256_file(delta.bundle_dir / "model.onnx")
    finally:
        agent.close()


def _resealed(base, values: dict, tmp_path: Path, key, version_step: int) -> Path:
    folder = tmp_path / f"resealed{version_step}"
    shutil.copytree(base.root, folder)
    for name in ("manifest.json", "manifest.sig"):
        (folder / name).unlink()
    model = onnx.load(str(folder / "model.onnx"))
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype),
                                                  init.name))
    onnx.save(model, str(folder / "model.onnx"))
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "schema_version")}
    manifest["version"] = base.manifest["version"] + version_step
    manifest["artifact"] = {**manifest["artifact"], "sha256": sha256_file(folder / "model.onnx"),
                            "size": (folder / "model.onnx").stat().st_size}
    seal(folder, manifest, key)
    return pack(folder, tmp_path / f"resealed{version_step}.ekb")


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 12, 16])
def test_codes_pack_and_unpack(bits):
    levels = (1 << (bits - 1)) - 1
    q = np.random.default_rng(bits).integers(-levels, levels + 1, 1001).astype(np.int32)
    assert len(_pack_codes(q, bits)) == (q.size * bits + 7) // 8
    np.testing.assert_array_equal(_unpack_codes(_pack_codes(q, bits), bits, q.size), q)


def test_integer_tensors_are_exact():
    base = np.array([5, -7, 1000, 0], np.int32)
    new = base + np.array([3, 0, -2, 1], np.int32)
    meta, codes = encode(base, new, 1e-3)
    assert meta["bits"] == 3
    np.testing.assert_array_equal(decode(base, meta, codes), new)


def test_make_delta_refuses_other_graphs(releases, tmp_path):
    with pytest.raises(DeltaError, match="more than their weights"):
        make_delta(releases["built"]["v1"], releases["built"]["v2"], tmp_path, releases["key"])


def test_make_delta_refuses_a_downgrade(releases, run_cli, tmp_path):
    """Found by a CLI sweep: BASE and NEW swapped made a delta to an older version, which devices then refuse."""
    res = run_cli("delta", "make", releases["root"] / "adapted.ekb", releases["built"]["v1"], "--out", tmp_path,
                  code=9)
    assert "is not above BASE's" in res.stderr and "--bundle-version" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_delta_make(releases, run_cli, tmp_path):
    res = run_cli("delta", "make", releases["built"]["v1"], releases["root"] / "adapted.ekb", "--out", tmp_path,
                  "--json")
    summary = json.loads(res.stdout)
    assert Path(summary["delta"]).is_file() and summary["tensors"] == len(releases["changed"])


def test_a_release_signed_by_another_key_ships_its_raw_signature(releases, tmp_path):
    """The service signs its jobs' releases with its own key: the delta then carries that public key and the
    signature as 96 raw bytes, and the device rebuilds the signature file byte for byte."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit.delta import S_SIGNATURE_RAW, _split

    other = Ed25519PrivateKey.generate()
    res = make_delta(releases["built"]["v1"], releases["root"] / "adapted.ekb", tmp_path / "out", other)
    sections = {sid: body for sid, _, body in _split(res.delta)}
    assert len(sections[S_SIGNATURE_RAW]) == 96
    _, sig, _, _, _ = read_delta(res.delta, releases["base_root"])
    assert sig == (res.bundle_dir / "manifest.sig").read_bytes()
