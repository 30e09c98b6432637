"""The device's durable state: one SQLite database (WAL, synchronous=FULL) in the state folder.

It holds the slot pointer (which slot serves, which one to roll back to, a pending probation), the upload queue,
the daily upload budget, counters, adaptation states and an event log. Every change is one transaction, so a
power loss leaves either the old or the new value, and anything a call has returned from is on disk.
stdlib only.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import AgentError

DB_NAME = "state.db"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
  id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, model TEXT, bytes INTEGER NOT NULL,
  meta TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS budget (day TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS adapt (
  version INTEGER PRIMARY KEY, model TEXT NOT NULL, created REAL NOT NULL, reason TEXT, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL,
  detail TEXT NOT NULL);
"""
KEEP_EVENTS = 1000
KEEP_ADAPT = 5


@dataclass(frozen=True)
class Slots:
    """Which slot serves (``active``), which one a rollback returns to, and a probation not yet decided."""

    active: str | None = None
    previous: str | None = None
    probation: dict | None = None  # {"version", "started", "boots"} while the active slot is on probation

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class State:
    """The state database. Thread-safe (one connection behind a lock)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / DB_NAME, isolation_level=None, check_same_thread=False,
                                       timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise AgentError(f"cannot open the agent state in {self.root}: {exc}",
                             hint="the state folder must be writable, on a local file system") from exc
        self._lock = threading.RLock()
        version = self.get("schema_version")
        if version is None:
            self.put("schema_version", SCHEMA_VERSION)
        elif int(version) > SCHEMA_VERSION:
            raise AgentError(f"{self.root} holds agent state of schema {version}; this agent reads {SCHEMA_VERSION}",
                             hint="upgrade edgekit on this device")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: list[tuple[str, tuple]]) -> list[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                results = [cur.execute(sql, args) for sql, args in statements]
                last = [r.lastrowid for r in results]
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return last

    def _one(self, sql: str, args: tuple = ()):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # -- key/value -------------------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value) -> None:
        self._tx([("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))])

    # -- slots ------------------------------------------------------------------------------------------------
    def slots(self) -> Slots:
        raw = self.get("slots")
        return Slots(**raw) if raw else Slots()

    def set_slots(self, slots: Slots, event: tuple[str, str] | None = None) -> None:
        stmts = [("INSERT OR REPLACE INTO meta(key, value) VALUES ('slots', ?)", (slots.to_json(),))]
        if event:
            stmts.append(("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", (time.time(), *event)))
        self._tx(stmts)

    # -- counters and events ------------------------------------------------------------------------------------
    def bump(self, name: str, by: int = 1) -> None:
        self.bump_many({name: by})

    def bump_many(self, counts: Mapping[str, int]) -> None:
        """Add to several counters in one transaction (zeros skipped)."""
        stmts = [("INSERT INTO counters(name, value) VALUES (?, ?) "
                  "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, int(n)))
                 for name, n in counts.items() if n]
        if stmts:
            self._tx(stmts)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def event(self, kind: str, detail: str) -> None:
        self._tx([("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, detail)),
                  ("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (KEEP_EVENTS,))])

    def events(self, limit: int = 20) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT time, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"time": t, "kind": k, "detail": d} for t, k, d in rows]

    # -- upload queue -------------------------------------------------------------------------------------------
    def enqueue(self, payload: bytes, meta: Mapping, *, model: str | None, day: str, budget: int) -> int | None:
        """Append a sample if today's budget allows it; returns its id once it is on disk, else None."""
        size = len(payload)
        with self._lock:
            used = self._one("SELECT bytes FROM budget WHERE day=?", (day,))
            if (used[0] if used else 0) + size > budget:
                return None
            ids = self._tx([
                ("INSERT INTO queue(created, model, bytes, meta, payload) VALUES (?, ?, ?, ?, ?)",
                 (time.time(), model, size, json.dumps(dict(meta)), payload)),
                ("INSERT INTO budget(day, bytes) VALUES (?, ?) "
                 "ON CONFLICT(day) DO UPDATE SET bytes = bytes + excluded.bytes", (day, size)),
            ])
            return int(ids[0])

    def pending(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, created, model, bytes, meta, payload FROM queue ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
        return [{"id": i, "created": c, "model": m, "bytes": b, "meta": json.loads(mt), "payload": p}
                for i, c, m, b, mt, p in rows]

    def ack(self, ids) -> int:
        """Remove uploaded samples; returns how many were removed."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._lock:
            before = self.queue_size()
            self._tx([(f"DELETE FROM queue WHERE id IN ({marks})", tuple(ids))])
            return before - self.queue_size()

    def queue_size(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM queue")[0])

    def queue_ids(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM queue ORDER BY id").fetchall()]

    def budget_used(self, day: str) -> int:
        row = self._one("SELECT bytes FROM budget WHERE day=?", (day,))
        return int(row[0]) if row else 0

    # -- adaptation states ------------------------------------------------------------------------------------
    def save_adapt(self, version: int, model: str, reason: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._tx([
            ("INSERT OR REPLACE INTO adapt(version, model, created, reason, payload) VALUES (?, ?, ?, ?, ?)",
             (int(version), model, time.time(), reason, pack_arrays(arrays))),
            ("DELETE FROM adapt WHERE version <= (SELECT MAX(version) FROM adapt) - ?", (KEEP_ADAPT,)),
        ])

    def latest_adapt(self, model: str) -> tuple[int, str, dict[str, np.ndarray]] | None:
        row = self._one("SELECT version, reason, payload FROM adapt WHERE model=? ORDER BY version DESC LIMIT 1",
                        (model,))
        if row is None:
            return None
        return int(row[0]), row[1], unpack_arrays(row[2])

    def clear_adapt(self) -> None:
        self._tx([("DELETE FROM adapt", ())])
