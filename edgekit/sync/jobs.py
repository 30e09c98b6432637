"""Cloud jobs of the sync service: adaptation from uploaded samples to a published release and its delta.

A job is a row of the ``jobs`` table (``edgekit.sync.db.Job``) and moves through saved steps; each step's output is
written in the same transaction that records the step, so a job interrupted anywhere (a crash, a restart, a lost Ray
worker) resumes from its last saved step and never publishes twice:

1. ``trained``: ``edgekit.cloud_adapt.adapt`` on the base release's model, the fleet's teacher and replay set, and the
   samples its devices uploaded while serving the base release; saves the per-channel scale/shift and the metrics.
   This is the compute, and the only step that goes to Ray with ``--ray`` (a task that receives every input as bytes
   and returns plain data, so any worker can run it); in-process otherwise.
2. ``packaged``: the base bundle with the correction written into its int8 graph (``normtable.overrides``), sealed
   with the service's release key, then ``edgekit.delta.make_delta`` against the base: the result bundle and the
   delta, both stored as blobs. The decoded result (what devices will run) must itself pass the publish rule on the
   held-out uploads (``decoded_ok``); while the delta's rounding breaks it, the delta is made again at a quarter of
   the error bound (4 tries, then the job is rejected).
3. ``published``: the release and its delta become TUF targets (the delta's custom metadata names its base); with
   ``rollout`` set, a staged rollout starts.

A job whose held-out evaluation shows no improvement ends ``rejected`` after step 1: nothing is published.

Idempotent: a job's ``key`` is the hash of what defines its result (fleet, base release, teacher, replay set, the
samples, the parameters); creating the same job again returns the existing one. A job left ``running`` by a process
that died is taken over once its lease expires (``Jobs.resume``, called by the service's ticker).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from edgekit.sync.db import Device, Fleet, Job, Release, Sample, utcnow
from edgekit.sync.protocol import AdaptJobCreate, RolloutCreate

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=10)
BOUND_TRIES = 4  # delta error bounds tried: the job's, then each a quarter of the one before
DONE = ("succeeded", "rejected", "failed")


def _blob(svc, sha: str) -> bytes:  # noqa: ANN001 - Service
    return b"".join(svc.store.open_range(sha))


def train_task(inputs: dict) -> dict:
    """Step 1's compute, from bytes to plain data: runs in this process or as a Ray task."""
    import numpy as np

    from edgekit.agent.normtable import NormLayer
    from edgekit.cloud_adapt import AdaptJobConfig, adapt, stack_samples

    layers = [NormLayer.from_dict(d) for d in json.loads(inputs["adapt"])["layers"]]
    x = stack_samples(inputs["samples"], inputs["input_name"])
    replay = None
    if inputs.get("replay"):
        with np.load(io.BytesIO(inputs["replay"]), allow_pickle=False) as z:
            replay = np.asarray(z[inputs["input_name"]] if inputs["input_name"] in z.files else z[z.files[0]],
                                np.float32)
    out = adapt(inputs["model"], layers, inputs["teacher"], x, replay, AdaptJobConfig(**inputs["config"]))
    return {"scale": {k: v.tolist() for k, v in out.scale.items()},
            "shift": {k: v.tolist() for k, v in out.shift.items()}, "improved": out.improved,
            "metrics": {k: v for k, v in out.metrics.items() if k != "config"},
            "heldout_teacher_logits": np.round(out.heldout_teacher_logits, 5).tolist()}


class LocalCompute:
    name = "in-process"

    def run(self, fn, inputs: dict) -> dict:  # noqa: ANN001
        return fn(inputs)


class RayCompute:
    """Step 1 on a Ray cluster: ``address`` as ``ray.init`` takes it ("auto", "ray://host:10001"), or "local" for a
    cluster started in this process."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError as exc:
            from edgekit.errors import ConfigError

            raise ConfigError("--ray needs the ray package", hint="pip install 'edgekit[cloud]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="edgekit")
            else:
                ray.init(address=address, namespace="edgekit", log_to_driver=False)
        self.name = f"ray:{address}"
        self._remote = {}

    def run(self, fn, inputs: dict) -> dict:  # noqa: ANN001
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = self.ray.remote(num_cpus=1, max_retries=2)(fn)
        return self.ray.get(task.remote(inputs))


class Jobs:
    def __init__(self, svc, compute=None) -> None:  # noqa: ANN001 - Service
        self.svc = svc
        self.compute = compute or (RayCompute(svc.cfg.ray) if svc.cfg.ray else LocalCompute())
        self.owner = f"{self.compute.name}:{id(self):x}"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-job")
        self._running: set[int] = set()
        self._lock = threading.Lock()

    # -- creating ---------------------------------------------------------------------------------------------------
    def create(self, fleet: str, req: AdaptJobCreate, *, start: bool = True) -> tuple[Job, bool]:
        """The job for ``req`` (an existing one with the same key, or a new one); ``(job, created)``."""
        from edgekit.sync.service import SyncError

        with self.svc.sessions.begin() as s:
            f = s.get(Fleet, fleet)
            if f is None:
                raise SyncError(f"no fleet {fleet!r}", 404)
            if not f.teacher_sha256:
                raise SyncError(f"fleet {fleet!r} has no teacher model", 409,
                                hint="register one: edgekit sync teacher --fleet NAME MODEL.onnx [--replay X.npz]")
            base_id = req.release_id or f.current_release
            if base_id is None:  # the first rollout is still going: its release
                from edgekit.sync.rollout import latest_rollout

                r = latest_rollout(s, fleet)
                base_id = r.release_id if r is not None and r.status == "active" else None
            base = s.get(Release, base_id) if base_id else None
            if base is None or base.fleet != fleet:
                raise SyncError(f"fleet {fleet!r} has no release {base_id} to adapt", 404,
                                hint="publish and roll out a release first, or pass release_id")
            stmt = (select(Sample.id, Sample.sha256).join(Device, Device.id == Sample.device_id)
                    .where(Device.fleet == fleet).order_by(Sample.id.desc()))
            rows = [(i, h) for i, h, m in s.execute(stmt.add_columns(Sample.meta)).all()
                    if str((m or {}).get("version")) == base.version][: req.max_samples]
            if len(rows) < req.min_samples:
                raise SyncError(f"fleet {fleet!r} has {len(rows)} samples uploaded from release {base.version}; the "
                                f"job needs at least {req.min_samples}", 409, hint="wait for more uploads")
            params = {"release_id": base.id, "samples": sorted(h for _, h in rows), "teacher": f.teacher_sha256,
                      "replay": f.replay_sha256, **req.model_dump(exclude={"release_id"})}
            key = hashlib.sha256(json.dumps(["adapt", fleet, params], sort_keys=True).encode()).hexdigest()
            job = s.scalars(select(Job).where(Job.key == key)).first()
            created = job is None
            if created:
                now = utcnow()
                try:
                    with s.begin_nested():  # the same job asked for twice at once: one row
                        job = Job(fleet=fleet, kind="adapt", key=key, params=params, status="queued", step="",
                                  state={}, error="", attempts=0, runner="", created_at=now, updated_at=now)
                        s.add(job)
                        s.flush()
                except IntegrityError:
                    job, created = s.scalars(select(Job).where(Job.key == key)).one(), False
            job_id = job.id
        if start and created:
            self.start(job_id)
        with self.svc.sessions() as s:
            return s.get(Job, job_id), created

    def start(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._running:
                return
            self._running.add(job_id)
        self._pool.submit(self._run_logged, job_id)

    def resume(self, now: dt.datetime | None = None) -> list[int]:
        """Start every queued job, and every running one whose lease expired (its process died)."""
        now = now or utcnow()
        with self.svc.sessions() as s:
            ids = s.scalars(select(Job.id).where(Job.status.in_(("queued", "running")))).all()
            stale = [j.id for j in (s.get(Job, i) for i in ids)
                     if j.status == "queued" or j.lease_until is None or j.lease_until < now]
        for job_id in stale:
            self.start(job_id)
        return stale

    def wait(self, job_id: int, timeout: float = 600.0) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            with self.svc.sessions() as s:
                job = s.get(Job, job_id)
            if job.status in DONE or time.monotonic() > deadline:
                return job
            time.sleep(0.2)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- running ----------------------------------------------------------------------------------------------------
    def _run_logged(self, job_id: int) -> None:
        try:
            self.run(job_id)
        except Exception:  # noqa: BLE001 - recorded on the job; the worker thread lives on
            log.exception("job %s failed", job_id)
        finally:
            with self._lock:
                self._running.discard(job_id)

    def _claim(self, job_id: int) -> Job | None:
        now = utcnow()
        with self.svc.sessions.begin() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in DONE:
                return None
            if job.status == "running" and job.lease_until and job.lease_until > now and job.runner != self.owner:
                return None  # another replica holds it
            job.status, job.runner, job.lease_until = "running", self.owner, now + LEASE
            job.attempts += 1
            job.updated_at = now
            return job

    def _save(self, job_id: int, step: str, output: dict, *, status: str = "running", error: str = "",
              extra=None) -> None:  # noqa: ANN001 - a callback run in the same transaction
        with self.svc.sessions.begin() as s:
            job = s.get(Job, job_id, with_for_update=True)
            job.state = {**job.state, step: output}
            job.step, job.status, job.error, job.updated_at = step, status, error[:1000], utcnow()
            job.lease_until = utcnow() + LEASE if status == "running" else None
            if extra is not None:
                extra(s, job)

    def run(self, job_id: int) -> Job | None:
        """Run ``job_id``'s remaining steps here; returns the job as it ended (None: not ours to run)."""
        job = self._claim(job_id)
        if job is None:
            return None
        try:
            if job.step == "":
                self._train(job)
                job = self._reload(job_id)
            if job.step == "trained" and job.status == "running":
                self._package(job)
                job = self._reload(job_id)
            if job.step == "packaged" and job.status == "running":
                self._publish(job)
        except Exception as exc:
            from edgekit.errors import EdgekitError

            message = exc.message if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
            with self.svc.sessions.begin() as s:
                row = s.get(Job, job_id, with_for_update=True)
                row.status, row.error, row.updated_at, row.lease_until = "failed", message[:1000], utcnow(), None
            raise
        return self._reload(job_id)

    def _reload(self, job_id: int) -> Job:
        with self.svc.sessions() as s:
            return s.get(Job, job_id)

    def _base(self, job: Job) -> Release:
        with self.svc.sessions() as s:
            return s.get(Release, job.params["release_id"])

    def _train(self, job: Job) -> None:
        from edgekit.bundle import open_bundle

        p = job.params
        base = self._base(job)
        with tempfile.TemporaryDirectory(prefix="edgekit-job-") as tmp:
            bundle = Path(tmp) / "base.ekb"
            bundle.write_bytes(_blob(self.svc, base.sha256))
            opened = open_bundle(bundle, workdir=Path(tmp) / "base")
            adapt_file = opened.root / "adapt.json"
            if not adapt_file.is_file():
                from edgekit.errors import ConfigError

                raise ConfigError(f"release {base.version} has no adapt.json: nothing the job can adapt")
            inputs = {"model": opened.path(opened.manifest["artifact"]["path"]).read_bytes(),
                      "adapt": adapt_file.read_text(), "teacher": _blob(self.svc, p["teacher"]),
                      "replay": _blob(self.svc, p["replay"]) if p.get("replay") else None,
                      "samples": [_blob(self.svc, h) for h in p["samples"]],
                      "input_name": opened.manifest["inputs"][0]["name"], "config": p["config"]}
        t0 = time.perf_counter()
        out = self.compute.run(train_task, inputs)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["compute"] = self.compute.name
        if out["improved"]:
            self._save(job.id, "trained", out)
        else:
            self._save(job.id, "trained", out, status="rejected",
                       error="no improvement on the held-out uploads: nothing published")

    def _package(self, job: Job) -> None:
        from edgekit.bundle import open_bundle
        from edgekit.delta import make_delta

        trained = job.state["trained"]
        base = self._base(job)
        key = self.svc.release_key()
        with tempfile.TemporaryDirectory(prefix="edgekit-job-") as tmp:
            work = Path(tmp)
            (work / "base.ekb").write_bytes(_blob(self.svc, base.sha256))
            opened = open_bundle(work / "base.ekb", workdir=work / "base")
            version = str(max(int(base.version) + 1 if base.version.isdigit() else 0, int(time.time())))
            adapted = _adapted_bundle(opened, trained, version, work / "adapted", key, job)
            # the coarsest error bound whose decoded release still predicts like the trained one (the delta's
            # rounding is part of the release): the bound asked for, then tighter ones
            bound = job.params["delta_error_bound"]
            for attempt in range(BOUND_TRIES):
                res = make_delta(work / "base.ekb", adapted, work / f"release{attempt}", key, error_bound=bound)
                check = {**_check_decoded(self.svc, opened, res.bundle_dir, trained, job), "error_bound": bound}
                if decoded_ok(check, trained, job.params):
                    break
                bound /= 4
            else:
                self._save(job.id, "packaged", {"check": check}, status="rejected",
                           error=f"even at error bound {check['error_bound']:.1e} the delta's rounding lost the "
                                 f"improvement (held-out KL {check['kl']:.4f}, agreement {check['agreement']:.1%})")
                return
            with res.archive.open("rb") as f:
                bsha, bsize = self.svc.store.put_stream(f, max_bytes=self.svc.cfg.max_bundle_bytes)
            with res.delta.open("rb") as f:
                dsha, dsize = self.svc.store.put_stream(f, max_bytes=self.svc.cfg.max_bundle_bytes)
        stats = {k: v for k, v in res.stats.items() if k != "bits"}
        self._save(job.id, "packaged", {"version": version, "name": opened.manifest["name"], "bundle": bsha,
                                        "bundle_size": bsize, "delta": dsha, "delta_size": dsize,
                                        "delta_ratio": dsize / bsize, "delta_stats": stats, "check": check,
                                        "bits": {k: int(v) for k, v in res.stats["bits"].items()}})

    def _publish(self, job: Job) -> None:
        pk = job.state["packaged"]

        def record(s, release) -> None:  # noqa: ANN001 - in the publish transaction
            row = s.get(Job, job.id, with_for_update=True)
            row.state = {**row.state, "published": {"release_id": release.id, "version": release.version}}
            row.step, row.status, row.updated_at, row.lease_until = "published", "succeeded", utcnow(), None

        release = self.svc.publish(job.fleet, io.BytesIO(_blob(self.svc, pk["bundle"])), pk["name"], pk["version"],
                                   delta=io.BytesIO(_blob(self.svc, pk["delta"])),
                                   base_release_id=job.params["release_id"], origin=f"job {job.id}",
                                   on_commit=record)
        stages = job.params.get("rollout")
        if stages:
            self.svc.start_rollout(job.fleet, RolloutCreate(release_id=release.id, stages=stages,
                                                            stage_minutes=job.params["stage_minutes"]))


def _adapted_bundle(opened, trained: dict, version: str, folder: Path, key, job: Job) -> Path:  # noqa: ANN001
    """The base bundle with the trained correction written into its graph, sealed with the service's key."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgekit.agent.normtable import initial_values, load_table, overrides
    from edgekit.bundle import pack, seal
    from edgekit.fsutil import sha256_file

    shutil.copytree(opened.root, folder)
    for name in ("manifest.json", "manifest.sig"):
        (folder / name).unlink()
    art = opened.manifest["artifact"]["path"]
    model = onnx.load(str(folder / art))
    layers = load_table(folder / "adapt.json")
    values = overrides(layers, initial_values(model, layers),
                       {k: np.asarray(v) for k, v in trained["scale"].items()},
                       {k: np.asarray(v) for k, v in trained["shift"].items()})
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype),
                                                  init.name))
    (folder / art).write_bytes(model.SerializeToString(deterministic=True))
    manifest = {k: v for k, v in opened.manifest.items() if k not in ("files", "schema_version")}
    manifest["version"] = int(version)
    m = trained["metrics"]
    # what the device's probation should expect: this release disagrees with its base where the base was wrong
    # (kept to one number: the manifest travels in every delta, where a 48 KB model leaves 480 bytes for 1 %)
    manifest["adaptation"] = {"expected_agreement": round(float(m["heldout_agreement_base_after"]), 3)}
    manifest["artifact"] = {**manifest["artifact"], "sha256": sha256_file(folder / art),
                            "size": (folder / art).stat().st_size}
    seal(folder, manifest, key)
    return pack(folder, folder.parent / "adapted.ekb")


def _check_decoded(svc, opened, result_dir: Path, trained: dict, job: Job) -> dict:  # noqa: ANN001
    """The decoded release (what devices will run) on the job's held-out uploads against the adapted teacher's
    outputs there: KL and top-1 agreement, next to the trained student's (``cloud_adapt.heldout_metrics``)."""
    import numpy as np

    from edgekit.agent.runtime import OrtRuntime
    from edgekit.cloud_adapt import heldout_metrics, split, stack_samples

    name = opened.manifest["inputs"][0]["name"]
    x = stack_samples([_blob(svc, h) for h in job.params["samples"]], name)
    _, held = split(x, job.params["config"]["holdout"])
    teacher = np.asarray(trained["heldout_teacher_logits"], np.float64)
    got = OrtRuntime((result_dir / opened.manifest["artifact"]["path"]).read_bytes()).run({name: x[held]})
    return heldout_metrics(teacher, np.asarray(next(iter(got.values())), np.float64))


def decoded_ok(check: dict, trained: dict, params: dict) -> bool:
    """The publish rule, on the decoded release: it still improves on the base by ``min_gain`` and its agreement
    with the teacher is within ``max_decoded_drop`` of the trained student's."""
    m = trained["metrics"]
    return (check["kl"] <= m["heldout_kl_before"] * (1 - params["config"]["min_gain"])
            and check["agreement"] >= m["heldout_agreement_after"] - params["max_decoded_drop"])
