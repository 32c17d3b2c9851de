"""Ed25519 signatures over an update header: canonical bytes, sign, verify (pure, no I/O).

The signed bytes are every header field except `signature`, as JSON with sorted keys and no
whitespace, behind a domain-separation prefix. The payload's digest (`payload_blake3`, or
`payload_sha256` in schema 1) is one of those fields, so a valid signature also pins the
payload: the aggregator checks the bytes against the digest.
Keys travel as base64 of their raw 32 bytes (private key files, the Redis registry).
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.messages import UpdateHeader

# A signature made for something else (another protocol, a future header layout) never
# verifies as an update header of this one.
DOMAIN = b"fedq-update-signature-v1\n"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
_DIGEST_FIELDS = ("payload_blake3", "payload_sha256")


class InvalidKey(ValueError):
    """A key string that is not base64 of exactly 32 raw bytes."""


def canonical_bytes(header: UpdateHeader) -> bytes:
    """Return the bytes a device signs: every header field but `signature`, canonically."""
    # `keys` joined the header later: left out while it has its default, so signatures made
    # before it existed still verify (a partial update's `keys` is signed like any field).
    # Of the two digest fields only the one given is signed, for the same reason.
    left_out = {"signature"} | ({"keys"} if header.keys == "all" else set())
    left_out |= {name for name in _DIGEST_FIELDS if getattr(header, name) is None}
    fields = header.model_dump(mode="json", exclude=left_out)
    # Sorted keys and fixed separators make the bytes independent of field and dict order;
    # ensure_ascii keeps them independent of how a peer's JSON library escapes text.
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + text.encode("ascii")


def generate_key_pair() -> tuple[str, str]:
    """Return a new (private key, public key) pair, each as base64 of its raw 32 bytes."""
    private = Ed25519PrivateKey.generate()
    return _b64(private.private_bytes_raw()), _b64(private.public_key().public_bytes_raw())


def public_key_of(private_key: str) -> str:
    """Return the base64 public key that belongs to a base64 private key."""
    return _b64(_private(private_key).public_key().public_bytes_raw())


def signature_of(header: UpdateHeader, private_key: str) -> str:
    """Return the base64 Ed25519 signature of the header's canonical bytes."""
    return _b64(_private(private_key).sign(canonical_bytes(header)))


def sign(header: UpdateHeader, private_key: str) -> UpdateHeader:
    """Return a copy of the header carrying its signature."""
    return header.model_copy(update={"signature": signature_of(header, private_key)})


def verify(header: UpdateHeader, public_key: str) -> bool:
    """Whether the header carries a valid signature by `public_key` (False for any malformation)."""
    if header.signature is None:
        return False
    try:
        signature = _raw(header.signature, SIGNATURE_BYTES)
        key = Ed25519PublicKey.from_public_bytes(_raw(public_key, KEY_BYTES))
        key.verify(signature, canonical_bytes(header))
    except (InvalidKey, InvalidSignature, ValueError):
        return False
    return True


def check_public_key(public_key: str) -> str:
    """Return the key unchanged if it is a valid base64 Ed25519 public key, else InvalidKey."""
    try:
        Ed25519PublicKey.from_public_bytes(_raw(public_key, KEY_BYTES))
    except ValueError as exc:
        raise InvalidKey(f"not an Ed25519 public key: {exc}") from None
    return public_key


def _private(private_key: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_raw(private_key.strip(), KEY_BYTES))


def _raw(text: str, length: int) -> bytes:
    """Decode strict base64 of exactly `length` bytes."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidKey("not valid base64") from None
    if len(raw) != length:
        raise InvalidKey(f"{len(raw)} bytes, expected {length}")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


__all__ = [
    "DOMAIN",
    "InvalidKey",
    "canonical_bytes",
    "check_public_key",
    "generate_key_pair",
    "public_key_of",
    "sign",
    "signature_of",
    "verify",
]
