"""Ed25519 signing keys for bundles: generate, load, identify, and a per-user development key.

Stdlib + ``cryptography`` only: devices load public keys with this module and have no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import ConfigError
from edgekit.fsutil import atomic_write_bytes, check_file_name

logger = logging.getLogger(__name__)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_GENERATE_HINT = "create one with `edgekit keys generate`"


def generate_keypair(out_dir: Path, *, name: str = "edgekit", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PEM PKCS8, unencrypted, mode 0600) and ``<name>.pub`` (PEM SPKI) into ``out_dir``.

    Returns ``(private_path, public_path)``. Existing files are kept unless ``overwrite`` is true.
    """
    check_file_name(name, "key name")
    out_dir = Path(out_dir)
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    existing = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing key file(s): {', '.join(existing)}",
            hint="pass --force (overwrite=True) to replace them, or choose another name or folder",
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # atomic_write_bytes goes through mkstemp, which creates the file 0600 before any byte is written.
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem)
    os.chmod(public_path, 0o644)
    return private_path, public_path


def _read_pem(path: Path, kind: str) -> tuple[bytes, str]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{kind} key file {path} does not exist", hint=_GENERATE_HINT) from None
    except OSError as e:
        raise ConfigError(f"cannot read {kind} key file {path}: {e.strerror or e}") from None
    match = _PEM_LABEL.search(data)
    if match is None:
        raise ConfigError(
            f"{path} is not a PEM key file", hint=f"expected an ed25519 {kind} key in PEM format; {_GENERATE_HINT}"
        )
    return data, match.group(1).decode("ascii")


def _not_ed25519(path: Path, what: object) -> ConfigError:
    return ConfigError(
        f"{path} is not an ed25519 key (it holds a key of type {what})",
        hint=f"edgekit signs bundles with ed25519 only; {_GENERATE_HINT}",
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM ed25519 private key; any problem is a ConfigError naming the file."""
    data, label = _read_pem(path, "private")
    if "PRIVATE KEY" not in label:
        raise ConfigError(f"{path} holds a PEM '{label}', not a private key", hint="pass the .key file, not the .pub")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"private key {path} is encrypted", hint="edgekit expects an unencrypted PKCS8 key (keep it 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"cannot load private key {path}: {e}", hint=_GENERATE_HINT) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _not_ed25519(path, type(key).__name__.removesuffix("PrivateKey").lstrip("_") or "non-ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM ed25519 public key; a private key file is accepted too and its public half returned."""
    data, label = _read_pem(path, "public")
    if "PRIVATE KEY" in label:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"cannot load public key {path}: {e}", hint=_GENERATE_HINT) from None
    if not isinstance(key, Ed25519PublicKey):
        raise _not_ed25519(path, type(key).__name__.removesuffix("PublicKey").lstrip("_") or "non-ed25519")
    return key


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte encoding of an ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable identifier of a key: the first 16 hex characters of sha256(raw public key)."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:16]


def dev_key(cache_dir: Path) -> Path:
    """Path of the per-user development private key ``<cache_dir>/keys/dev.key``, generated on first use."""
    keys_dir = Path(cache_dir) / "keys"
    path = keys_dir / f"dev{PRIVATE_SUFFIX}"
    if path.exists():
        return path
    try:
        generate_keypair(keys_dir, name="dev")
    except ConfigError:
        if not path.exists():  # lost a race with another process only if the key is there now
            raise
        return path
    logger.warning(
        "generated a development signing key at %s; bundles signed with it are for development only. "
        "For production create a key with `edgekit keys generate` and sign with `--key`.",
        path,
    )
    return path
