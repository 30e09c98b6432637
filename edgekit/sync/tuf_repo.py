"""Service side of release metadata: a TUF repository built with python-tuf's Metadata API.

Why TUF rather than one signature over a release list: a single signed list protects against tampering but not
against a mirror (or a compromised CDN) serving an *old* valid list (rollback), freezing the fleet on a list that
never changes (freeze), mixing files from different releases (mix-and-match) or streaming endless junk. TUF's
roles and version/expiry rules close those gaps, and python-tuf's ngclient on the device enforces them.

Layout: consistent snapshots, so every file except ``timestamp.json`` is immutable once written
(``N.root.json``, ``N.snapshot.json``, ``N.targets.json``). New state is written targets -> snapshot -> timestamp,
so a reader that follows ``timestamp.json`` only ever sees complete releases. Nothing is cached in memory: every
operation re-reads the store, so several service replicas (serialized by the service's DB lock) can share one store.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgekit.errors import EdgekitError

__all__ = ["DEFAULT_EXPIRY", "DictStore", "FleetRepository", "Keyring", "MetadataStore", "TufRepoError"]

DEFAULT_EXPIRY: dict[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# One serializer for everything stored: what is hashed into snapshot/timestamp meta must be byte-identical to what is
# served, so bytes are produced once here and never re-serialized.
_SERIALIZER = JSONSerializer(compact=True)

S = TypeVar("S", bound=Signed)


class TufRepoError(EdgekitError):
    """The release-metadata repository cannot do what was asked (not initialized, missing key, wrong keys...)."""


class MetadataStore(Protocol):
    """Where signed metadata lives; names are exactly what a TUF client requests (``"3.targets.json"``...)."""

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> None: ...


class DictStore:
    """In-memory ``MetadataStore`` for tests and the CLI."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        return self.files.get(name)

    def put(self, name: str, data: bytes) -> None:
        self.files[name] = bytes(data)


def _write_new_private(path: Path, pem: bytes) -> bool:
    """Create ``path`` (0600) atomically *without clobbering*; return False if another process created it first.

    Temp file + ``os.link`` rather than ``os.replace``: two replicas starting together on an empty keys folder must
    end up with one key, not each sign with a key the other silently overwrote.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # file system without hard links: fall back to a plain atomic rename
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _load_signer(path: Path) -> CryptoSigner:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise TufRepoError(f"{path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise TufRepoError(f"{path} is not an ed25519 key", hint="TUF keys here are ed25519 (PKCS8 PEM)")
    return CryptoSigner(key)


@dataclass(frozen=True)
class Keyring:
    """The four TUF role keys. ``root`` is the offline key (only for creating root); it may be ``None`` on replicas
    that run with the online keys only, which is enough to publish targets and keep timestamps fresh."""

    root: CryptoSigner | None
    targets: CryptoSigner
    snapshot: CryptoSigner
    timestamp: CryptoSigner

    @classmethod
    def generate(cls) -> Keyring:
        """Fresh in-memory ed25519 keys (tests)."""
        return cls(*(CryptoSigner.generate_ed25519() for _ in ROLES))

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> Keyring:
        """Load ``root.pem``, ``targets.pem``, ``snapshot.pem``, ``timestamp.pem`` from ``keys_dir``; a new folder gets
        all four (0600, atomic). Idempotent: the second call loads the same keys. Once the online keys exist, a
        missing ``root.pem`` is not re-created: the root key was taken offline (an online-only keyring; creating a
        fleet then needs the root key back)."""
        keys_dir = Path(keys_dir)
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if all((keys_dir / f"{r}.pem").exists() for r in ONLINE_ROLES):
            return cls.load(keys_dir)
        for role in ROLES:
            path = keys_dir / f"{role}.pem"
            if not path.exists():
                _write_new_private(path, CryptoSigner.generate_ed25519().private_bytes)
        return cls.load(keys_dir)

    @classmethod
    def load(cls, keys_dir: Path) -> Keyring:
        """Load existing keys only; ``root.pem`` is optional (``root=None``: online-only replica)."""
        keys_dir = Path(keys_dir)
        missing = [f"{r}.pem" for r in ONLINE_ROLES if not (keys_dir / f"{r}.pem").exists()]
        if missing:
            raise TufRepoError(
                f"missing online TUF key(s) in {keys_dir}: {', '.join(missing)}",
                hint="create them with Keyring.load_or_create() on the machine that holds the keys",
            )
        root_path = keys_dir / "root.pem"
        return cls(
            root=_load_signer(root_path) if root_path.exists() else None,
            targets=_load_signer(keys_dir / "targets.pem"),
            snapshot=_load_signer(keys_dir / "snapshot.pem"),
            timestamp=_load_signer(keys_dir / "timestamp.pem"),
        )

    def online_only(self) -> Keyring:
        """The same keyring without the offline root key (what a replica should hold)."""
        return Keyring(None, self.targets, self.snapshot, self.timestamp)

    def signer(self, role: str) -> CryptoSigner:
        """The signer for ``role``; a clear error when the offline root key is not here."""
        signer = getattr(self, role)
        if signer is None:
            raise TufRepoError(
                f"the offline {role} key is needed for this and this keyring has none",
                hint=f"run this where {role}.pem is available (the online keys cannot create or rotate root)",
            )
        return signer

    def keyids(self) -> dict[str, str | None]:
        """Role -> key id (``None`` for a missing root key); handy to compare keyrings and to log."""
        return {r: (s.public_key.keyid if (s := getattr(self, r)) is not None else None) for r in ROLES}


@dataclass
class _State:
    """The current repository state as loaded from the store (never kept between operations)."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]


class FleetRepository:
    """Publishes signed release metadata (root, targets, snapshot, timestamp) into a ``MetadataStore``."""

    def __init__(
        self,
        store: MetadataStore,
        keys: Keyring,
        *,
        expiry: dict[str, timedelta] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        unknown = set(expiry or {}) - set(ROLES)
        if unknown:
            raise TufRepoError(f"unknown role(s) in expiry: {sorted(unknown)}", hint=f"roles are {', '.join(ROLES)}")
        self.store = store
        self.keys = keys
        self.expiry = {**DEFAULT_EXPIRY, **(expiry or {})}
        self._clock = clock or (lambda: datetime.now(UTC))

    # -- reading -----------------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        # tuf insists on tz == timezone.utc exactly (a ZoneInfo("UTC") would be refused), hence the conversion.
        return self._clock().astimezone(UTC)

    def _load(self, name: str, role: type[S]) -> Metadata[S]:
        data = self.store.get(name)
        if data is None:
            raise TufRepoError(f"release metadata {name} is missing from the store", hint="was init() run?")
        md: Metadata[Any] = Metadata.from_bytes(data)
        if md.signed.type != role.type:
            raise TufRepoError(f"{name} holds {md.signed.type} metadata, expected {role.type}")
        return md

    def _root_version(self) -> int:
        """Latest root version, found by probing ``N.root.json`` like a client does (0 when not initialized)."""
        version = 0
        while self.store.get(f"{version + 1}.root.json") is not None:
            version += 1
        return version

    def _state(self) -> _State:
        root_version = self._root_version()
        if root_version == 0:
            raise TufRepoError("the release metadata repository is not initialized", hint="call init() first")
        timestamp = self._load("timestamp.json", Timestamp)
        snapshot = self._load(f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise TufRepoError(f"snapshot v{snapshot.signed.version} has no targets.json entry")
        return _State(
            root=self._load(f"{root_version}.root.json", Root),
            targets=self._load(f"{targets_meta.version}.targets.json", Targets),
            snapshot=snapshot,
            timestamp=timestamp,
        )

    def initialized(self) -> bool:
        """Whether root v1 exists in the store."""
        return self.store.get("1.root.json") is not None

    def trusted_root(self) -> bytes:
        """The latest root metadata bytes: what a device pins at enrollment."""
        version = self._root_version()
        if version == 0:
            raise TufRepoError("the release metadata repository is not initialized", hint="call init() first")
        data = self.store.get(f"{version}.root.json")
        if data is None:
            raise TufRepoError(f"root metadata version {version} disappeared from the store")
        return data

    def targets(self) -> dict[str, dict[str, Any]]:
        """Current target path -> ``{"length", "sha256", "custom"}``."""
        files = self._state().targets.signed.targets
        return {p: {"length": t.length, "sha256": t.hashes.get("sha256"), "custom": t.custom} for p, t in files.items()}

    # -- writing -----------------------------------------------------------------------------------------------

    def _signer(self, role: str, root: Root) -> CryptoSigner:
        """``role``'s signer, checked against root: signing with a key root does not list only makes devices refuse."""
        signer = self.keys.signer(role)
        if signer.public_key.keyid not in root.roles[role].keyids:
            raise TufRepoError(
                f"the {role} key in this keyring ({signer.public_key.keyid[:12]}...) is not a {role} key of root "
                f"v{root.version}: clients would refuse what it signs",
                hint="load the keys this repository was initialized with",
            )
        return signer

    def _sign_and_put(self, md: Metadata[Any], role: str, name: str, root: Root) -> bytes:
        """Sign ``md`` with ``role``'s key and store it; returns the exact bytes stored (hashed by the parent)."""
        signer = self._signer(role, root)
        md.signed.expires = self._now() + self.expiry[role]
        md.sign(signer)
        data = md.to_bytes(_SERIALIZER)
        self.store.put(name, data)
        return data

    def _publish(self, state: _State, *, targets_changed: bool, snapshot_changed: bool) -> None:
        """Write the changed roles in dependency order (targets -> snapshot -> timestamp), bumping versions."""
        root = state.root.signed
        for role in ONLINE_ROLES:  # all keys checked before the first write: no half-published release
            self._signer(role, root)
        snapshot = state.snapshot.signed
        if targets_changed:
            targets = state.targets.signed
            targets.version += 1
            data = self._sign_and_put(state.targets, "targets", f"{targets.version}.targets.json", root)
            snapshot.meta["targets.json"] = MetaFile.from_data(targets.version, data, ["sha256"])
            snapshot_changed = True
        if snapshot_changed:
            snapshot.version += 1
            data = self._sign_and_put(state.snapshot, "snapshot", f"{snapshot.version}.snapshot.json", root)
            state.timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.version, data, ["sha256"])
        state.timestamp.signed.version += 1
        self._sign_and_put(state.timestamp, "timestamp", "timestamp.json", root)

    def init(self) -> None:
        """Create root v1 (consistent snapshots, threshold 1 per role) and empty targets/snapshot/timestamp v1."""
        if self.initialized():
            raise TufRepoError("the release metadata repository is already initialized")
        self.keys.signer("root")  # fail before writing anything
        root = Root(consistent_snapshot=True)
        for role in ROLES:
            root.add_key(self.keys.signer(role).public_key, role)
        targets_md = Metadata(Targets(version=1))
        targets_data = self._sign_and_put(targets_md, "targets", "1.targets.json", root)
        snapshot_md = Metadata(
            Snapshot(version=1, meta={"targets.json": MetaFile.from_data(1, targets_data, ["sha256"])})
        )
        snapshot_data = self._sign_and_put(snapshot_md, "snapshot", "1.snapshot.json", root)
        timestamp_md = Metadata(Timestamp(version=1, snapshot_meta=MetaFile.from_data(1, snapshot_data, ["sha256"])))
        self._sign_and_put(timestamp_md, "timestamp", "timestamp.json", root)
        # Root last: initialized() (probing 1.root.json) only turns true once everything it points to exists.
        self._sign_and_put(Metadata(root), "root", "1.root.json", root)

    def add_target(self, path: str, length: int, sha256: str, custom: dict[str, Any] | None = None) -> int:
        """Add or replace ``path``; publishes new targets, snapshot and timestamp. Returns the new targets version."""
        if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
            raise TufRepoError(f"invalid target path {path!r}", hint="use a relative path such as 'models/x.bin'")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise TufRepoError(f"invalid target length {length!r} for {path}")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise TufRepoError(f"invalid sha256 for {path}: {sha256!r}", hint="64 lowercase hex digits")
        state = self._state()
        extra = {"custom": custom} if custom else None
        state.targets.signed.targets[path] = TargetFile(length, {"sha256": sha256}, path, extra)
        self._publish(state, targets_changed=True, snapshot_changed=True)
        return state.targets.signed.version

    def remove_target(self, path: str) -> int:
        """Remove ``path`` (it must exist); publishes like ``add_target``. Returns the new targets version."""
        state = self._state()
        if state.targets.signed.targets.pop(path, None) is None:
            raise TufRepoError(f"no target {path!r} in targets v{state.targets.signed.version}")
        self._publish(state, targets_changed=True, snapshot_changed=True)
        return state.targets.signed.version

    def refresh(self, min_valid: timedelta = timedelta(hours=12)) -> bool:
        """Re-sign whatever online role expires within ``min_valid`` (timestamp, snapshot, and targets too since its
        key is online as well); returns whether anything was published. Call periodically, well under
        ``min_valid``, or devices see expired metadata. Root cannot be refreshed here (offline key)."""
        state = self._state()
        deadline = self._now() + min_valid
        targets_due = state.targets.signed.expires <= deadline
        snapshot_due = targets_due or state.snapshot.signed.expires <= deadline
        if not (snapshot_due or state.timestamp.signed.expires <= deadline):
            return False
        self._publish(state, targets_changed=targets_due, snapshot_changed=snapshot_due)
        return True
