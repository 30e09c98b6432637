"""Identity for the sync service: admin tokens, single-use enrollment tokens, device keys and short-lived device
tokens obtained by a signed challenge.

- Admins hold a bearer token; only its sha256 is stored.
- An enrollment token (single-use, expiring; sha256 stored) lets a device register its own ed25519 public key; the
  device id is the sha256 of that key, so an id cannot be claimed without the key.
- A device proves itself by signing a challenge (a nonce the service MACs with its secret: stateless, any replica can
  check it, valid for a minute) and receives a bearer token (MAC'd too, 15 minutes) for its requests. The secret is
  a row in the database, shared by every replica.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CHALLENGE_TTL = dt.timedelta(seconds=60)
DEVICE_TOKEN_TTL = dt.timedelta(minutes=15)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    if authorization and authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ").strip()
    return None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def device_id_for(public_key_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def signature_ok(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Macs:
    """Stateless signed tokens (``payload.mac``) for challenges and device sessions."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def issue(self, kind: str, subject: str, ttl: dt.timedelta, now: dt.datetime) -> tuple[str, dt.datetime]:
        exp = now + ttl
        body = _b64(
            json.dumps(
                {"k": kind, "s": subject, "e": int(exp.timestamp()), "n": secrets.token_hex(8)}, separators=(",", ":")
            ).encode()
        )
        return f"{body}.{self._mac(body)}", exp

    def check(self, token: str, kind: str, now: dt.datetime) -> str | None:
        """The subject of a valid, unexpired token of this kind, else None."""
        if len(token) > 1000 or not token.isascii():
            return None
        body, _, mac = token.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(payload, dict) or payload.get("k") != kind or not isinstance(payload.get("e"), int):
            return None
        if payload["e"] < now.timestamp():
            return None
        subject = payload.get("s")
        return subject if isinstance(subject, str) else None


def challenge_message(nonce: str) -> bytes:
    """What a device signs: bound to this purpose, so a signature cannot be replayed elsewhere."""
    return b"edgekit-sync-challenge:" + nonce.encode()
