"""Bundles: a folder (or a single-file ``.ekb`` tar of it) with artifacts, ``manifest.json`` and ``manifest.sig``.

``seal`` hashes every file into the manifest and signs the manifest's exact bytes with ed25519; ``pack`` makes
a byte-deterministic archive; ``open_bundle`` unpacks an archive defensively and checks signature, trust and
every file hash. Stdlib + ``cryptography`` only: devices open bundles without torch or onnx.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import BundleError, SignatureError
from edgekit.fsutil import atomic_write_bytes, sha256_file
from edgekit.keys import key_id, public_key_bytes

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BUNDLE_SCHEMA_VERSION = 1
BUNDLE_SUFFIX = ".ekb"
SIGNATURE_ALGORITHM = "ed25519"
MAX_ARCHIVE_BYTES = 4 << 30  # total uncompressed size of all members
MAX_ARCHIVE_MEMBERS = 10_000
_RESERVED = frozenset({MANIFEST, SIGNATURE})
_SEAL_HINT = "seal the folder with edgekit.bundle.seal (edgekit build does it) before packing or opening it"


def _canonical_json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _relpath(name: str, what: str) -> str:
    """Normalise a relative posix path; refuse anything that could land outside the bundle root."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or PureWindowsPath(name).drive:
        raise BundleError(f"{what} {name!r} is an absolute or unsafe path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise BundleError(f"{what} {name!r} contains a '..' component")
    return "/".join(parts)


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """Sorted posix relative paths of (folders, regular files) under ``root``; refuses links and specials."""
    dirs: list[str] = []
    files: list[str] = []

    def fail(err: OSError) -> None:
        raise BundleError(f"cannot read {err.filename}: {err.strerror}")

    for current, dnames, fnames in os.walk(root, onerror=fail):
        rel = Path(current).relative_to(root)
        for name in dnames + fnames:
            full, relname = Path(current, name), (rel / name).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(
                    f"{full} is a symbolic link; bundles hold only regular files and folders",
                    hint="copy the linked file into the bundle folder instead",
                )
            if stat.S_ISDIR(mode):
                dirs.append(relname)
            elif stat.S_ISREG(mode):
                files.append(relname)
            else:
                raise BundleError(f"{full} is not a regular file or folder")
    return sorted(dirs), sorted(files)


def _payload_files(root: Path) -> list[str]:
    return [f for f in _walk(root)[1] if f not in _RESERVED]


def seal(directory: Path, manifest: dict, private_key: Ed25519PrivateKey) -> dict:
    """Hash every file of ``directory`` into a copy of ``manifest``, write it and its signature; return it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"cannot seal {directory}: not a folder")
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError("seal needs an Ed25519PrivateKey (see edgekit.keys.load_private_key)")
    files = [
        {"path": rel, "sha256": sha256_file(directory / rel), "size": (directory / rel).stat().st_size}
        for rel in _payload_files(directory)
    ]
    sealed = {**manifest, "schema_version": BUNDLE_SCHEMA_VERSION, "files": files}
    try:
        manifest_bytes = _canonical_json(sealed)
    except (TypeError, ValueError) as e:
        raise BundleError(f"the manifest cannot be written as JSON: {e}") from None
    public = private_key.public_key()
    signature = {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": key_id(public),
        "public_key": base64.b64encode(public_key_bytes(public)).decode("ascii"),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    }
    atomic_write_bytes(directory / MANIFEST, manifest_bytes)
    atomic_write_bytes(directory / SIGNATURE, _canonical_json(signature))
    logger.info("sealed %s: %d file(s), signed by key %s", directory, len(files), signature["key_id"])
    return sealed


def pack(directory: Path, archive: Path) -> Path:
    """Write the sealed ``directory`` as a byte-deterministic gzip tar at ``archive`` (atomically)."""
    directory, archive = Path(directory), Path(archive)
    if not all((directory / name).is_file() for name in _RESERVED):
        raise BundleError(f"{directory} is not a sealed bundle (needs {MANIFEST} and {SIGNATURE})", hint=_SEAL_HINT)
    if archive.resolve().is_relative_to(directory.resolve()):
        raise BundleError(f"cannot write the archive {archive} inside the folder it packs")
    dirs, files = _walk(directory)
    dirset = set(dirs)
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for rel in sorted(dirs + files):
                        info = tarfile.TarInfo(rel)
                        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                        if rel in dirset:
                            info.type, info.mode = tarfile.DIRTYPE, 0o755
                            tar.addfile(info)
                            continue
                        info.mode, info.size = 0o644, (directory / rel).stat().st_size
                        with open(directory / rel, "rb") as f:
                            tar.addfile(info, f)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    logger.info("packed %s into %s", directory, archive)
    return archive


@dataclass(frozen=True)
class SignatureStatus:
    valid: bool
    key_id: str
    trusted: bool  # True only when the signing key is one of the trusted keys passed to open_bundle
    detail: str


@dataclass(frozen=True)
class OpenedBundle:
    root: Path  # the folder holding the files (the bundle itself, or where its archive was unpacked)
    manifest: dict
    signature: SignatureStatus
    source: Path

    def path(self, name: str) -> Path:
        """``root / name`` for a file the manifest lists; anything else is a BundleError."""
        if name not in {entry["path"] for entry in self.manifest["files"]}:
            raise BundleError(f"{name!r} is not listed in the manifest of {self.source}")
        return self.root / name


def _safe_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """Check every member before anything is written; return the ones to extract."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for count, info in enumerate(tar, start=1):
        if count > MAX_ARCHIVE_MEMBERS:
            raise BundleError(f"{source} has more than {MAX_ARCHIVE_MEMBERS} members; refusing to unpack it")
        name = _relpath(info.name, f"archive member of {source}")
        if info.issym() or info.islnk():
            kind = "symbolic link" if info.issym() else "hard link"
            raise BundleError(f"{source} contains a {kind} {info.name!r} -> {info.linkname!r}; refusing to unpack it")
        if info.ischr() or info.isblk() or info.isfifo():
            raise BundleError(f"{source} contains a device or fifo {info.name!r}; refusing to unpack it")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            raise BundleError(f"{source} member {info.name!r} is not a regular file or folder")
        if not name:  # the archive root itself ("./")
            if info.isdir():
                continue
            raise BundleError(f"{source} contains a file named {info.name!r}")
        if name in seen:
            raise BundleError(f"{source} contains {name!r} twice; refusing to unpack it")
        seen.add(name)
        total += info.size
        if total > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{source} unpacks to more than {MAX_ARCHIVE_BYTES} bytes; refusing to unpack it")
        members.append(info)
    return members


def _extract(archive: Path, workdir: Path) -> None:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = _safe_members(tar, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: defence in depth on top of our checks
                tar.extractall(workdir, members=members, filter="data")
            else:  # pragma: no cover
                tar.extractall(workdir, members=members)
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        hint = f"expected a sealed folder or a {BUNDLE_SUFFIX} file"
        raise BundleError(f"{archive} is not a readable bundle archive: {e}", hint=hint) from None


def _load_signature(root: Path, source: Path) -> tuple[bytes, str, bytes]:
    """Return (manifest bytes, key id, raw signing key) once the signature verifies."""
    manifest_path, sig_path = root / MANIFEST, root / SIGNATURE
    if not manifest_path.is_file():
        raise BundleError(f"{source} is not a bundle: it has no {MANIFEST}", hint=_SEAL_HINT)
    if not sig_path.is_file():
        raise SignatureError(f"{source} is not signed: it has no {SIGNATURE}", hint=_SEAL_HINT)
    manifest_bytes = manifest_path.read_bytes()
    try:
        doc = json.loads(sig_path.read_bytes())
        if doc["algorithm"] != SIGNATURE_ALGORITHM:
            raise ValueError(f"unsupported algorithm {doc['algorithm']!r}")
        raw_key = base64.b64decode(doc["public_key"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw_key)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise SignatureError(f"{SIGNATURE} of {source} is malformed: {e}") from None
    kid = key_id(public)
    try:
        public.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"the signature of {source} does not match its {MANIFEST} (modified after signing, or corrupt)"
        ) from None
    if doc.get("key_id") != kid:
        raise SignatureError(f"{SIGNATURE} of {source} names key {doc.get('key_id')!r} but was made by key {kid}")
    return manifest_bytes, kid, raw_key


def _check_files(root: Path, manifest: object, source: Path) -> None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise BundleError(f"{MANIFEST} of {source} has no 'files' list")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{source} has bundle schema version {version!r}; this edgekit reads up to {BUNDLE_SCHEMA_VERSION}",
            hint="upgrade edgekit",
        )
    listed: dict[str, dict] = {}
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise BundleError(f"{MANIFEST} of {source} has a malformed file entry: {entry!r}")
        path = entry["path"]
        if _relpath(path, "manifest entry") != path or path in _RESERVED or path in listed:
            raise BundleError(f"{MANIFEST} of {source} lists an invalid or duplicate path {path!r}")
        listed[path] = entry
    present = set(_payload_files(root))
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"{source} is missing file(s) listed in its manifest: {', '.join(missing)}")
    extra = sorted(present - set(listed))
    if extra:
        raise BundleError(
            f"{source} holds file(s) not listed in its manifest: {', '.join(extra)}", hint="added after signing?"
        )
    for path, entry in listed.items():
        if (root / path).stat().st_size != entry.get("size") or sha256_file(root / path) != entry.get("sha256"):
            raise BundleError(f"file {path!r} does not match its manifest hash (tampered or corrupted)")


def open_bundle(
    path: Path, *, trusted_keys: Sequence[Ed25519PublicKey] | None = None, workdir: Path | None = None
) -> OpenedBundle:
    """Open a sealed folder or ``.ekb`` archive and verify signature, trust and every file.

    An archive is unpacked into ``workdir`` (created if absent, must be empty), or into a new temporary folder
    that the caller owns (pass ``workdir`` to control its lifetime). On failure what was unpacked is removed.
    """
    source = Path(path)
    if source.is_dir():
        return _verify(source, source, trusted_keys)
    if not source.is_file():
        raise BundleError(f"no bundle at {source}", hint=f"pass a sealed folder or a {BUNDLE_SUFFIX} file")
    if workdir is None:
        root, created = Path(tempfile.mkdtemp(prefix="edgekit-bundle-")), True
    else:
        root, created = Path(workdir), not Path(workdir).exists()
        if created:
            root.mkdir(parents=True)
        if not root.is_dir() or any(root.iterdir()):
            raise BundleError(f"cannot unpack {source} into {root}: it is not an empty folder")
    try:
        _extract(source, root)
        return _verify(root, source, trusted_keys)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise


def _verify(root: Path, source: Path, trusted_keys: Sequence[Ed25519PublicKey] | None) -> OpenedBundle:
    manifest_bytes, kid, raw_key = _load_signature(root, source)
    if trusted_keys is None:
        detail = f"valid, signed by key {kid}; not checked against a trusted key (pass --pubkey)"
        status = SignatureStatus(True, kid, False, detail)
    elif any(public_key_bytes(k) == raw_key for k in trusted_keys):
        status = SignatureStatus(True, kid, True, f"valid, signed by trusted key {kid}")
    else:
        raise SignatureError(
            f"{source} is signed by key {kid} which is not in the trusted keys",
            hint="pass the public key of whoever built the bundle (--pubkey)",
        )
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{MANIFEST} of {source} is not valid JSON: {e}") from None
    _check_files(root, manifest, source)
    return OpenedBundle(root=root, manifest=manifest, signature=status, source=source)


def read_manifest(path: Path, *, trusted_keys: Sequence[Ed25519PublicKey] | None = None) -> dict:
    """The verified manifest of a bundle folder or archive (an archive is unpacked to a throwaway folder)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-bundle-") as tmp:
        return open_bundle(path, trusted_keys=trusted_keys, workdir=Path(tmp) / "b").manifest
