"""The device side of sync: enroll, heartbeat, verified resumable downloads, installs, sample uploads.

Used by ``edgekit agent enroll`` and ``edgekit agent sync`` (and ``agent run`` when the state folder is enrolled).
No torch and no server dependencies: the standard library's HTTP client, ``cryptography`` for the device key, and
python-tuf's updater (``tuf_client``) for release metadata.

- The device generates its own ed25519 key at enrollment; only the public key leaves it. Requests carry a short-lived
  token the device gets by signing a challenge.
- A release the server names is installed only if the fleet's signed TUF metadata lists it with the same hash; the
  blob is downloaded with HTTP Range, resumed after an interruption from the partial file, and verified against the
  TUF target before the agent sees it (the agent then verifies the bundle's own signature and hashes).
- Network errors, 429 and 5xx are retried with exponential backoff and full jitter; events (installed, failed,
  rolled back) wait in a small file until a heartbeat delivers them; the agent's sample queue is durable already and
  is flushed (and acknowledged) only after the server has stored each sample.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import AgentError, EdgekitError
from edgekit.fsutil import atomic_write_bytes, atomic_write_text
from edgekit.sync.protocol import API, Desired, HeartbeatResponse

log = logging.getLogger(__name__)

SYNC_DIR = "sync"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CHALLENGE = b"edgekit-sync-challenge:"  # what auth.challenge_message prefixes (the server checks the same bytes)


class SyncClientError(EdgekitError):
    exit_code = 11
    transient = False  # True: the server could not be reached (retry later), nothing was refused


class SyncUnreachable(SyncClientError):
    """Every attempt at a request failed on the network, 429 or 5xx: the next sync tries again."""

    transient = True


class HttpError(SyncClientError):
    def __init__(self, status: int, message: str, hint: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}", hint=hint)
        self.status = status


def enrolled(state_dir: str | Path) -> bool:
    return (Path(state_dir) / SYNC_DIR / "sync.json").exists()


class SyncClient:
    def __init__(
        self, state_dir: str | Path, *, timeout: float = 30.0, attempts: int = 5, backoff: float = 0.5, sleep=time.sleep
    ) -> None:  # noqa: ANN001 - a sleep function (tests pass a fake)
        self.dir = Path(state_dir) / SYNC_DIR
        path = self.dir / "sync.json"
        if not path.exists():
            raise SyncClientError(
                f"{state_dir} is not enrolled with a sync server",
                hint="edgekit agent enroll --server URL --token TOKEN --state DIR",
            )
        self.info = _read_info(path)
        self.server = self.info["server"].rstrip("/")
        self.timeout, self.attempts, self.backoff, self._sleep = timeout, attempts, backoff, sleep
        self._key = _read_device_key(self.dir / "device.pem")
        self._token: tuple[str, float] | None = None
        self._rng = random.Random()
        self.downloaded = 0  # release bytes received by this client

    # -- enrollment ---------------------------------------------------------------------------------------------------
    @classmethod
    def enroll(
        cls, server: str, token: str, state_dir: str | Path, *, name: str = "", timeout: float = 30.0
    ) -> SyncClient:
        """Register this device with ``server`` using a single-use enrollment token."""
        server = check_server_url(server)  # before anything is written
        d = Path(state_dir) / SYNC_DIR
        d.mkdir(parents=True, exist_ok=True)
        key_path = d / "device.pem"
        if key_path.exists():  # re-enrolling keeps the device's identity
            key = _read_device_key(key_path)
        else:  # saved before the request: a retry after a lost answer is the same device, not a second one
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            atomic_write_bytes(key_path, pem, mode=0o600)
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        body = json.dumps({"token": token, "public_key": pub, "name": name}).encode()
        try:
            status, _, data = http_call(
                "POST", server + f"{API}/enroll", body, {"Content-Type": "application/json"}, timeout
            )
        except OSError as exc:
            raise SyncUnreachable(f"cannot reach the sync server {server}: {getattr(exc, 'reason', exc)}",
                                  hint="check --server and that `edgekit sync serve` runs there") from None
        if status != 200:
            raise http_error(status, data, "enrollment refused")
        try:
            resp = json.loads(data)
            fields = {k: resp[k] for k in ("trusted_root", "device_id", "fleet", "metadata_path", "blobs_path")}
        except (ValueError, TypeError, KeyError):
            raise SyncClientError(f"{server} did not answer like a sync server", hint="check --server") from None
        (d / "tuf").mkdir(exist_ok=True)
        atomic_write_text(d / "trusted_root.json", fields["trusted_root"])
        atomic_write_text(
            d / "sync.json",
            json.dumps(
                {
                    "server": server,
                    "device_id": fields["device_id"],
                    "fleet": fields["fleet"],
                    "metadata_path": fields["metadata_path"],
                    "blobs_path": fields["blobs_path"],
                    "sent": {},
                    "refused": [],
                },
                indent=1,
            ),
        )
        return cls(state_dir, timeout=timeout)

    # -- HTTP -------------------------------------------------------------------------------------------------------
    def _auth(self) -> str:
        if self._token is not None and self._token[1] - time.time() > 60:
            return self._token[0]
        dev = self.info["device_id"]
        _, _, data = self._call("POST", f"{API}/auth/challenge", {"device_id": dev}, auth=False)
        nonce = json.loads(data)["nonce"]
        sig = self._key.sign(CHALLENGE + nonce.encode()).hex()
        _, _, data = self._call(
            "POST", f"{API}/auth/token", {"device_id": dev, "nonce": nonce, "signature": sig}, auth=False
        )
        tok = json.loads(data)
        exp = dt.datetime.fromisoformat(tok["expires_at"]).timestamp()
        self._token = (tok["token"], exp)
        return tok["token"]

    def _call(
        self,
        method: str,
        path: str,
        body=None,
        *,
        auth: bool = True,
        headers: dict | None = None,  # noqa: ANN001
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, dict, bytes]:
        """One request with retries (backoff with full jitter) on network errors, 429 and 5xx; a 401 re-authenticates
        once."""
        hdrs = dict(headers or {})
        data = body
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        reauthed = False
        for attempt in range(self.attempts):
            if auth:
                hdrs["Authorization"] = f"Bearer {self._auth()}"
            try:
                status, rh, resp = http_call(method, self.server + path, data, hdrs, self.timeout)
            except OSError as exc:
                status, rh, resp = None, {}, str(exc).encode()
            if status in ok:
                return status, rh, resp
            if status == 401 and auth and not reauthed:
                self._token, reauthed = None, True
                continue
            if status is not None and status < 500 and status != 429:
                raise http_error(status, resp, f"{method} {path}")
            if attempt + 1 < self.attempts:
                self._sleep(self._rng.uniform(0, self.backoff * (2**attempt)))
        raise SyncUnreachable(
            f"{method} {path} failed after {self.attempts} attempts: {status or 'no connection'} {resp[:200]!r}",
            hint="the device keeps its queue; it retries at the next sync",
        )

    # -- operations -------------------------------------------------------------------------------------------------
    def heartbeat(self, version: str | None, telemetry: dict, events: list[dict]) -> HeartbeatResponse:
        _, _, data = self._call(
            "POST", f"{API}/heartbeat", {"version": version, "telemetry": telemetry, "events": events}
        )
        return HeartbeatResponse.model_validate_json(data)

    def wait_for_change(self, etag: str, wait_s: float) -> HeartbeatResponse | None:
        """Long poll: the new desired state, or None when nothing changed within ``wait_s``."""
        status, _, data = self._call(
            "GET", f"{API}/desired?wait={wait_s:g}", headers={"If-None-Match": etag}, ok=(200, 304)
        )
        return None if status == 304 else HeartbeatResponse.model_validate_json(data)

    def download(self, desired: Desired, dest_dir: Path | None = None, *, delta: bool = False) -> Path:
        """The release's bundle (or, with ``delta``, its delta), verified against the fleet's signed TUF targets;
        resumes a partial download."""
        from edgekit.sync.tuf_client import ReleaseVerifier

        if delta and desired.delta is None:
            raise SyncClientError(f"release {desired.version} has no delta")
        target, sha, size = ((desired.delta.target, desired.delta.sha256, desired.delta.size) if delta
                             else (desired.target, desired.sha256, desired.size))
        dest_dir = Path(dest_dir or self.dir / "downloads")
        dest_dir.mkdir(parents=True, exist_ok=True)
        verifier = ReleaseVerifier(
            self.server + self.info["metadata_path"],
            (self.dir / "trusted_root.json").read_bytes(),
            self.dir / "tuf",
            headers={"Authorization": f"Bearer {self._auth()}"},
        )
        verifier.refresh()
        signed = verifier.target(target)
        if signed["sha256"] != sha or signed["length"] != size:
            raise SyncClientError(
                f"the server named release {desired.version} with a hash its signed metadata does not have; refusing it"
            )
        final = dest_dir / f"{sha}{'.ekd' if delta else '.ekb'}"
        if final.exists():
            verifier.verify_file(target, final)
            return final
        part = dest_dir / f"{sha}.part"
        url = f"{self.server}{self.info['blobs_path']}{sha}"
        failures = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            try:
                _stream_to(url, {"Authorization": f"Bearer {self._auth()}", "Range": f"bytes={have}-"}, part,
                           self.timeout, counter=self._count)
            except HttpError as exc:
                if exc.status == 401:
                    self._token = None
                elif exc.status < 500 and exc.status != 429:
                    raise
                failures += 1
            except OSError:  # the connection broke: what arrived stays in the partial file
                failures += 1
            if failures >= self.attempts:
                raise SyncUnreachable(
                    f"downloading release {desired.version} failed {failures} times",
                    hint="the partial download is kept; the next sync resumes it",
                )
            if failures:
                self._sleep(self._rng.uniform(0, self.backoff * (2**failures)))
        verifier.verify_file(target, part)
        os.replace(part, final)
        return final

    def _count(self, n: int) -> None:
        self.downloaded += n

    def install(self, agent, desired: Desired, serving: str | None) -> dict:  # noqa: ANN001 - edgekit.agent.Agent
        """Install ``desired``: as its delta when this device serves the delta's base release (the delta is a few
        hundred bytes to kilobytes), else, or when the delta does not apply here, the full bundle."""
        if desired.delta is not None and serving == desired.delta.base_version:
            path = self.download(desired, delta=True)  # a network failure propagates: the next sync tries the delta
            try:
                return {**agent.install(path), "via": "delta"}
            except EdgekitError as exc:
                log.warning("the delta of release %s did not apply (%s); fetching the full bundle", desired.version,
                            exc.message)
        return {**agent.install(self.download(desired)), "via": "full"}

    def upload_samples(self, agent, limit: int = 50) -> int:  # noqa: ANN001 - edgekit.agent.Agent
        """Send queued samples; each is acknowledged in the agent's queue once the server stored it."""
        sent = 0
        for item in agent.uploads(limit):
            meta = json.dumps({**item.get("meta", {}), "queue_id": item["id"], "model": item.get("model")})
            try:
                self._call(
                    "POST",
                    f"{API}/samples?meta={urllib.request.quote(meta)}",
                    item["payload"],
                    headers={"Content-Type": "application/octet-stream"},
                )
            except HttpError as exc:
                if exc.status == 429:  # today's quota is spent: the rest waits for tomorrow
                    break
                raise
            agent.ack([item["id"]])
            sent += 1
        return sent

    def sync_once(self, agent) -> dict:  # noqa: ANN001 - edgekit.agent.Agent
        """One heartbeat (telemetry since the last one, pending events); install the desired release if it is new;
        flush queued samples. Returns what happened."""
        from edgekit.errors import UpdateError
        from edgekit.sync.tuf_client import TufRefused

        st = agent.status()
        version = None if st["model"] is None else str(st["model"]["version"])
        events = self._events()
        installed = self.info.get("installed")
        if installed and version != installed["version"]:  # the agent's probation rolled it back
            self._queue_event({"kind": "rolled_back", "version": installed["version"], "detail": "probation failed"})
            events = self._events()
            self.info.setdefault("refused", []).append(installed["sha256"])
            self.info["installed"] = None
        counters = st["counters"]
        sent = self.info.setdefault("sent", {})
        lat = st["latency_ms"]
        telemetry = {
            "requests": max(0, counters.get("requests", 0) - sent.get("requests", 0)),
            "errors": max(0, counters.get("errors", 0) - sent.get("errors", 0)),
            "latency_p50_ms": lat.get("p50"),
            "latency_p90_ms": lat.get("p90"),
            "drift_alarm": bool(st["drift"]["alarm"]),
        }
        resp = self.heartbeat(version, telemetry, events)
        self.info["sent"] = {"requests": counters.get("requests", 0), "errors": counters.get("errors", 0)}
        self._save_events([])
        out = {
            "version": version,
            "desired": None if resp.desired is None else resp.desired.version,
            "installed": None,
            "uploaded": 0,
            "poll_after_s": resp.poll_after_s,
            "etag": resp.etag,
        }
        d = resp.desired
        if d is not None and d.version != version and d.sha256 not in self.info.get("refused", []):
            try:
                res = self.install(agent, d, version)
                self.info["installed"] = {"version": d.version, "sha256": d.sha256}
                self._queue_event({"kind": "installed", "version": d.version, "detail": json.dumps(res)[:400]})
                out["installed"] = d.version
            except (UpdateError, SyncClientError, TufRefused) as exc:
                if getattr(exc, "transient", False):  # the network, not the release: the next sync tries again
                    log.warning("release %s not downloaded yet: %s", d.version, exc.message)
                    atomic_write_text(self.dir / "sync.json", json.dumps(self.info, indent=1))
                    out["uploaded"] = 0
                    return out
                if isinstance(exc, TufRefused):  # release metadata refused: nothing is trusted, the caller hears it
                    raise
                self.info.setdefault("refused", []).append(d.sha256)
                self._queue_event({"kind": "install_failed", "version": d.version, "detail": exc.message[:400]})
                log.warning("release %s not installed: %s", d.version, exc.message)
            # tell the server at once (the rollout's gates wait for it), not a heartbeat interval later
            st = agent.status()
            now_serving = None if st["model"] is None else str(st["model"]["version"])
            with contextlib.suppress(SyncClientError):  # not delivered: the events wait for the next heartbeat
                self.heartbeat(now_serving, {"requests": 0}, self._events())
                self._save_events([])
                out["version"] = now_serving
        atomic_write_text(self.dir / "sync.json", json.dumps(self.info, indent=1))
        out["uploaded"] = self.upload_samples(agent)
        return out

    def run(self, agent, stop: threading.Event | None = None, *, long_poll_s: float = 25.0) -> None:  # noqa: ANN001
        """Sync until ``stop`` is set: heartbeat, then long-poll for a change up to the server's interval."""
        stop = stop or threading.Event()
        failures = 0
        while not stop.is_set():
            try:
                out = self.sync_once(agent)
                failures = 0
                deadline = time.monotonic() + out["poll_after_s"]
                while not stop.is_set() and time.monotonic() < deadline:
                    wait = min(long_poll_s, max(1.0, deadline - time.monotonic()))
                    if self.wait_for_change(out["etag"], wait) is not None:
                        break
            except EdgekitError as exc:
                failures += 1
                delay = self._rng.uniform(0, min(300.0, self.backoff * 2 ** min(failures, 10)))
                log.warning("sync failed (%s); retrying in %.0f s", exc.message, delay)
                stop.wait(delay)

    # -- pending events -------------------------------------------------------------------------------------------
    def _events(self) -> list[dict]:
        p = self.dir / "events.json"
        if not p.exists():
            return []
        try:
            events = json.loads(p.read_text())
        except ValueError:  # includes UnicodeDecodeError
            events = None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            # a device runs unattended: set the file aside (only those pending events are lost) and go on syncing
            aside = p.with_name(f"events.json.corrupt-{int(time.time())}")
            os.replace(p, aside)
            log.warning("%s (events waiting for the next heartbeat) was corrupt; moved to %s", p, aside.name)
            return []
        return events

    def _save_events(self, events: list[dict]) -> None:
        atomic_write_text(self.dir / "events.json", json.dumps(events[-100:]))

    def _queue_event(self, event: dict) -> None:
        """Queue an event for the next heartbeat; its text is made what the protocol accepts (no control characters,
        bounded), so that one odd error message can never block the heartbeats."""
        clean = {k: _CONTROL.sub(" ", str(v))[: 64 if k == "version" else 500] for k, v in event.items()}
        self._save_events([*self._events(), clean])


_INFO_KEYS = ("server", "device_id", "metadata_path", "blobs_path")


def _read_info(path: Path) -> dict:
    """The enrollment (``sync.json``), or an AgentError that names the file and says how to recover."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError includes UnicodeDecodeError
        info = None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in _INFO_KEYS):
        raise AgentError(f"{path} (this device's enrollment) is corrupt",
                         hint="enroll again: edgekit agent enroll --server URL --token TOKEN --state DIR")
    return info


def _read_device_key(path: Path):  # noqa: ANN202 - Ed25519PrivateKey
    try:
        return serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise AgentError(f"cannot read this device's key {path}: {exc}",
                         hint="delete the state's sync folder and enroll again (the device gets a new identity)"
                         ) from None


def check_server_url(server: str) -> str:
    """``server`` without a trailing slash if it is an http(s)://HOST[:PORT] URL, else a SyncClientError."""
    try:
        parts = urllib.parse.urlsplit(server)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not re.search(r"[\s\x00-\x1f\x7f]", server)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        ok = False
    if not ok:
        raise SyncClientError(f"{server!r} is not a sync server URL", hint="pass http://HOST:PORT (or https://)")
    return server.rstrip("/")


def http_call(method: str, url: str, data: bytes | None, headers: dict, timeout: float) -> tuple[int, dict, bytes]:
    """One HTTP request with the standard library: (status, headers, body); HTTP errors are answers, not raised.
    Network failures raise OSError (callers retry them); a URL urllib cannot use is a SyncClientError."""
    try:
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) to the configured server
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers or {}), e.read() or b""
    except (ValueError, http.client.InvalidURL) as e:  # unknown url type, spaces or control characters, bad port
        raise SyncClientError(f"cannot request {url!r}: {e}", hint="check the server URL") from None


def _stream_to(url: str, headers: dict, part: Path, timeout: float, chunk: int = 1 << 20,
               counter=None) -> None:  # noqa: ANN001 - called with each chunk's size
    """Append the (Range) response to ``part`` in chunks, fsynced: never the whole blob in memory, and whatever
    arrived before a broken connection is kept for the next attempt."""
    req = urllib.request.Request(url, headers=headers, method="GET")
    try:
        r = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - the configured server
    except urllib.error.HTTPError as e:
        raise http_error(e.code, e.read() or b"", "download") from None
    with r, open(part, "ab" if r.status == 206 else "wb") as f:
        try:
            while True:
                data = r.read(chunk)
                if not data:
                    break
                f.write(data)
                if counter is not None:
                    counter(len(data))
        finally:
            f.flush()
            os.fsync(f.fileno())


def http_error(status: int, data: bytes, what: str) -> HttpError:
    """The error for a refused request, with the service's ``error`` and ``hint`` when the body has them."""
    try:
        body = json.loads(data)
        return HttpError(status, f"{what}: {body.get('error')}", body.get("hint"))
    except (ValueError, AttributeError):
        return HttpError(status, f"{what}: {data[:200]!r}")
