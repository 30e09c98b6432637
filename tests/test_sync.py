"""The sync service end to end: a live server, the CLI, a real agent enrolling, installing staged releases,
rollouts gated on telemetry (abort and rollback), resumable verified downloads, quotas and clear 4xx errors."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from edgekit.sync.auth import device_id_for as auth_device_id
from edgekit.sync.client import SyncClient, SyncClientError
from tests.agent_bundles import build_bundles, inputs
from tests.sync_pg import drop_database, fresh_database, pg_server  # noqa: F401 - a fixture
from tests.sync_server import ADMIN, LiveServer


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, test_models_importable):
    return build_bundles(tmp_path_factory.mktemp("sync-bundles"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """The service's tests run on both databases: SQLite (embedded) and a real PostgreSQL (tests/sync_pg.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sync.db'}"
        return
    url = fresh_database(request.getfixturevalue("pg_server").url)
    yield url
    drop_database(url)


def _agent(state):
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.probation import ProbationConfig

    return Agent.open(state, AgentConfig(adapt_when="never", probation=ProbationConfig(requests=10)))


def _req(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_walkthrough_enroll_publish_stage_install(bundles, tmp_path, run_cli):
    """The README's walkthrough: serve, token, enroll, publish (staged), the agent installs; then v2 replaces v1
    after its probation."""
    with LiveServer(tmp_path / "server") as srv:
        common = ["--server", srv.url, "--admin-token", ADMIN]
        token = run_cli("sync", "token", "--fleet", "cameras", *common).stdout.strip()
        state = tmp_path / "device"
        run_cli("agent", "enroll", "--server", srv.url, "--token", token, "--state", state, "--name", "cam-1")
        run_cli("agent", "enroll", "--server", srv.url, "--token", token, "--state", tmp_path / "other", code=11)
        out = run_cli("sync", "publish", bundles["v1"], "--fleet", "cameras", "--stages", "1,10,50,100",
                      "--stage-minutes", "0", *common).stdout
        assert "rollout 1" in out and "signed as TUF target" in out
        client = SyncClient(state)
        agent = _agent(state)
        # a one-device fleet: the device's cohort is targeted only from some stage on; the gates need no reports
        # from stages that target nobody, so each tick advances until it is in
        for _ in range(5):
            res = client.sync_once(agent)
            if res["installed"]:
                break
            srv.service.tick()
        assert res["installed"] == "1" and agent.status()["model"]["version"] == 1
        for x in inputs(20, seed=3):
            agent.infer({"input": x[None]})
        assert client.sync_once(agent)["version"] == "1"
        for _ in range(4):  # a healthy report on the new release: every remaining stage passes, one per tick
            if srv.service.tick() == {"cameras": "completed"}:
                break
        st = json.loads(run_cli("sync", "status", "--fleet", "cameras", "--json", *common).stdout)
        assert st["rollout"]["status"] == "completed" and st["current_release"]["version"] == "1"
        assert st["devices"][0]["name"] == "cam-1" and st["devices"][0]["version"] == "1" and st["devices"][0]["online"]
        human = run_cli("sync", "status", "--fleet", "cameras", *common).stdout
        assert "completed" in human and "cam-1" in human

        run_cli("sync", "publish", bundles["v2"], "--fleet", "cameras", "--stages", "100", "--stage-minutes", "0",
                *common)
        assert client.sync_once(agent)["installed"] == "2"
        for x in inputs(12, seed=4):  # the probation: 10 shadowed requests, then commit
            agent.infer({"input": x[None]})
        assert agent.status()["slots"]["probation"] is None and agent.status()["model"]["version"] == 2
        client.sync_once(agent)
        srv.service.tick()
        st = json.loads(run_cli("sync", "status", "--fleet", "cameras", "--json", *common).stdout)
        assert st["current_release"]["version"] == "2" and st["versions"] == {"2": 1}
        agent.close()


def test_migrations_match_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from edgekit.sync.db import Base, make_engine, migrate

    engine = make_engine(db_url)
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert MigrationContext.configure(conn).get_current_revision() == "0002"
    engine.dispose()


def test_gates_abort_and_roll_back(bundles, tmp_path, db_url):
    """A release whose devices report a high error rate is aborted; every device is told to go back."""
    from edgekit.sync.protocol import Heartbeat, RolloutCreate
    from edgekit.sync.service import Service, ServiceConfig

    svc = Service(ServiceConfig(db=db_url, store=str(tmp_path / "blobs"), keys=tmp_path / "keys", admin_token=ADMIN))
    with open(bundles["v1"], "rb") as f:
        r1 = svc.publish("f", f, "tiny", "1")
    with open(bundles["v2"], "rb") as f:
        r2 = svc.publish("f", f, "tiny", "2")
    devices = []
    for i in range(40):
        tok, _ = svc.enroll_token("f", 600)
        pub = f"{i:064x}"
        devices.append(svc.enroll(tok, pub, f"d{i}")[0].id)
    svc.start_rollout("f", RolloutCreate(release_id=r1.id, stages=[100], stage_minutes=0))
    for d in devices:
        svc.heartbeat(d, Heartbeat(version="1", telemetry={"requests": 100, "latency_p90_ms": 5.0}))
    assert svc.tick() == {"f": "completed"}
    svc.start_rollout("f", RolloutCreate(release_id=r2.id, stages=[25, 100], stage_minutes=0))
    from edgekit.sync.db import Device, Rollout

    with svc.sessions() as s:
        wanted = {d: svc.desired(s, s.get(Device, d)) for d in devices}
    in_stage = [d for d, w in wanted.items() if w.version == "2"]
    assert 2 <= len(in_stage) <= 20 and all(w.version in ("1", "2") for w in wanted.values())
    for d in in_stage:  # the new release fails a quarter of its requests
        svc.heartbeat(d, Heartbeat(version="2", telemetry={"requests": 100, "errors": 25, "latency_p90_ms": 5.0}))
    assert svc.tick() == {"f": "aborted"}
    with svc.sessions() as s:
        assert all(svc.desired(s, s.get(Device, d)).version == "1" for d in devices)  # everyone back on 1
        r = s.query(Rollout).order_by(Rollout.id.desc()).first()
        assert r.status == "aborted" and "error rate 25.0%" in r.reason
    svc.engine.dispose()


def test_stage_timeout_aborts(bundles, tmp_path, db_url):
    import datetime as dt

    from edgekit.sync.db import utcnow
    from edgekit.sync.protocol import RolloutCreate
    from edgekit.sync.service import Service, ServiceConfig

    svc = Service(ServiceConfig(db=db_url, store=str(tmp_path / "blobs"), keys=tmp_path / "keys"))
    with open(bundles["v1"], "rb") as f:
        r1 = svc.publish("f", f, "tiny", "1")
    tok, _ = svc.enroll_token("f", 600)
    svc.enroll(tok, "ab" * 32, "silent")
    svc.start_rollout("f", RolloutCreate(release_id=r1.id, stages=[100], stage_minutes=0, stage_timeout_minutes=30))
    assert svc.tick() == {"f": "waiting"}  # the device never reports
    assert svc.tick(utcnow() + dt.timedelta(minutes=31)) == {"f": "aborted"}
    # an idle device (no requests yet) that heartbeats on the new release lets a stage pass
    from edgekit.sync.protocol import Heartbeat

    svc.start_rollout("f", RolloutCreate(release_id=r1.id, stages=[100], stage_minutes=0))
    svc.heartbeat(auth_device_id("ab" * 32), Heartbeat(version="1"))
    assert svc.tick() == {"f": "completed"}
    svc.engine.dispose()


def test_resumable_verified_download_and_refusals(bundles, tmp_path, db_url):
    with LiveServer(tmp_path / "server", db=db_url) as srv:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        blob = bundles["v1"].read_bytes()
        status, body = _req(f"{srv.url}/v1/fleets/f/releases?name=tiny&version=1", "POST", blob,
                            {**admin, "Content-Type": "application/octet-stream"})
        assert status == 200
        rel = json.loads(body)
        tok = srv.service.enroll_token("f", 600)[0]
        client = SyncClient.enroll(srv.url, tok, tmp_path / "dev")
        from edgekit.sync.protocol import Desired

        desired = Desired(release_id=rel["id"], name="tiny", version="1", target=rel["target"], sha256=rel["sha256"],
                          size=rel["size"])
        part = tmp_path / "dl" / f"{rel['sha256']}.part"
        part.parent.mkdir()
        part.write_bytes(blob[: len(blob) // 2])  # an interrupted download
        path = client.download(desired, tmp_path / "dl")
        assert path.read_bytes() == blob and not part.exists()
        # a server naming a hash its signed TUF metadata does not have is refused
        bad = desired.model_copy(update={"sha256": "0" * 64})
        with pytest.raises(SyncClientError, match="signed metadata"):
            client.download(bad, tmp_path / "dl2")
        # a corrupted partial download fails verification and is not installed
        (tmp_path / "dl3").mkdir()
        (tmp_path / "dl3" / f"{rel['sha256']}.part").write_bytes(b"\0" * rel["size"])
        from edgekit.sync.tuf_client import TufRefused

        with pytest.raises(TufRefused):
            client.download(desired, tmp_path / "dl3")
        # device token of fleet f cannot read another fleet's metadata; no token: 401; traversal: 404
        tok_g = srv.service.enroll_token("g", 600)[0]
        other = SyncClient.enroll(srv.url, tok_g, tmp_path / "dev-g")
        h = {"Authorization": f"Bearer {other._auth()}"}
        assert _req(f"{srv.url}/tuf/f/timestamp.json", headers=h)[0] == 403
        assert _req(f"{srv.url}/v1/blobs/{rel['sha256']}", headers=h)[0] == 404  # not a release of its fleet
        assert _req(f"{srv.url}/tuf/f/timestamp.json")[0] == 401
        assert _req(f"{srv.url}/tuf/g/..%2F..%2Fetc%2Fpasswd", headers=h)[0] in (404, 422)
        assert _req(f"{srv.url}/v1/blobs/..%2F..%2Fetc%2Fpasswd", headers=h)[0] == 404
        # malformed bodies and bad ranges: 4xx with a JSON error
        status, body = _req(f"{srv.url}/v1/heartbeat", "POST", b"{not json", {**h, "Content-Type": "application/json"})
        assert status == 422 and "error" in json.loads(body)
        h_f = {"Authorization": f"Bearer {client._auth()}"}
        assert _req(f"{srv.url}/v1/blobs/{rel['sha256']}", headers={**h_f, "Range": "bytes=99999999-"})[0] == 416
        assert _req(f"{srv.url}/v1/blobs/{rel['sha256']}", headers={**h_f, "Range": "bytes=0-9"}) == (206, blob[:10])


def test_sample_uploads_quota_and_oversize(bundles, tmp_path):
    with LiveServer(tmp_path / "server", max_sample_bytes=4000, sample_bytes_per_day=10000) as srv:
        tok = srv.service.enroll_token("f", 600)[0]
        client = SyncClient.enroll(srv.url, tok, tmp_path / "dev")
        h = {"Authorization": f"Bearer {client._auth()}", "Content-Type": "application/octet-stream"}
        assert _req(f"{srv.url}/v1/samples", "POST", b"x" * 5000, h)[0] == 413  # over the per-sample limit
        codes = [_req(f"{srv.url}/v1/samples", "POST", np.full(3000, i, np.uint8).tobytes(), h)[0] for i in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[-1] == 429  # 10 kB a day
        admin = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"}
        status, body = _req(f"{srv.url}/v1/fleets/f/releases?name=x&version=1", "POST", b"y" * 100,
                            {"Authorization": "Bearer wrong"})
        assert status == 401 and json.loads(body)["error"]
        assert _req(f"{srv.url}/v1/fleets/f/releases?name=x&version=..%2Fetc", "POST", b"y", admin)[0] == 422


def test_sync_serve_command_starts_embedded(tmp_path):
    """`edgekit sync serve` with nothing set up: SQLite and blobs in the data folder, an admin token written 0600,
    the OpenAPI spec served; a second start reuses the token."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.sync_server import free_port

    def start():
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "EDGEKIT_SYNC_ADMIN_TOKEN"}
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "sync", "serve", "--data", str(tmp_path / "d"),
                                 "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _req(f"http://127.0.0.1:{port}/health")[0] == 200:
                    return proc, port
            except OSError:
                time.sleep(0.2)
        proc.kill()
        raise AssertionError(proc.communicate()[1])

    proc, port = start()
    try:
        token_file = tmp_path / "d" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        status, spec = _req(f"http://127.0.0.1:{port}/openapi.json")
        assert status == 200 and "/v1/heartbeat" in json.loads(spec)["paths"]
        assert _req(f"http://127.0.0.1:{port}/v1/fleets/x/tokens", "POST", b'{"ttl_s": 600}',
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})[0] == 200
        assert (tmp_path / "d" / "sync.db").exists() and (tmp_path / "d" / "keys" / "root.pem").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "admin token" in err and "Traceback" not in err
    proc, port = start()  # the same data folder: same token, schema already migrated
    try:
        assert _req(f"http://127.0.0.1:{port}/v1/fleets/x", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "admin token" not in err and "Traceback" not in err


def test_two_replicas_share_one_postgres(bundles, tmp_path, request):
    """Stateless replicas: two service instances on one PostgreSQL, one blob store and one set of keys. A device
    enrolled through one is served by the other; a release published through one is signed metadata on both."""
    url = fresh_database(request.getfixturevalue("pg_server").url)
    try:
        shared = {"db": url, "store": str(tmp_path / "blobs"), "keys": tmp_path / "keys"}  # S3 in production
        with LiveServer(tmp_path / "a", **shared) as a, LiveServer(tmp_path / "b", **shared) as b:
            tok = a.service.enroll_token("f", 600)[0]
            client = SyncClient.enroll(a.url, tok, tmp_path / "dev")
            blob = bundles["v1"].read_bytes()
            status, body = _req(f"{b.url}/v1/fleets/f/releases?name=tiny&version=1", "POST", blob,
                                {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"})
            assert status == 200, body
            rel = json.loads(body)
            body = json.dumps({"release_id": rel["id"], "stages": [100]}).encode()
            assert _req(f"{a.url}/v1/fleets/f/rollouts", "POST", body,
                        {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})[0] == 200
            client.server = b.url  # the device's next requests land on the other replica
            hb = client.heartbeat(None, {"requests": 0}, [])
            assert hb.desired is not None and hb.desired.sha256 == rel["sha256"]
            assert client.download(hb.desired, tmp_path / "dl").read_bytes() == blob
    finally:
        drop_database(url)


def test_client_retries_with_backoff_and_jitter_then_resumes(bundles, tmp_path):
    """An unreachable server: the client retries with exponential backoff and full jitter, then gives up with a clear
    error; events wait on disk and reach the server with the next heartbeat that gets through."""
    with LiveServer(tmp_path / "server") as srv:
        tok = srv.service.enroll_token("f", 600)[0]
        SyncClient.enroll(srv.url, tok, tmp_path / "dev")
        client = SyncClient(tmp_path / "dev")
        client._auth()
    delays: list[float] = []
    client = SyncClient(tmp_path / "dev", attempts=4, backoff=0.5, sleep=delays.append)
    client._token = ("stale", 1e12)  # skip authentication: the heartbeat itself must retry
    client._queue_event({"kind": "install_failed", "version": "9", "detail": "disk full"})
    with pytest.raises(SyncClientError, match="after 4 attempts"):
        client.heartbeat(None, {"requests": 1}, client._events())
    assert len(delays) == 3 and all(0 <= d <= 0.5 * 2 ** i for i, d in enumerate(delays))
    assert client._events()[0]["detail"] == "disk full"  # still queued
    with LiveServer(tmp_path / "server") as srv:  # the server is back (same data, new port)
        client.server = srv.url
        client._token = None
        client.heartbeat(None, {"requests": 1}, client._events())
        with srv.service.sessions() as s:
            from edgekit.sync.db import DeviceEvent

            assert [e.detail for e in s.query(DeviceEvent).all()] == ["disk full"]


@pytest.mark.e2e
def test_agent_run_syncs_in_the_background(bundles, tmp_path, run_cli):
    """`edgekit agent run` on an enrolled state installs the fleet's desired release by itself and reports it."""
    import subprocess
    import sys
    import time

    from tests.sync_server import free_port

    with LiveServer(tmp_path / "server") as srv:
        common = ["--server", srv.url, "--admin-token", ADMIN]
        token = run_cli("sync", "token", "--fleet", "cameras", *common).stdout.strip()
        state = tmp_path / "device"
        run_cli("agent", "enroll", "--server", srv.url, "--token", token, "--state", state)
        run_cli("sync", "publish", bundles["v1"], "--fleet", "cameras", "--stages", "100", "--stage-minutes", "0",
                *common)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "agent", "run", "--state", str(state),
                                 "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline, version = time.monotonic() + 90, None
            while time.monotonic() < deadline and version != 1:
                time.sleep(0.5)
                try:
                    status, body = _req(f"http://127.0.0.1:{port}/status")
                except OSError:
                    continue
                model = json.loads(body).get("model") if status == 200 else None
                version = model and model.get("version")
            assert version == 1, "the agent did not install the published release"
            x = inputs(1, seed=5)
            status, body = _req(f"http://127.0.0.1:{port}/infer", "POST",
                                json.dumps({"inputs": {"input": x.tolist()}}).encode(),
                                {"Content-Type": "application/json"})
            assert status == 200, body
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
        assert "syncing with the enrolled server" in err and "Traceback" not in err
        st = json.loads(run_cli("sync", "status", "--fleet", "cameras", "--json", *common).stdout)
        assert st["devices"][0]["version"] == "1"


def test_a_network_failure_never_refuses_a_release(bundles, tmp_path, monkeypatch):
    """A download cut on every retry (or release metadata that cannot be fetched) is the network, not the release:
    the device neither refuses it nor reports an install failure, and installs it at the next sync."""
    from edgekit.sync.client import SyncUnreachable
    from edgekit.sync.protocol import RolloutCreate
    from edgekit.sync.tuf_client import TufUnreachable

    with LiveServer(tmp_path / "server") as srv:
        svc = srv.service
        with open(bundles["v1"], "rb") as f:
            r1 = svc.publish("f", f, "tiny", "1")
        svc.start_rollout("f", RolloutCreate(release_id=r1.id, stages=[100], stage_minutes=0))
        tok, _ = svc.enroll_token("f", 600)
        client = SyncClient.enroll(srv.url, tok, tmp_path / "dev")
        agent = _agent(tmp_path / "dev")
        try:
            real = client.download
            for err in (SyncUnreachable("cut 5 times"), TufUnreachable("fetching the root failed")):
                monkeypatch.setattr(client, "download", lambda *a, _e=err, **k: (_ for _ in ()).throw(_e))
                out = client.sync_once(agent)
                assert out["installed"] is None and client.info.get("refused", []) == []
                assert client._events() == []  # no install_failed event
            monkeypatch.setattr(client, "download", real)
            assert client.sync_once(agent)["installed"] == "1"
        finally:
            agent.close()
