"""The world the sync fuzzer and the named error tests attack: a service over a temporary SQLite database with
one fleet, releases and enrolled devices, and a watch for what PostgreSQL would refuse (``tests/test_sync_fuzz.py``,
``tests/test_sync_errors.py``)."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from sqlalchemy import JSON, event
from sqlalchemy import inspect as sa_inspect
from starlette.routing import Match

from edgekit.sync.app import create_app
from edgekit.sync.service import Service, ServiceConfig

ADMIN = "eka_fuzz-admin-token-0123456789abcdef"
FLEET, OTHER = "fuzz", "other-fleet"
BUNDLE_LIMIT, SAMPLE_LIMIT = 64 << 10, 4 << 10
SENTINEL = b"SENTINEL-outside-the-blob-store-7f3a9c"  # written next to and inside the store: must never come back
CHALLENGE = b"edgekit-sync-challenge:"
NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # protocol.NAME without its anchors ('$' allows a final newline)
SERVER_RECURSION_LIMIT = 1000  # Python's default, which uvicorn keeps
DOCS_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's own, not in the spec
EXAMPLES = int(os.environ.get("EDGEKIT_FUZZ_EXAMPLES", "120"))

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("EDGEKIT_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What each route needs: public, a device token, a device of the fleet or an admin (TUF), or an admin token.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): "public",
    ("POST", "/v1/enroll"): "public",
    ("POST", "/v1/auth/challenge"): "public",
    ("POST", "/v1/auth/token"): "public",
    ("POST", "/v1/heartbeat"): "device",
    ("GET", "/v1/desired"): "device",
    ("GET", "/v1/blobs/{sha256}"): "device",
    ("POST", "/v1/samples"): "device",
    ("GET", "/tuf/{fleet}/targets/{name}"): "tuf",
    ("GET", "/tuf/{fleet}/{name}"): "tuf",
    ("POST", "/v1/fleets/{fleet}/tokens"): "admin",
    ("POST", "/v1/fleets/{fleet}/releases"): "admin",
    ("POST", "/v1/fleets/{fleet}/rollouts"): "admin",
    ("POST", "/v1/fleets/{fleet}/rollouts/abort"): "admin",
    ("GET", "/v1/fleets/{fleet}"): "admin",
    ("GET", "/fleet"): "public",  # the fleet web page (edgekit.sync.web) and the admin JSON it reads
    ("GET", "/fleet/"): "public",
    ("GET", "/v1/fleets"): "admin",
    ("GET", "/v1/fleets/{fleet}/overview"): "admin",
    ("PUT", "/v1/fleets/{fleet}/{asset}"): "admin",  # cloud jobs: the fleet's teacher and replay set
    ("POST", "/v1/fleets/{fleet}/jobs"): "admin",
    ("GET", "/v1/fleets/{fleet}/jobs"): "admin",
    ("GET", "/v1/fleets/{fleet}/jobs/{job_id}"): "admin",
    ("GET", "/v1/fleets/{fleet}/events"): "admin",
}
RAW_BODY_LIMITS = {"/v1/fleets/{fleet}/releases": BUNDLE_LIMIT, "/v1/samples": SAMPLE_LIMIT,
                   "/v1/fleets/{fleet}/{asset}": BUNDLE_LIMIT}

# -- the service's known defects: none left (every one the fuzzer found was fixed; the tests at the end guard them) --
KNOWN_CRASHES: dict = {}  # name -> (exception type, message fragment, routes): crashes the fuzzer would tolerate
KNOWN_PG_REFUSALS: dict = {}  # name -> (fragment of the refusal, routes)
KNOWN_HITS: collections.Counter[str] = collections.Counter()
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)  # per route, for -s


# -- the world the fuzzer attacks ---------------------------------------------------------------------------------
@dataclass
class World:
    app: FastAPI
    svc: Service
    client: TestClient  # raises the app's exceptions: a new 5xx comes with its traceback
    plain: TestClient  # answers 500 like a server would
    root: Path
    release: dict  # FLEET's release (ReleaseInfo as JSON)
    other_release: dict  # OTHER's
    device_id: str
    other_id: str
    ghost_id: str  # a device id with a valid token but no row
    pub: str
    other_pub: str
    key: Ed25519PrivateKey
    tokens: dict[str, str] = field(default_factory=dict)  # credential kind -> bearer token
    enroll_tokens: list[str] = field(default_factory=list)
    nonces: list[tuple[str, str]] = field(default_factory=list)  # (nonce, signature) of FLEET's device

    def auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[kind]}"}

    def __repr__(self) -> str:
        return f"World({self.root})"

    def _repr_pretty_(self, p, cycle: bool) -> None:  # noqa: ANN001 - hypothesis' pretty printer
        p.text(repr(self))


# -- what PostgreSQL (the production database) would refuse, checked on SQLite ------------------------------------
PG_REFUSALS: list[str] = []


def _watch_for_postgres_refusals(svc: Service) -> Callable[[], None]:
    """Record what SQLite takes but PostgreSQL refuses with an error (a 500 there): a NUL character in a text
    parameter, NaN or Infinity in a JSON column. Returns the function that removes the listeners."""

    def on_execute(_conn, _cursor, statement, parameters, _context, executemany) -> None:  # noqa: ANN001
        for row in parameters if executemany else [parameters]:
            for v in row.values() if isinstance(row, dict) else row or ():
                if isinstance(v, str) and "\x00" in v:
                    PG_REFUSALS.append(f"NUL in a text parameter: {statement[:60]!r} <- {v[:60]!r}")

    def on_flush(session, _context, _instances) -> None:  # noqa: ANN001
        for obj in [*session.new, *session.dirty]:
            for col in sa_inspect(obj).mapper.columns:
                if isinstance(col.type, JSON):
                    try:
                        json.dumps(getattr(obj, col.key), allow_nan=False)
                    except ValueError:
                        PG_REFUSALS.append(f"NaN/Infinity in JSON column {type(obj).__name__}.{col.key}")

    event.listen(svc.engine, "before_cursor_execute", on_execute)
    event.listen(svc.sessions, "before_flush", on_flush)

    def remove() -> None:
        event.remove(svc.engine, "before_cursor_execute", on_execute)
        event.remove(svc.sessions, "before_flush", on_flush)

    return remove


def _enroll(client: TestClient, svc: Service, fleet: str) -> tuple[Ed25519PrivateKey, str, str, str]:
    """A device enrolled in ``fleet`` over HTTP: (key, public key hex, device id, device token)."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    r = client.post("/v1/enroll", json={"token": svc.enroll_token(fleet, 3600)[0], "public_key": pub, "name": "d"})
    assert r.status_code == 200, r.text
    device_id = r.json()["device_id"]
    nonce = client.post("/v1/auth/challenge", json={"device_id": device_id}).json()["nonce"]
    sig = key.sign(CHALLENGE + nonce.encode()).hex()
    r = client.post("/v1/auth/token", json={"device_id": device_id, "nonce": nonce, "signature": sig})
    assert r.status_code == 200, r.text
    return key, pub, device_id, r.json()["token"]


def _publish(client: TestClient, fleet: str, body: bytes, version: str) -> dict:
    r = client.post(f"/v1/fleets/{fleet}/releases?name=fuzz&version={version}", content=body,
                    headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module", name="world")
def world_fixture(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sync-fuzz")
    cfg = ServiceConfig(db=f"sqlite:///{root / 'sync.db'}", store=str(root / "blobs"), keys=root / "keys",
                        admin_token=ADMIN, max_bundle_bytes=BUNDLE_LIMIT, max_sample_bytes=SAMPLE_LIMIT,
                        sample_bytes_per_day=1 << 20, tick_s=3600)
    svc = Service(cfg)
    app = create_app(service=svc)
    unwatch = _watch_for_postgres_refusals(svc)
    for p in (root / "secret.txt", root / "blobs" / "secret.txt", root / "blobs" / "tmp" / "secret.txt"):
        p.write_bytes(SENTINEL)
    with TestClient(app, follow_redirects=False) as client:
        release = _publish(client, FLEET, b"fuzz-bundle-v1\n" * 200, "1")
        other_release = _publish(client, OTHER, b"other-fleet-bundle\n" * 100, "1")
        key, pub, device_id, device_token = _enroll(client, svc, FLEET)
        _, other_pub, other_id, other_token = _enroll(client, svc, OTHER)
        now = dt.datetime.now(dt.UTC)
        ghost_id = "ab" * 32
        w = World(
            app=app, svc=svc, client=client, plain=TestClient(app, raise_server_exceptions=False,
                                                                follow_redirects=False),
            root=root, release=release, other_release=other_release, device_id=device_id, other_id=other_id,
            ghost_id=ghost_id, pub=pub, other_pub=other_pub, key=key,
        )
        w.tokens = {
            "admin": ADMIN,
            "device": device_token,
            "other": other_token,
            "challenge": svc.challenge(device_id)[0],  # a MAC'd token of the wrong kind
            "expired": svc.macs.issue("device", device_id, dt.timedelta(seconds=-5), now)[0],
            "ghost": svc.macs.issue("device", ghost_id, dt.timedelta(minutes=15), now)[0],
            "enroll": svc.enroll_token(FLEET, 3600)[0],
        }
        w.enroll_tokens = [svc.enroll_token(FLEET, 3600)[0] for _ in range(8)] + [w.tokens["enroll"]]
        w.nonces = []
        for _ in range(8):
            nonce = svc.challenge(device_id)[0]
            w.nonces.append((nonce, key.sign(CHALLENGE + nonce.encode()).hex()))
        yield w
    print("\nstatus codes per fuzzed route:")
    for route, counts in sorted(STATUSES.items()):
        print(f"  {route:45} {sum(counts.values()):5} cases  {dict(sorted(counts.items()))}")
    print("known defects the fuzzer hit (tolerated):", dict(KNOWN_HITS))
    unwatch()
    svc.engine.dispose()

def _server_path(resp) -> str:  # noqa: ANN001 - httpx.Response
    return unquote(resp.request.url.path)  # what Starlette's TestClient puts in scope["path"]

def _match(app: FastAPI, path: str, method: str):  # noqa: ANN202 - (Match, route or None, path params)
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    partial = (Match.NONE, None, {})
    for route in app.router.routes:
        m, child = route.matches(scope)
        if m == Match.FULL:
            return m, route, child.get("path_params", {})
        if m == Match.PARTIAL and partial[0] == Match.NONE:
            partial = (m, route, child.get("path_params", {}))
    return partial

def _blob(w: World, sha: str) -> bytes:
    return b"".join(w.svc.store.open_range(sha))
