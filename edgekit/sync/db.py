"""The service's tables (SQLAlchemy 2) and the engine: SQLite by default, PostgreSQL for several replicas.

The schema is created and upgraded by Alembic (``edgekit/sync/migrations``, ``migrate``); ``tests/test_sync_db.py``
checks that the migrations produce exactly these models. Every piece of state a replica needs is here (including the
TUF metadata and the token-signing secret), so replicas are stateless.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones: they are read back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy's signature
        if value is None:
            return None
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))


class AdminToken(Base):
    __tablename__ = "admin_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    note: Mapped[str] = mapped_column(String(200), default="")


class Fleet(Base):
    __tablename__ = "fleets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    current_release: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the last completed rollout's
    # what cloud adaptation jobs distill from (blobs): the teacher ONNX model and a replay set (.npz of source inputs)
    teacher_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    replay_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EnrollToken(Base):
    __tablename__ = "enroll_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"))
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"), index=True)
    public_key: Mapped[str] = mapped_column(String(64))  # raw ed25519, hex
    name: Mapped[str] = mapped_column(String(100), default="")
    enrolled_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the model version it serves
    # telemetry of the version it serves, accumulated by the service (columns, so that a heartbeat is one UPDATE)
    tel_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tel_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tel_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    tel_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tel_p90_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tel_drift: Mapped[bool] = mapped_column(Boolean, default=False)
    samples_day: Mapped[str] = mapped_column(String(10), default="")
    samples_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # uploaded on samples_day


class Release(Base):
    __tablename__ = "releases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))  # the TUF target path
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # a release can also be shipped as a delta against a base release (edgekit.delta): its own TUF target
    base_release_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), nullable=True)
    delta_target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    delta_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    delta_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    origin: Mapped[str] = mapped_column(String(200), default="")  # "uploaded", or the job that made it


class Job(Base):
    """A cloud job (``edgekit.sync.jobs``): idempotent by ``key``, resumable from ``step``."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of what defines the job's result
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|rejected|failed
    step: Mapped[str] = mapped_column(String(32), default="")  # the last step whose output is saved
    state: Mapped[dict] = mapped_column(JSON, default=dict)  # the saved steps' outputs (blob hashes, metrics)
    error: Mapped[str] = mapped_column(String(1000), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"), index=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), nullable=True)
    stages: Mapped[list] = mapped_column(JSON)  # percentages, e.g. [1, 10, 50, 100]
    stage: Mapped[int] = mapped_column(Integer, default=0)  # index into stages
    stage_started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    gates: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | completed | aborted
    reason: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class DeviceEvent(Base):
    __tablename__ = "device_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    kind: Mapped[str] = mapped_column(String(32))  # installed | install_failed | rolled_back
    version: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    __table_args__ = (Index("ix_device_events_device_kind", "device_id", "kind"),)


class Sample(Base):
    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TufMetadata(Base):
    __tablename__ = "tuf_metadata"
    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys, so that one file serves a threaded
    server safely."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        # a short busy timeout: the heartbeat route runs in the event loop, and must not wait long on the lock
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 5})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the database schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def sessions(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
