"""Release metadata with real TUF: FleetRepository (python-tuf Metadata API) served to ReleaseVerifier (ngclient).

The attack tests follow TUF's threat list: each one shows the device refusing with ``TufRefused`` *and* keeping the
last state it verified (the cache in ``cache_dir`` is what survives reboots, so that is what is checked).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import FetcherInterface, UpdaterConfig

from edgekit.sync.tuf_client import HeaderFetcher, ReleaseVerifier, TufRefused
from edgekit.sync.tuf_repo import DictStore, FleetRepository, Keyring, TufRepoError

META = "http://repo/metadata/"
TARGETS = "http://repo/targets/"
CHUNK = 4096


class RepoFetcher(FetcherInterface):
    """Serves a DictStore and blobs like the service would; ``overrides`` lets a test play the attacker."""

    def __init__(self, store: DictStore) -> None:
        self.store = store
        self.blobs: dict[str, bytes] = {}  # "<sha256>.<path>" -> bytes
        self.overrides: dict[str, bytes | Callable[[], Iterator[bytes]]] = {}  # metadata name / blob key -> response
        self.yielded = 0

    def add_blob(self, path: str, data: bytes) -> None:
        self.blobs[f"{hashlib.sha256(data).hexdigest()}.{path}"] = data

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(META):
            name, source = url[len(META) :], self.store.get
        elif url.startswith(TARGETS):
            name, source = url[len(TARGETS) :], self.blobs.get
        else:
            raise tuf_exc.DownloadHTTPError(f"unexpected url {url}", 404)
        body = self.overrides[name] if name in self.overrides else source(name)
        if body is None:
            raise tuf_exc.DownloadHTTPError(f"{name} not found", 404)
        return self._count(body() if callable(body) else (body[i : i + CHUNK] for i in range(0, len(body), CHUNK)))

    def _count(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.yielded += len(chunk)
            yield chunk


@dataclass
class Clock:
    """A settable clock for the repository, so metadata can be produced already expired."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def keys() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def store() -> DictStore:
    return DictStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(store: DictStore, keys: Keyring, clock: Clock) -> FleetRepository:
    r = FleetRepository(store, keys, clock=clock)
    r.init()
    return r


@pytest.fixture
def fetcher(store: DictStore) -> RepoFetcher:
    return RepoFetcher(store)


def publish(repo: FleetRepository, fetcher: RepoFetcher, path: str, data: bytes, custom: dict | None = None) -> int:
    fetcher.add_blob(path, data)
    return repo.add_target(path, len(data), hashlib.sha256(data).hexdigest(), custom)


def verifier(repo: FleetRepository, fetcher: RepoFetcher, cache: Path) -> ReleaseVerifier:
    return ReleaseVerifier(META, repo.trusted_root(), cache, fetcher=fetcher)


def resign(md: Metadata, signer: Signer, expires_in: timedelta = timedelta(days=1)) -> bytes:
    md.signed.expires = datetime.now(UTC) + expires_in
    md.sign(signer)
    return md.to_bytes(JSONSerializer(compact=True))


# -- happy path and repository behaviour -----------------------------------------------------------------------------


def test_happy_path(repo: FleetRepository, fetcher: RepoFetcher, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    custom = {"model": "resnet", "target": "rpi4"}
    assert publish(repo, fetcher, "model.bin", data, custom) == 2
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    sha = hashlib.sha256(data).hexdigest()
    assert v.target("model.bin") == {"path": "model.bin", "length": len(data), "sha256": sha, "custom": custom}
    assert v.trusted_versions() == {"root": 1, "timestamp": 2, "snapshot": 2, "targets": 2}
    assert repo.targets() == {"model.bin": {"length": len(data), "sha256": sha, "custom": custom}}

    good = tmp_path / "good.bin"
    good.write_bytes(data)
    v.verify_file("model.bin", good)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    (tmp_path / "flipped.bin").write_bytes(bytes(flipped))
    with pytest.raises(TufRefused, match="sha256"):
        v.verify_file("model.bin", tmp_path / "flipped.bin")
    (tmp_path / "short.bin").write_bytes(data[:-1])
    with pytest.raises(TufRefused, match="99999 bytes"):
        v.verify_file("model.bin", tmp_path / "short.bin")
    with pytest.raises(TufRefused, match="not a release"):
        v.target("other.bin")

    out = v.download("model.bin", TARGETS, tmp_path / "dl")
    assert out.read_bytes() == data


def test_remove_target_and_stored_bytes_are_what_was_signed(
    repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, tmp_path: Path
) -> None:
    publish(repo, fetcher, "a.bin", b"a" * 10)
    publish(repo, fetcher, "b.bin", b"b" * 20)
    assert repo.remove_target("a.bin") == 4
    with pytest.raises(TufRepoError, match="no target"):
        repo.remove_target("a.bin")
    assert set(repo.targets()) == {"b.bin"}
    # The timestamp records the hash of the exact snapshot bytes stored (no re-serialization anywhere).
    ts = Metadata.from_bytes(store.get("timestamp.json"))
    snap = store.get(f"{ts.signed.snapshot_meta.version}.snapshot.json")
    ts.signed.snapshot_meta.verify_length_and_hashes(snap)
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    with pytest.raises(TufRefused, match="not a release"):
        v.target("a.bin")
    assert v.target("b.bin")["length"] == 20


def test_second_instance_sees_state_and_continues_versions(
    repo: FleetRepository, store: DictStore, keys: Keyring, fetcher: RepoFetcher, tmp_path: Path
) -> None:
    publish(repo, fetcher, "a.bin", b"first")
    replica = FleetRepository(store, keys.online_only())
    assert replica.initialized()
    assert set(replica.targets()) == {"a.bin"}
    assert publish(replica, fetcher, "b.bin", b"second") == 3
    assert publish(repo, fetcher, "c.bin", b"third") == 4  # the first instance did not cache anything stale
    assert set(repo.targets()) == {"a.bin", "b.bin", "c.bin"}
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    assert v.trusted_versions()["targets"] == 4
    assert v.target("b.bin")["length"] == len(b"second")


def test_wrong_keyring_and_double_init_are_refused(repo: FleetRepository, store: DictStore) -> None:
    with pytest.raises(TufRepoError, match="already initialized"):
        repo.init()
    stranger = FleetRepository(store, Keyring.generate())
    with pytest.raises(TufRepoError, match="not a targets key of root v1"):
        stranger.add_target("x.bin", 1, "0" * 64)
    with pytest.raises(TufRepoError, match="invalid sha256"):
        repo.add_target("x.bin", 1, "xyz")


# -- TUF threats -----------------------------------------------------------------------------------------------------


def test_arbitrary_software_replaced_blob_is_refused(
    repo: FleetRepository, fetcher: RepoFetcher, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    publish(repo, fetcher, "model.bin", data)
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    evil = os.urandom(len(data))
    fetcher.overrides[f"{hashlib.sha256(data).hexdigest()}.model.bin"] = evil
    with pytest.raises(TufRefused, match="model.bin.*does not match its signed length/hash"):
        v.download("model.bin", TARGETS, tmp_path / "dl")
    assert not (tmp_path / "dl" / "model.bin").exists()


@pytest.mark.parametrize("compromised", ["nothing", "snapshot+timestamp keys"])
def test_arbitrary_software_forged_targets_metadata_is_refused(
    repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, keys: Keyring, tmp_path: Path, compromised: str
) -> None:
    data = os.urandom(1000)
    publish(repo, fetcher, "model.bin", data)
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    before = v.trusted_versions()

    attacker = CryptoSigner.generate_ed25519()
    evil = os.urandom(1000)
    ts = Metadata.from_bytes(store.get("timestamp.json"))
    snap = Metadata.from_bytes(store.get(f"{ts.signed.snapshot_meta.version}.snapshot.json"))
    targets = Metadata.from_bytes(store.get(f"{snap.signed.meta['targets.json'].version}.targets.json"))
    targets.signed.targets["model.bin"].hashes = {"sha256": hashlib.sha256(evil).hexdigest()}
    targets.signed.version += 1
    targets_bytes = resign(targets, attacker)
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, targets_bytes, ["sha256"])
    online = compromised != "nothing"
    snap_bytes = resign(snap, keys.snapshot if online else attacker)
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, snap_bytes, ["sha256"])
    fetcher.overrides.update(
        {
            f"{targets.signed.version}.targets.json": targets_bytes,
            f"{snap.signed.version}.snapshot.json": snap_bytes,
            "timestamp.json": resign(ts, keys.timestamp if online else attacker),
        }
    )
    role = "targets" if online else "timestamp"
    with pytest.raises(TufRefused, match=f"the {role} metadata is not signed by the trusted {role} key"):
        v.refresh()
    after = v.trusted_versions()
    assert after["targets"] == before["targets"]  # the forged targets never became trusted
    if not online:
        assert after == before
    with pytest.raises(TufRefused):  # and nothing can be looked up from the refused state
        v.target("model.bin")


def test_rollback_of_timestamp_is_refused(
    repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, tmp_path: Path
) -> None:
    publish(repo, fetcher, "a.bin", b"v2")
    old_timestamp = store.get("timestamp.json")  # validly signed timestamp v2
    publish(repo, fetcher, "a.bin", b"v3")
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    assert v.trusted_versions()["timestamp"] == 3

    fetcher.overrides["timestamp.json"] = old_timestamp
    with pytest.raises(TufRefused, match=r"rolled back \(timestamp version 2 < trusted 3\)"):
        v.refresh()
    assert v.trusted_versions()["timestamp"] == 3

    del fetcher.overrides["timestamp.json"]  # attack over: the next release verifies as usual
    publish(repo, fetcher, "a.bin", b"v4")
    v.refresh()
    assert v.target("a.bin")["length"] == 2 and v.trusted_versions()["timestamp"] == 4


def test_freeze_expired_timestamp_is_refused_until_repository_refreshes(
    repo: FleetRepository, fetcher: RepoFetcher, clock: Clock, tmp_path: Path
) -> None:
    v = verifier(repo, fetcher, tmp_path / "cache")
    v.refresh()
    clock.offset = -timedelta(days=2)  # metadata signed "two days ago" with a 1-day timestamp: already expired
    publish(repo, fetcher, "a.bin", b"stale")
    with pytest.raises(TufRefused, match="timestamp metadata has expired"):
        v.refresh()
    assert v.trusted_versions()["timestamp"] == 1

    clock.offset = timedelta(0)
    assert repo.refresh() is True  # the service's periodic job re-signs the timestamp
    assert repo.refresh() is False  # and nothing more is due
    v.refresh()
    assert v.target("a.bin")["length"] == 5
    assert v.trusted_versions()["timestamp"] == 3

    clock.offset = timedelta(days=4, hours=13)  # the snapshot signed "at -2 d" (7 d) has 11 h left: re-signed too
    assert repo.refresh() is True
    assert v.trusted_versions()["snapshot"] == 2
    clock.offset = timedelta(0)
    v.refresh()
    assert v.trusted_versions()["snapshot"] == 3


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_mix_and_match_is_refused(
    repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, tmp_path: Path, role: str
) -> None:
    publish(repo, fetcher, "a.bin", b"one")
    publish(repo, fetcher, "b.bin", b"two")  # snapshot v3 lists targets v3
    fetcher.overrides[f"3.{role}.json"] = store.get(f"2.{role}.json")
    v = verifier(repo, fetcher, tmp_path / "cache")
    with pytest.raises(TufRefused, match=f"the {role} metadata does not match the hash/length its parent recorded"):
        v.refresh()
    assert "targets" not in v.trusted_versions()


def test_endless_data_is_cut_off(repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, tmp_path: Path) -> None:
    real = store.get("timestamp.json")

    def endless() -> Iterator[bytes]:
        yield real
        for _ in range(50 * 1024 * 1024 // CHUNK):  # 50 MB of padding, if anyone read it
            yield b" " * CHUNK

    fetcher.overrides["timestamp.json"] = endless
    v = verifier(repo, fetcher, tmp_path / "cache")
    with pytest.raises(TufRefused, match="timestamp download exceeded its maximum length"):
        v.refresh()
    limit = UpdaterConfig().timestamp_max_length
    assert limit < fetcher.yielded <= limit + CHUNK  # stopped at the first chunk past the limit, not after 50 MB
    assert v.trusted_versions() == {"root": 1}


# -- keys ------------------------------------------------------------------------------------------------------------


def test_keyring_files_reload_and_online_only(tmp_path: Path, fetcher: RepoFetcher) -> None:
    keys_dir = tmp_path / "keys"
    first = Keyring.load_or_create(keys_dir)
    for role in ("root", "targets", "snapshot", "timestamp"):
        path = keys_dir / f"{role}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in keys_dir.iterdir()) == ["root.pem", "snapshot.pem", "targets.pem", "timestamp.pem"]
    assert Keyring.load_or_create(keys_dir).keyids() == first.keyids()
    assert len(set(first.keyids().values())) == 4

    store = fetcher.store
    FleetRepository(store, first).init()
    (keys_dir / "root.pem").unlink()  # the offline key leaves the service
    online = Keyring.load(keys_dir)
    assert online.root is None and online.keyids()["targets"] == first.keyids()["targets"]
    assert Keyring.load_or_create(keys_dir).root is None  # a service start does not make a new root key
    assert not (keys_dir / "root.pem").exists()
    service = FleetRepository(store, online)
    assert publish(service, fetcher, "a.bin", b"hello") == 2
    with pytest.raises(TufRepoError, match="offline root key"):
        FleetRepository(DictStore(), online).init()
    with pytest.raises(TufRepoError, match="offline root key"):
        online.signer("root")


# -- the real HTTP fetcher -------------------------------------------------------------------------------------------


def test_header_fetcher_over_http(
    repo: FleetRepository, fetcher: RepoFetcher, store: DictStore, tmp_path: Path
) -> None:
    data = os.urandom(20_000)
    publish(repo, fetcher, "model.bin", data)
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("X-Device-Token"))
            name = self.path.removeprefix("/metadata/")
            body = store.get(name) if self.path.startswith("/metadata/") else None
            if self.headers.get("X-Device-Token") != "secret":
                self.send_response(401)
            elif body is None:
                self.send_response(404)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metadata"
        v = ReleaseVerifier(url, repo.trusted_root(), tmp_path / "cache", headers={"X-Device-Token": "secret"})
        v.refresh()  # includes a 404 for 2.root.json, which ngclient needs as "no newer root"
        assert v.target("model.bin")["sha256"] == hashlib.sha256(data).hexdigest()
        assert seen and all(token == "secret" for token in seen)

        with pytest.raises(tuf_exc.DownloadHTTPError) as info:
            list(HeaderFetcher({"X-Device-Token": "secret"}, timeout=5).fetch(url + "/nope.json"))
        assert info.value.status_code == 404
        bad = ReleaseVerifier(url, repo.trusted_root(), tmp_path / "cache2", headers={"X-Device-Token": "wrong"})
        with pytest.raises(TufRefused, match="HTTP 401"):
            bad.refresh()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_bad_pinned_root_is_refused(repo: FleetRepository, fetcher: RepoFetcher, tmp_path: Path) -> None:
    tampered = Metadata.from_bytes(repo.trusted_root())
    tampered.signed.version = 7  # no longer matches its signature
    with pytest.raises(TufRefused, match="pinned trusted root"):
        ReleaseVerifier(META, tampered.to_bytes(), tmp_path / "cache", fetcher=fetcher)
