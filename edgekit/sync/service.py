"""The sync service's state and operations, independent of HTTP: configuration, the database, the blob store, the
TUF repositories (one per fleet, metadata in the database), enrollment, device sessions, heartbeats, publishing.
``edgekit.sync.app`` puts HTTP in front of it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import String, bindparam, case, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from edgekit.errors import ConfigError, EdgekitError
from edgekit.sync import auth, rollout
from edgekit.sync.blobs import BlobTooLarge, open_store
from edgekit.sync.db import (
    AdminToken,
    Device,
    DeviceEvent,
    EnrollToken,
    Fleet,
    Job,
    Release,
    Rollout,
    Sample,
    Setting,
    TufMetadata,
    UtcDateTime,
    make_engine,
    migrate,
    sessions,
    utcnow,
)
from edgekit.sync.protocol import FLEET_RULE, NAME, DeltaOffer, Desired, Heartbeat, RolloutCreate
from edgekit.sync.tuf_repo import FleetRepository, Keyring

log = logging.getLogger(__name__)


class SyncError(EdgekitError):
    """A request the service refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


FLEET_NAME = re.compile(NAME)


def _db_error(url: str, exc: Exception) -> ConfigError:
    """A clear error for a database that cannot be opened or migrated, naming it (without its password)."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        shown = url
    orig = getattr(exc, "orig", None)
    reason = str(orig if orig is not None else exc).strip().splitlines()[0]
    return ConfigError(f"cannot use the database {shown}: {reason}",
                       hint="pass --db sqlite:///FILE or postgresql://USER@HOST/DB; a corrupt SQLite file must be "
                            "restored from a backup or moved away (the service starts a new one)")


def fleet_name(fleet: str) -> str:
    """``fleet`` if it is a valid fleet name (it goes into URLs, paths and queries), else a 422."""
    if not FLEET_NAME.fullmatch(fleet):
        raise SyncError(FLEET_RULE, 422)
    return fleet


@dataclass
class ServiceConfig:
    db: str = "sqlite:///edgekit-sync/sync.db"
    store: str = "edgekit-sync/blobs"
    keys: Path = Path("edgekit-sync/keys")
    admin_token: str | None = None  # registered (its hash) at start when given
    max_bundle_bytes: int = 2 << 30
    max_sample_bytes: int = 16 << 20
    sample_bytes_per_day: int = 256 << 20  # per device
    heartbeat_s: int = 30  # what devices are told to wait between heartbeats
    online_s: int = 120  # a device seen this recently is online
    tick_s: float = 5.0  # rollout gates and TUF expiry are checked this often
    ray: str | None = None  # run cloud jobs' compute on this Ray cluster ("local": start one here); None: in-process
    max_model_bytes: int = 2 << 30  # a fleet's teacher model or replay set


class DbMetadataStore:
    """TUF metadata of one fleet in the database, inside the caller's transaction."""

    def __init__(self, session: Session, fleet: str) -> None:
        self.s, self.fleet = session, fleet

    def get(self, name: str) -> bytes | None:
        row = self.s.get(TufMetadata, (self.fleet, name))
        return None if row is None else bytes(row.data)

    def put(self, name: str, data: bytes) -> None:
        row = self.s.get(TufMetadata, (self.fleet, name))
        if row is None:
            self.s.add(TufMetadata(fleet=self.fleet, name=name, data=data))
        else:
            row.data = data
        self.s.flush()


TARGET_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _heartbeat_statement():
    """The heartbeat's UPDATE, built once (SQLAlchemy caches its compiled form): telemetry counts add up while the
    device serves the same version and restart with a new one."""
    d = Device.__table__
    same = d.c.tel_version.is_not_distinct_from(bindparam("v", type_=String()))
    return (update(d).where(d.c.id == bindparam("did")).values(
        last_seen=bindparam("now", type_=UtcDateTime()), version=bindparam("v"), tel_version=bindparam("v"),
        tel_requests=case((same, d.c.tel_requests + bindparam("r")), else_=bindparam("r")),
        tel_errors=case((same, d.c.tel_errors + bindparam("e")), else_=bindparam("e")),
        tel_p50_ms=bindparam("p50"), tel_p90_ms=bindparam("p90"), tel_drift=bindparam("drift"),
    ).returning(d.c.fleet))


_HEARTBEAT = _heartbeat_statement()


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        if cfg.db.startswith("sqlite:///") and not cfg.db.startswith("sqlite:///:memory:"):
            Path(cfg.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = make_engine(cfg.db)
            migrate(self.engine)
        except Exception as exc:
            from alembic.util.exc import CommandError  # e.g. a database of a newer schema

            if isinstance(exc, (SQLAlchemyError, CommandError, ImportError)):  # ImportError: no driver (psycopg)
                raise _db_error(cfg.db, exc) from None
            raise
        self.sessions = sessions(self.engine)
        self.store = open_store(cfg.store)
        self.keys = Keyring.load_or_create(Path(cfg.keys))
        with self.sessions.begin() as s:
            self.macs = auth.Macs(bytes.fromhex(self._setting(s, "token_secret", lambda: secrets.token_hex(32))))
            if cfg.admin_token:
                h = auth.token_hash(cfg.admin_token)
                if s.get(AdminToken, h) is None:
                    s.add(AdminToken(token_hash=h, note="registered at start"))
        self._fleet_cache: dict[str, tuple[float, tuple]] = {}
        self._releases: dict[int, Desired] = {}
        self._lock = threading.Lock()
        self._jobs = None

    @property
    def jobs(self):  # noqa: ANN201 - edgekit.sync.jobs.Jobs
        """The cloud jobs (made on first use: with ``ray`` configured, that connects to the cluster)."""
        with self._lock:
            if self._jobs is None:
                from edgekit.sync.jobs import Jobs

                self._jobs = Jobs(self)
            return self._jobs

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.close()
        self.engine.dispose()

    @staticmethod
    def _setting(s: Session, key: str, make) -> str:  # noqa: ANN001 - a zero-argument factory
        row = s.get(Setting, key)
        if row is None:
            try:
                with s.begin_nested():
                    s.add(Setting(key=key, value=make()))
            except IntegrityError:  # another replica created it first
                pass
            row = s.get(Setting, key)
        return row.value

    # -- admin ------------------------------------------------------------------------------------------------------
    def admin_ok(self, token: str | None) -> bool:
        if not token:
            return False
        with self.sessions() as s:
            return s.get(AdminToken, auth.token_hash(token)) is not None

    def ensure_fleet(self, s: Session, name: str) -> Fleet:
        fleet = s.get(Fleet, name)
        if fleet is None:
            try:
                with s.begin_nested():  # two requests may create the same new fleet at once: one wins
                    fleet = Fleet(name=name)
                    s.add(fleet)
                    s.flush()
                    FleetRepository(DbMetadataStore(s, name), self.keys).init()
            except IntegrityError:
                fleet = s.get(Fleet, name)
                if fleet is None:
                    raise
        return fleet

    def enroll_token(self, fleet: str, ttl_s: int) -> tuple[str, dt.datetime]:
        token = auth.new_token("ekt_")
        expires = utcnow() + dt.timedelta(seconds=ttl_s)
        with self.sessions.begin() as s:
            self.ensure_fleet(s, fleet)
            s.add(EnrollToken(token_hash=auth.token_hash(token), fleet=fleet, expires_at=expires))
        return token, expires

    # -- devices ----------------------------------------------------------------------------------------------------
    def enroll(self, token: str, public_key: str, name: str) -> tuple[Device, str]:
        """Register a device key with a single-use token; returns the device and its fleet's trusted TUF root."""
        now = utcnow()
        with self.sessions.begin() as s:
            row = s.get(EnrollToken, auth.token_hash(token), with_for_update=True)
            if row is None or row.used_at is not None or row.expires_at < now:
                raise SyncError(
                    "the enrollment token is unknown, used or expired",
                    403,
                    hint="ask an admin for a new one: edgekit sync token --fleet NAME",
                )
            device_id = auth.device_id_for(public_key)
            device = s.get(Device, device_id)
            if device is not None and device.fleet != row.fleet:
                raise SyncError("this device key is enrolled in another fleet", 409)
            if device is None:
                device = Device(id=device_id, fleet=row.fleet, public_key=public_key, name=name)
                s.add(device)
            row.used_at, row.device_id = now, device_id
            root = FleetRepository(DbMetadataStore(s, row.fleet), self.keys).trusted_root()
        return device, root.decode()

    def challenge(self, device_id: str) -> tuple[str, dt.datetime]:
        return self.macs.issue("challenge", device_id, auth.CHALLENGE_TTL, utcnow())

    def device_token(self, device_id: str, nonce: str, signature: str) -> tuple[str, dt.datetime]:
        now = utcnow()
        if self.macs.check(nonce, "challenge", now) != device_id:
            raise SyncError("the challenge is invalid or expired", 401, hint="ask for a new challenge")
        with self.sessions() as s:
            device = s.get(Device, device_id)
        if device is None or not auth.signature_ok(device.public_key, auth.challenge_message(nonce), signature):
            raise SyncError("the signature does not match the enrolled device key", 401)
        return self.macs.issue("device", device_id, auth.DEVICE_TOKEN_TTL, now)

    def device_for(self, token: str | None) -> str:
        device_id = self.macs.check(token or "", "device", utcnow())
        if device_id is None:
            raise SyncError("a valid device token is required", 401, hint="authenticate with a signed challenge")
        return device_id

    def _fleet_state(self, s: Session, fleet: str) -> tuple:
        """(current release id, active rollout as (id, percent, release id, previous id) or None), cached 1 s: the
        heartbeat path reads it for every request."""
        hit = self._fleet_cache.get(fleet)
        if hit is not None and time.monotonic() - hit[0] < 1.0:
            return hit[1]
        f = s.get(Fleet, fleet)
        r = rollout.latest_rollout(s, fleet)
        active = None
        if r is not None and r.status == "active":
            active = (r.id, r.stages[r.stage], r.release_id, r.previous_id)
        state = (f.current_release if f else None, active)
        self._fleet_cache[fleet] = (time.monotonic(), state)
        return state

    def desired(self, s: Session, device: Device) -> Desired | None:
        return self.desired_of(s, device.fleet, device.id)

    def desired_of(self, s: Session, fleet: str, device_id: str) -> Desired | None:
        """The release a device of ``fleet`` should run now (None: none yet)."""
        current, active = self._fleet_state(s, fleet)
        rid = current
        if active is not None:
            rid = active[2] if rollout.cohort(device_id, active[0]) < active[1] else active[3]
        if rid is None:
            return None
        hit = self._releases.get(rid)  # release rows never change: cached
        if hit is None:
            r = s.get(Release, rid)
            offer = None
            if r.delta_sha256 and r.base_release_id is not None:
                base = s.get(Release, r.base_release_id)
                offer = DeltaOffer(target=r.delta_target, sha256=r.delta_sha256, size=r.delta_size,
                                   base_version=base.version, base_sha256=base.sha256)
            hit = self._releases[rid] = Desired(release_id=r.id, name=r.name, version=r.version, target=r.target,
                                                sha256=r.sha256, size=r.size, delta=offer)
        return hit

    def heartbeat(self, device_id: str, hb: Heartbeat) -> Desired | None:
        """Record a heartbeat in one prepared UPDATE (telemetry accumulates per served version) and answer the
        desired release from cached fleet state: the path every device takes every ``heartbeat_s``, so it skips the
        ORM."""
        now = utcnow()
        t = hb.telemetry
        params = {"did": device_id, "now": now, "v": hb.version, "r": t.requests, "e": t.errors,
                  "p50": t.latency_p50_ms, "p90": t.latency_p90_ms, "drift": t.drift_alarm}
        with self.engine.begin() as conn:
            fleet = conn.execute(_HEARTBEAT, params).scalar()
            if fleet is None:
                raise SyncError("unknown device", 404)
            if hb.events:
                conn.execute(DeviceEvent.__table__.insert(), [
                    {"device_id": device_id, "kind": e.kind, "version": e.version, "detail": e.detail, "at": now}
                    for e in hb.events])
            with Session(bind=conn) as s:  # only used when the fleet's cached state is older than a second
                return self.desired_of(s, fleet, device_id)

    def touch(self, device_id: str) -> Device:
        with self.sessions.begin() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise SyncError("unknown device", 404)
            device.last_seen = utcnow()
            return device

    def fleet_has_blob(self, fleet: str, sha256: str) -> bool:
        """Whether ``sha256`` is a release of ``fleet`` (what its devices may download)."""
        with self.sessions() as s:
            stmt = select(Release.id).where(Release.fleet == fleet,
                                            (Release.sha256 == sha256) | (Release.delta_sha256 == sha256)).limit(1)
            return s.scalars(stmt).first() is not None

    def add_sample(self, device_id: str, stream: BinaryIO, meta: dict) -> tuple[int, str, int, int]:
        with self.sessions() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise SyncError("unknown device", 404)
            day = utcnow().date().isoformat()
            used = device.samples_bytes if device.samples_day == day else 0
        left = self.cfg.sample_bytes_per_day - used
        if left <= 0:
            raise SyncError("this device's sample quota for today is used up", 429, hint="retry tomorrow (UTC)")
        try:
            sha, size = self.store.put_stream(stream, max_bytes=min(self.cfg.max_sample_bytes, left))
        except BlobTooLarge:
            if left < self.cfg.max_sample_bytes:
                raise SyncError(f"this sample would pass the device's daily quota ({left:,} bytes left)", 429,
                                hint="retry tomorrow (UTC)") from None
            raise
        with self.sessions.begin() as s:
            device = s.get(Device, device_id, with_for_update=True)
            device.last_seen = utcnow()
            if device.samples_day != day:
                device.samples_day, device.samples_bytes = day, 0
            device.samples_bytes += size
            row = Sample(device_id=device_id, sha256=sha, size=size, meta=meta)
            s.add(row)
            s.flush()
            return row.id, sha, size, self.cfg.sample_bytes_per_day - device.samples_bytes

    # -- releases and rollouts --------------------------------------------------------------------------------------
    def publish(self, fleet: str, stream: BinaryIO, name: str, version: str, *, delta: BinaryIO | None = None,
                base_release_id: int | None = None, origin: str = "uploaded", on_commit=None) -> Release:  # noqa: ANN001
        """Store a bundle (streamed, size-limited) and add it to the fleet's signed TUF targets; with ``delta``
        (an ``edgekit.delta`` .ekd made against release ``base_release_id``), that too, as its own target whose
        custom metadata names the base. ``on_commit(session, release)`` runs in the same transaction."""
        sha, size = self.store.put_stream(stream, max_bytes=self.cfg.max_bundle_bytes)
        dsha = dsize = None
        if delta is not None:
            if base_release_id is None:
                raise SyncError("a delta needs the release it was made against (base_release_id)", 422)
            dsha, dsize = self.store.put_stream(delta, max_bytes=self.cfg.max_bundle_bytes)
        target = TARGET_SAFE.sub("_", f"{name}-{version}.ekb")[:200]
        with self.sessions.begin() as s:
            f = self.ensure_fleet(s, fleet)
            s.refresh(f, with_for_update=True)  # one publisher per fleet at a time: TUF versions stay monotonic
            dup = s.scalars(select(Release).where(Release.fleet == fleet, Release.version == version)).first()
            if dup is not None:
                raise SyncError(
                    f"fleet {fleet!r} already has a release with version {version!r}",
                    409,
                    hint="bump the bundle's version",
                )
            base = None
            if base_release_id is not None:
                base = s.get(Release, base_release_id)
                if base is None or base.fleet != fleet:
                    raise SyncError(f"fleet {fleet!r} has no release {base_release_id} to be a delta's base", 404)
            release = Release(fleet=fleet, name=name, version=version, target=target, sha256=sha, size=size,
                              origin=origin[:200])
            s.add(release)
            s.flush()
            repo = FleetRepository(DbMetadataStore(s, fleet), self.keys)
            if base is not None and dsha is not None:
                release.base_release_id, release.delta_sha256, release.delta_size = base.id, dsha, dsize
                release.delta_target = TARGET_SAFE.sub("_", f"{name}-{version}-from-{base.version}.ekd")[:200]
                repo.add_target(release.delta_target, dsize, dsha, {
                    "version": version, "name": name, "release_id": release.id, "delta_of": base.id,
                    "base_version": base.version, "base_sha256": base.sha256})
            repo.add_target(target, size, sha, {"version": version, "name": name, "release_id": release.id})
            if on_commit is not None:
                on_commit(s, release)
        return release

    def set_fleet_asset(self, fleet: str, kind: str, stream: BinaryIO) -> tuple[str, int]:
        """Store the fleet's ``teacher`` (ONNX model) or ``replay`` set (.npz of source-domain inputs) for cloud
        adaptation jobs."""
        if kind not in ("teacher", "replay"):
            raise SyncError(f"unknown fleet asset {kind!r}", 404)
        _check_asset(kind, stream, self.cfg.max_model_bytes)
        sha, size = self.store.put_stream(stream, max_bytes=self.cfg.max_model_bytes)
        with self.sessions.begin() as s:
            f = self.ensure_fleet(s, fleet)
            setattr(f, f"{kind}_sha256", sha)
        return sha, size

    def release_key(self):  # noqa: ANN201 - Ed25519PrivateKey
        """The key the service signs the releases its jobs make with (``keys/release.key``, made on first use);
        devices trust its public key (``keys/release.pub``) like the build's. Sign the base releases with it too
        (``edgekit build --key``) and a delta carries a 64-byte signature instead of a new signature file."""
        from edgekit.keys import generate_keypair, load_private_key

        path = Path(self.cfg.keys) / "release.key"
        with self._lock:
            if not path.exists():
                generate_keypair(Path(self.cfg.keys), name="release")
        return load_private_key(path)

    def start_rollout(self, fleet: str, req: RolloutCreate) -> Rollout:
        with self.sessions.begin() as s:
            f = s.get(Fleet, fleet)
            release = s.get(Release, req.release_id)
            if f is None or release is None or release.fleet != fleet:
                raise SyncError(f"fleet {fleet!r} has no release {req.release_id}", 404)
            r = rollout.start(s, f, release, req.stages, req.gates, req.stage_minutes, req.stage_timeout_minutes)
        self._fleet_cache.pop(fleet, None)
        return r

    def abort_rollout(self, fleet: str, reason: str) -> Rollout:
        with self.sessions.begin() as s:
            r = rollout.latest_rollout(s, fleet)
            if r is None or r.status != "active":
                raise SyncError(f"fleet {fleet!r} has no active rollout", 409)
            rollout.abort(s, r, reason)
        self._fleet_cache.pop(fleet, None)
        return r

    def tick(self, now: dt.datetime | None = None) -> dict[str, str]:
        """Evaluate every active rollout's gates and keep every fleet's TUF timestamp/snapshot from expiring."""
        results = {}
        with self._lock, self.sessions.begin() as s:
            for r in s.scalars(select(Rollout).where(Rollout.status == "active").with_for_update()).all():
                results[r.fleet] = rollout.evaluate(s, r, now)
                self._fleet_cache.pop(r.fleet, None)
            for name in s.scalars(select(Fleet.name)).all():
                FleetRepository(DbMetadataStore(s, name), self.keys).refresh()
            pending = s.scalars(select(Job.id).where(Job.status.in_(("queued", "running"))).limit(1)).first()
        if pending is not None:  # jobs a restart interrupted, or whose process died: taken over
            self.jobs.resume()
        return results


def _check_asset(kind: str, stream: BinaryIO, max_bytes: int) -> None:
    """A fleet's ``teacher`` must be an ONNX model with an input and an output, its ``replay`` set an .npz of arrays
    (no pickles) with at least one sample: anything else is a 422 now rather than a failed adaptation job later.
    ``stream`` (seekable) is read, at most ``max_bytes`` + 1 of it, and rewound."""
    import io
    import zipfile

    import numpy as np

    data = stream.read(max_bytes + 1)
    stream.seek(0)
    if len(data) > max_bytes:
        return  # the store refuses it as too large
    if kind == "teacher":
        import onnx

        try:
            model = onnx.load_model_from_string(data)
        except Exception:  # noqa: BLE001 - protobuf raises several types for bytes that are not a model
            model = None
        if model is None or not model.graph.input or not model.graph.output:
            raise SyncError("the teacher is not an ONNX model with inputs and outputs", 422)
        return
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [z[k] for k in z.files]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        raise SyncError("the replay set is not an .npz of arrays", 422) from None
    if not arrays or any(a.ndim == 0 or len(a) == 0 for a in arrays):
        raise SyncError("the replay set holds no samples (an .npz of arrays stacked on axis 0)", 422)
