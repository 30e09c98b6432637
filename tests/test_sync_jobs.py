"""Cloud adaptation jobs (``edgekit.sync.jobs``, ``edgekit.cloud_adapt``) and deltas through the sync service: a
fleet's device serves digits-bn INT8, its inputs shift (contrast), samples are uploaded, a job distills the re-
normalized FP32 teacher into the deployed model and publishes a release with a delta; the device installs the delta
(not the full bundle) and is more accurate on the shifted data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.sync_server import ADMIN, LiveServer

pytestmark = pytest.mark.e2e

CORRUPTION, SEVERITY = "contrast", 5


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sync service (its release key signs the base build), the digits-bn bundle, the FP32 teacher, data."""
    from edgekit import corrupt
    from edgekit.build import BuildRequest, build
    from edgekit.context import Context
    from edgekit.datasets import digits
    from edgekit.export.onnx import export_onnx
    from edgekit.model import load_model
    from edgekit.zoo import get_builtin

    root = tmp_path_factory.mktemp("jobs")
    keys = root / "keys"
    srv = LiveServer(root / "srv", keys=keys)
    srv.service.release_key()  # keys/release.key
    ctx = Context(seed=0)
    built = build(BuildRequest(model="builtin:digits-bn", out=root / "build", precision="int8",
                               measure_latency=False, key=keys / "release.key"), ctx)
    export_onnx(load_model("builtin:digits-bn", ctx=ctx), root / "teacher.onnx")
    pre = get_builtin("digits-bn").preprocessing
    train, _ = digits("train")
    cal, _ = digits("calibration")
    ev, ey = digits("evaluation")
    rng = np.random.default_rng(0)
    stream = pre.apply(corrupt.corrupt(train, CORRUPTION, SEVERITY, seed=11))
    uploads = stream[rng.choice(len(stream), int(0.3 * len(stream)), replace=False)]
    with srv:
        yield {"srv": srv, "bundle": built.archive, "teacher": root / "teacher.onnx", "replay": pre.apply(cal),
               "uploads": uploads, "eval": (pre.apply(corrupt.corrupt(ev, CORRUPTION, SEVERITY, seed=5)), ey),
               "root": root}


@pytest.fixture(scope="module")
def lab(world):
    """Fleet "lab": the base release rolled out, 150 uploads from one device, teacher and replay registered."""
    from edgekit.sync.protocol import RolloutCreate

    svc = world["srv"].service
    with open(world["bundle"], "rb") as f:
        base = svc.publish("lab", f, "digits-bn", str(json.loads(_manifest(world["bundle"]))["version"]))
    svc.start_rollout("lab", RolloutCreate(release_id=base.id, stages=[100], stage_minutes=0))
    tok, _ = svc.enroll_token("lab", 600)
    dev = svc.enroll(tok, "ab" * 32, "lab-1")[0].id
    for i in range(150):
        svc.add_sample(dev, io.BytesIO(_npz(input=world["uploads"][i:i + 1])), {"version": base.version})
    svc.set_fleet_asset("lab", "teacher", io.BytesIO(world["teacher"].read_bytes()))
    svc.set_fleet_asset("lab", "replay", io.BytesIO(_npz(input=world["replay"])))
    return "lab"


def _accuracy(agent, x: np.ndarray, y: np.ndarray) -> float:
    name = agent.model.outputs[0].name
    return float(np.mean([int(np.argmax(agent.infer({"input": x[i:i + 1]})[name])) == y[i] for i in range(len(x))]))


def test_adaptation_job_publishes_a_delta_that_the_device_installs(world, tmp_path, run_cli):
    from edgekit.agent import Agent, AgentConfig
    from edgekit.sync.client import SyncClient
    from edgekit.sync.protocol import AdaptJobCreate, RolloutCreate

    srv, svc = world["srv"], world["srv"].service
    with open(world["bundle"], "rb") as f:
        base = svc.publish("cams", f, "digits-bn", json.loads(_manifest(world["bundle"]))["version"].__str__())
    svc.start_rollout("cams", RolloutCreate(release_id=base.id, stages=[100], stage_minutes=0))
    tok, _ = svc.enroll_token("cams", 600)
    client = SyncClient.enroll(srv.url, tok, tmp_path / "dev", name="cam-1")
    agent = Agent.open(tmp_path / "dev", AgentConfig(adapt=(), adapt_when="never", upload=False))
    try:
        assert client.sync_once(agent)["installed"] == base.version
        assert svc.tick() == {"cams": "completed"}
        x, y = world["eval"]
        before = _accuracy(agent, x, y)
        # the device's uploads (as the agent queues them: an npz of the input, the serving version in meta)
        dev = client.info["device_id"]
        for i in range(len(world["uploads"])):
            svc.add_sample(dev, io.BytesIO(_npz(input=world["uploads"][i:i + 1])), {"version": base.version})
        # no teacher yet: a clear refusal
        res = run_cli("sync", "adapt", "--fleet", "cams", "--server", srv.url, "--admin-token", ADMIN,
                      code=11)
        assert "teacher" in res.stderr.lower()
        run_cli("sync", "teacher", "--fleet", "cams", str(world["teacher"]), "--replay", _replay(world, tmp_path),
                "--server", srv.url, "--admin-token", ADMIN)
        job, created = svc.jobs.create("cams", AdaptJobCreate(rollout=[100], stage_minutes=0))
        assert created
        job = svc.jobs.wait(job.id, timeout=300)
        assert job.status == "succeeded", (job.status, job.error)
        m = job.state["trained"]["metrics"]
        assert m["heldout_kl_after"] < m["heldout_kl_before"] * 0.95
        assert m["heldout_agreement_after"] >= m["heldout_agreement_before"]
        pk = job.state["packaged"]
        assert pk["delta_ratio"] <= 0.01, pk  # the bound: a delta of at most 1 % of the full bundle
        assert pk["check"]["kl"] < m["heldout_kl_before"] * 0.95  # the decoded release still improves
        assert pk["check"]["agreement"] >= m["heldout_agreement_after"] - 0.02
        # the same job again: the same row, nothing new
        again, created = svc.jobs.create("cams", AdaptJobCreate(rollout=[100], stage_minutes=0))
        assert not created and again.id == job.id
        # the rollout the job started; the device installs the delta
        svc.tick()
        out = client.sync_once(agent)
        new_version = job.state["published"]["version"]
        assert out["installed"] == new_version
        events = _events(svc, dev)
        assert any('"via": "delta"' in d for k, d in events if k == "installed"), events
        assert client.downloaded < len(world["bundle"].read_bytes()) * 2  # the base bundle, then only the delta
        after = _accuracy(agent, x, y)
        assert after > before + 0.2, (before, after)  # contrast-5: ~23 % → ~95 %
        # the CLI lists it
        listed = json.loads(run_cli("sync", "jobs", "--fleet", "cams", "--json", "--server", srv.url,
                                    "--admin-token", ADMIN).stdout)
        assert listed[0]["id"] == job.id and listed[0]["status"] == "succeeded"
    finally:
        agent.close()


def test_job_resumes_from_its_last_saved_step(world, lab):
    """A job whose process died after training is taken over once its lease expires, and publishes once."""
    import datetime as dt

    from edgekit.sync.db import Job, Release
    from edgekit.sync.protocol import AdaptJobCreate

    svc = world["srv"].service
    req = AdaptJobCreate(min_samples=8, max_samples=200, config={"steps": 30, "seed": 7})
    job, created = svc.jobs.create(lab, req, start=False)
    assert created and job.status == "queued"
    svc.jobs._claim(job.id)
    svc.jobs._train(svc.jobs._reload(job.id))  # step 1 saved, then the process "dies"
    with svc.sessions.begin() as s:
        row = s.get(Job, job.id)
        assert row.step == "trained" and row.status == "running"
        row.lease_until = row.lease_until - dt.timedelta(hours=1)
    svc.tick()  # the ticker takes over the stale job
    job = svc.jobs.wait(job.id, timeout=300)
    assert job.status in ("succeeded", "rejected"), job.error
    assert job.attempts == 2
    if job.status == "succeeded":
        with svc.sessions() as s:
            rows = s.query(Release).filter(Release.origin == f"job {job.id}").all()
            assert len(rows) == 1 and rows[0].delta_sha256 == job.state["packaged"]["delta"]


def test_job_runs_on_a_local_ray_cluster(world, lab):
    """``--ray``: the training step runs as a Ray task (a local cluster the test starts)."""
    pytest.importorskip("ray")
    from edgekit.sync.jobs import Jobs, RayCompute
    from edgekit.sync.protocol import AdaptJobCreate

    svc = world["srv"].service
    compute = RayCompute("local")
    try:
        jobs = Jobs(svc, compute)
        job, _ = jobs.create(lab, AdaptJobCreate(min_samples=8, config={"steps": 20, "seed": 3}), start=False)
        job = jobs.run(job.id)
        assert job.state["trained"]["compute"] == "ray:local"
        assert job.status in ("succeeded", "rejected")
        jobs.close()
    finally:
        compute.ray.shutdown()


def _manifest(bundle) -> str:
    from edgekit.bundle import read_manifest

    return json.dumps(read_manifest(bundle))


def _replay(world, tmp_path) -> str:
    path = tmp_path / "replay.npz"
    path.write_bytes(_npz(input=world["replay"]))
    return str(path)


def _events(svc, device_id: str) -> list[tuple[str, str]]:
    from edgekit.sync.db import DeviceEvent

    with svc.sessions() as s:
        return [(e.kind, e.detail) for e in s.query(DeviceEvent).filter(DeviceEvent.device_id == device_id).all()]
