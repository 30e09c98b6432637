"""Bad input to `edgekit sync ...` and `edgekit agent ...`: a clear error and an exit code, never a traceback, and
nothing written (no half-made state folder, no token, no uploaded release) when the input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agent_bundles import build_bundles
from tests.sync_server import ADMIN, LiveServer

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, test_models_importable) -> Path:
    return build_bundles(tmp_path_factory.mktemp("badinput-bundles"))["v1"]


@pytest.fixture
def junk(tmp_path) -> Path:
    path = tmp_path / "junk.ekb"
    path.write_bytes(b"not a bundle")
    return path


@pytest.fixture
def no_sync_env(monkeypatch):
    """`sync serve` sets EDGEKIT_SYNC_CONFIG in this process: restore it; no admin token from the environment."""
    monkeypatch.setenv("EDGEKIT_SYNC_CONFIG", "{}")
    monkeypatch.delenv("EDGEKIT_SYNC_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("EDGEKIT_SYNC_SERVER", raising=False)


# -- 1: unreachable or malformed server URLs -------------------------------------------------------------------------
def test_enroll_unreachable_server_is_a_clear_error(run_cli, tmp_path):
    res = run_cli("agent", "enroll", "--server", UNREACHABLE, "--token", "abc", "--state", tmp_path / "s", code=11)
    assert f"cannot reach the sync server {UNREACHABLE}" in res.output


@pytest.mark.parametrize("server", ["notaurl", "ftp://host/x", "http://", "http://host:99999", "http://a b"])
def test_enroll_malformed_url_writes_nothing(run_cli, tmp_path, server):
    res = run_cli("agent", "enroll", "--server", server, "--token", "abc", "--state", tmp_path / "s", code=11)
    assert f"{server!r} is not a sync server URL" in res.output
    assert not (tmp_path / "s").exists()


def test_publish_malformed_url_is_a_clear_error(run_cli, junk, no_sync_env):
    res = run_cli("sync", "publish", junk, "--fleet", "f", "--server", "notaurl", "--admin-token", "x", code=11)
    assert "'notaurl' is not a sync server URL" in res.output


def test_http_call_refuses_a_url_urllib_cannot_use():
    from edgekit.sync.client import SyncClientError, http_call

    with pytest.raises(SyncClientError, match="cannot request 'notaurl/v1/x'"):
        http_call("GET", "notaurl/v1/x", None, {}, 5)


# -- 2: fleet names checked before any request -----------------------------------------------------------------------
@pytest.mark.parametrize("command", [["sync", "token"], ["sync", "status"], ["sync", "jobs"], ["sync", "adapt"]])
def test_bad_fleet_name_is_refused_up_front(run_cli, command, no_sync_env):
    res = run_cli(*command, "--fleet", "a b", "--admin-token", "x", "--server", UNREACHABLE, code=3)
    assert "bad fleet name 'a b'" in res.output and "cannot reach" not in res.output


# -- 3: the service's database ---------------------------------------------------------------------------------------
def test_serve_unknown_database_url_writes_no_token(run_cli, tmp_path, no_sync_env):
    res = run_cli("sync", "serve", "--db", "notadb://x", "--data", tmp_path / "d", code=3)
    assert "cannot use the database notadb://x" in res.output
    assert not (tmp_path / "d" / "admin.token").exists()


def test_serve_unreachable_postgres_hides_the_password(run_cli, tmp_path, no_sync_env):
    res = run_cli("sync", "serve", "--db", "postgresql://u:secret@127.0.0.1:1/db", "--data", tmp_path / "d", code=3)
    assert "cannot use the database postgresql://u:***@127.0.0.1:1/db" in res.output and "secret" not in res.output
    assert not (tmp_path / "d" / "admin.token").exists()


def test_serve_corrupt_sqlite_file_is_named(run_cli, tmp_path, no_sync_env):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sync.db").write_bytes(b"this is not an SQLite database, just some bytes" * 20)
    res = run_cli("sync", "serve", "--data", tmp_path / "d", code=3)
    assert f"cannot use the database sqlite:///{(tmp_path / 'd' / 'sync.db').resolve()}" in res.output
    assert not (tmp_path / "d" / "admin.token").exists()


# -- 4: corrupt agent state files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"{", b"{}", b"\xff\xfe\x00binary", b"[1, 2]", b'{"server": 5}'])
def test_corrupt_enrollment_file_is_a_clear_error(run_cli, tmp_path, content):
    (tmp_path / "s" / "sync").mkdir(parents=True)
    (tmp_path / "s" / "sync" / "sync.json").write_bytes(content)
    res = run_cli("agent", "sync", "--state", tmp_path / "s", "--once", code=10)
    assert "sync.json (this device's enrollment) is corrupt" in res.output and "enroll again" in res.output


def test_corrupt_pending_events_are_set_aside_and_a_corrupt_key_is_a_clear_error(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit.errors import AgentError
    from edgekit.sync.client import SyncClient

    d = tmp_path / "s" / "sync"
    d.mkdir(parents=True)
    (d / "sync.json").write_text(json.dumps({"server": "http://h", "device_id": "x", "fleet": "f",
                                             "metadata_path": "/tuf/f/", "blobs_path": "/v1/blobs/"}))
    (d / "device.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "events.json").write_text("{")
    client = SyncClient(tmp_path / "s")
    assert client._events() == []  # an unattended device goes on syncing without those events
    assert not (d / "events.json").exists() and len(list(d.glob("events.json.corrupt-*"))) == 1
    client._save_events([{"kind": "x"}])
    assert client._events() == [{"kind": "x"}]
    (d / "device.pem").write_text("not a key")
    with pytest.raises(AgentError, match="cannot read this device's key"):
        SyncClient(tmp_path / "s")


@pytest.mark.parametrize("config", ['{"monitor": 5}', '{"probation": []}', "[]", "{"])
def test_corrupt_agent_config_is_a_clear_error(run_cli, tmp_path, config):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(config)
    res = run_cli("agent", "status", "--state", tmp_path / "s", code=3)
    assert "config.json is not a valid agent config" in res.output and "delete it" in res.output


# -- 5: trusted keys checked before they are saved -------------------------------------------------------------------
def test_bad_pubkey_is_not_saved(run_cli, tmp_path, bundle):
    state = tmp_path / "s"
    res = run_cli("agent", "install", bundle, "--state", state, "--pubkey", tmp_path / "nosuch.pub", code=3)
    assert "nosuch.pub does not exist" in res.output
    assert not state.exists()
    run_cli("agent", "install", bundle, "--state", state, "--no-probation")
    saved = (state / "config.json").read_text() if (state / "config.json").exists() else None
    (tmp_path / "notpem.pub").write_text("hello")
    run_cli("agent", "install", bundle, "--state", state, "--pubkey", tmp_path / "notpem.pub", code=3)
    assert ((state / "config.json").read_text() if (state / "config.json").exists() else None) == saved
    run_cli("agent", "status", "--state", state)  # the state still works


def test_pubkey_is_saved_as_an_absolute_path(tmp_path, monkeypatch):
    from edgekit.cli_agent import _open
    from edgekit.keys import generate_keypair

    generate_keypair(tmp_path / "keys", name="k")
    monkeypatch.chdir(tmp_path)
    _open(tmp_path / "s", [Path("keys/k.pub")]).close()
    saved = json.loads((tmp_path / "s" / "config.json").read_text())["trusted_keys"]
    assert saved == [str(tmp_path / "keys" / "k.pub")]


# -- 6: rollout stages checked before the release is uploaded --------------------------------------------------------
@pytest.mark.parametrize("option", [["--stages", "10,50"], ["--stages", "0,100"], ["--stage-minutes", "-5"],
                                    ["--stage-minutes", "nan"]])
def test_publish_bad_rollout_uploads_nothing(run_cli, tmp_path, bundle, option, no_sync_env):
    from edgekit.sync.db import Release

    with LiveServer(tmp_path / "srv") as srv:
        res = run_cli("sync", "publish", bundle, "--fleet", "f", *option, "--server", srv.url, "--admin-token", ADMIN,
                      code=3)
        assert f"bad {option[0]}" in res.output
        with srv.service.sessions() as s:
            assert s.query(Release).count() == 0


# -- 7: the simulator checks its input before it starts anything -----------------------------------------------------
@pytest.mark.parametrize(("option", "message"), [(["--fleet", "a b"], "bad fleet name"),
                                                 (["--stages", "10,50"], "bad --stages 10,50"),
                                                 (["--stage-seconds", "-1"], "bad --stage-seconds"),
                                                 (["--stage-seconds", "nan"], "bad --stage-seconds")])
def test_simulate_bad_options_touch_nothing(run_cli, tmp_path, junk, option, message):
    res = run_cli("sync", "simulate", "--devices", "1", "--base", junk, "--new", junk, "--work", tmp_path / "w",
                  *option, code=3)
    assert message in res.output
    assert not (tmp_path / "w").exists()


def test_simulate_corrupt_bundle_touches_nothing(run_cli, tmp_path, bundle, junk):
    res = run_cli("sync", "simulate", "--devices", "1", "--base", bundle, "--new", junk, "--work", tmp_path / "w",
                  code=9)
    assert "junk.ekb" in res.output
    assert not (tmp_path / "w").exists()


# -- 8: a mistyped --state is not created ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["status", "rollback"])
def test_missing_state_dir_is_an_error_and_not_created(run_cli, tmp_path, command):
    res = run_cli("agent", command, "--state", tmp_path / "nosuch", code=10)
    assert "no agent state in" in res.output
    assert not (tmp_path / "nosuch").exists()


def test_install_of_a_bad_bundle_creates_no_state(run_cli, tmp_path, junk):
    run_cli("agent", "install", tmp_path / "nosuch.ekb", "--state", tmp_path / "a" / "s", code=9)
    run_cli("agent", "install", junk, "--state", tmp_path / "a" / "s", code=9)
    assert not (tmp_path / "a").exists()


# -- 9: jobs of an unknown fleet -------------------------------------------------------------------------------------
def test_jobs_of_unknown_fleet_is_404_like_status(run_cli, tmp_path, no_sync_env):
    with LiveServer(tmp_path / "srv") as srv:
        for command in ("status", "jobs"):
            res = run_cli("sync", command, "--fleet", "nosuch", "--server", srv.url, "--admin-token", ADMIN, code=11)
            assert "HTTP 404" in res.output and "no fleet 'nosuch'" in res.output


# -- fleet assets: a teacher that is no ONNX model, a replay set that is no .npz of arrays -----------------------------
@pytest.mark.parametrize("asset, content, needle", [
    ("teacher", b"\x00garbage, not a protobuf" * 4, "not an ONNX model"),
    ("replay", b"not an npz", "not an .npz of arrays"),
    ("replay", None, "holds no samples"),  # a valid .npz with nothing in it
])
def test_sync_teacher_refuses_assets_the_jobs_could_not_use(run_cli, tmp_path, no_sync_env, asset, content, needle):
    """Found by a CLI sweep: these were stored, and the fleet's adaptation jobs would have failed on them later."""
    import io

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    teacher = tmp_path / "teacher.onnx"
    onnx.save(helper.make_model(graph), str(teacher))
    bad = tmp_path / ("bad.onnx" if asset == "teacher" else "bad.npz")
    if content is None:
        buf = io.BytesIO()
        np.savez(buf)
        content = buf.getvalue()
    bad.write_bytes(content)
    with LiveServer(tmp_path / "srv") as srv:
        args = [bad] if asset == "teacher" else [teacher, "--replay", bad]
        res = run_cli("sync", "teacher", *args, "--fleet", "lab", "--server", srv.url, "--admin-token", ADMIN,
                      code=11)
        assert needle in res.output
        from edgekit.sync.db import Fleet

        with srv.service.sessions() as s:
            fleet = s.get(Fleet, "lab")
            assert fleet is None or getattr(fleet, f"{asset}_sha256") is None
