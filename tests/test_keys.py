from __future__ import annotations

import logging
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import ConfigError
from edgekit.keys import dev_key, generate_keypair, key_id, load_private_key, load_public_key


def test_generate_writes_loadable_keypair(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k", name="release")
    assert priv == tmp_path / "k" / "release.key" and pub == tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]

    private = load_private_key(priv)
    public = load_public_key(pub)
    assert isinstance(private, Ed25519PrivateKey) and isinstance(public, Ed25519PublicKey)
    kid = key_id(public)
    assert re.fullmatch(r"[0-9a-f]{16}", kid)
    assert key_id(private.public_key()) == kid == key_id(load_public_key(pub))
    # a private key file is accepted where a public key is expected
    assert key_id(load_public_key(priv)) == kid
    # the pair matches: what the private key signs, the public key verifies
    public.verify(private.sign(b"hello"), b"hello")


def test_key_ids_differ_between_keys(tmp_path):
    generate_keypair(tmp_path, name="a")
    generate_keypair(tmp_path, name="b")
    assert key_id(load_public_key(tmp_path / "a.pub")) != key_id(load_public_key(tmp_path / "b.pub"))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    priv, pub = generate_keypair(tmp_path)
    before = key_id(load_public_key(pub))
    with pytest.raises(ConfigError) as info:
        generate_keypair(tmp_path)
    assert info.value.hint and "overwrite" in info.value.hint
    assert key_id(load_public_key(pub)) == before
    generate_keypair(tmp_path, overwrite=True)
    assert key_id(load_public_key(pub)) != before
    assert key_id(load_private_key(priv).public_key()) == key_id(load_public_key(pub))
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_refuses_a_name_with_a_path(tmp_path):
    with pytest.raises(ConfigError):
        generate_keypair(tmp_path, name="../escape")


@pytest.mark.parametrize("loader", [load_private_key, load_public_key])
def test_missing_file_is_config_error(tmp_path, loader):
    with pytest.raises(ConfigError, match="nope.key"):
        loader(tmp_path / "nope.key")


@pytest.mark.parametrize("loader", [load_private_key, load_public_key])
@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all\n",
        b"\x00\xff\x10garbage",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
)
def test_garbage_is_config_error(tmp_path, loader, content):
    path = tmp_path / "garbage.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="garbage.pem"):
        loader(path)


def test_public_file_is_not_a_private_key(tmp_path):
    _, pub = generate_keypair(tmp_path)
    with pytest.raises(ConfigError, match="edgekit.pub"):
        load_private_key(pub)


def _pem_pair(key):
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
    ],
    ids=["rsa", "ec"],
)
def test_non_ed25519_keys_are_config_errors(tmp_path, make):
    priv_pem, pub_pem = _pem_pair(make())
    (tmp_path / "other.key").write_bytes(priv_pem)
    (tmp_path / "other.pub").write_bytes(pub_pem)
    for loader, name in [
        (load_private_key, "other.key"),
        (load_public_key, "other.pub"),
        (load_public_key, "other.key"),
    ]:
        with pytest.raises(ConfigError, match="not an ed25519 key") as info:
            loader(tmp_path / name)
        assert name in str(info.value)


def test_encrypted_private_key_is_config_error(tmp_path):
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "enc.key").write_bytes(pem)
    with pytest.raises(ConfigError, match="enc.key"):
        load_private_key(tmp_path / "enc.key")


def test_dev_key_created_once_and_reused(tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="edgekit.keys"):
        first = dev_key(cache)
    assert first == cache / "keys" / "dev.key"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert any("development" in r.getMessage() and "--key" in r.getMessage() for r in caplog.records)
    kid = key_id(load_private_key(first).public_key())

    caplog.clear()
    second = dev_key(cache)
    assert second == first
    assert key_id(load_private_key(second).public_key()) == kid
    assert not [r for r in caplog.records if r.name == "edgekit.keys" and r.levelno >= logging.WARNING]
