"""Small filesystem helpers: atomic writes and hashing. Nothing here knows about models."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The file gets ``mode`` if given (set before any data is written), else the permissions the umask allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` atomically.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and ``final`` is left as
    it was, so an interrupted build never leaves a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def check_file_name(name: str, what: str) -> str:
    """``name`` when it is a plain file name (no folder part, not ``.``/``..``, not empty); else ConfigError naming
    ``what`` it is (a bundle name, a key name), so an output cannot land outside the folder it was meant for."""
    from edgekit.errors import ConfigError

    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"invalid {what} {name!r}", hint="use a plain file name such as 'release'")
    return name


def new_folders(path: Path) -> list[Path]:
    """The folders that creating ``path`` (absolute) would add, deepest first: ``[]`` when it exists."""
    missing = []
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def make_dirs(path: Path) -> list[Path]:
    """``path.mkdir(parents=True, exist_ok=True)``, returning the folders it created, deepest first (for
    ``remove_empty``); raises ConfigError when a part of the path exists and is not a folder."""
    from edgekit.errors import ConfigError

    missing = new_folders(path)
    existing = missing[-1].parent if missing else Path(path).absolute()
    if not existing.is_dir():
        raise ConfigError(f"cannot create folder {path}: {existing} exists and is not a folder")
    Path(path).mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; what holds anything stays."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
