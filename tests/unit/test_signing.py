"""Ed25519 update signatures: canonical bytes, signing, and every way verification must fail."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest

from schemas import UpdateHeader
from schemas.signing import (
    DOMAIN,
    InvalidKey,
    canonical_bytes,
    check_public_key,
    generate_key_pair,
    public_key_of,
    sign,
    verify,
)

pytestmark = pytest.mark.unit
PRIVATE, PUBLIC = generate_key_pair()


def _header(**overrides: Any) -> UpdateHeader:
    fields: dict[str, Any] = {
        "job": "job-1",
        "update_id": str(uuid.UUID(int=7)),
        "device_id": "dev-0",
        "base_version": 3,
        "num_samples": 10,
        "payload_blake3": "ab" * 32,
        "payload_bytes": 120,
        "train_metrics": {"loss": 0.25, "accuracy": 0.5},
        "sent_at": 1_700_000_000.125,
    }
    return UpdateHeader(**{**fields, **overrides})


def test_canonical_bytes_are_sorted_compact_json_without_the_signature() -> None:
    # Arrange
    header = _header()
    # Act
    data = canonical_bytes(header)
    signed_data = canonical_bytes(sign(header, PRIVATE))
    # Assert: stable, independent of the signature, and exactly the documented layout
    assert data == canonical_bytes(_header()) == signed_data
    assert data.startswith(DOMAIN)
    text = data.removeprefix(DOMAIN).decode("ascii")
    assert " " not in text
    fields = json.loads(text)
    assert "signature" not in fields
    assert list(fields) == sorted(fields)
    assert fields["payload_blake3"] == "ab" * 32
    assert "payload_sha256" not in fields


def test_a_schema_1_header_signs_its_sha256_as_before() -> None:
    # Signatures made by agents of the previous release (SHA-256 digests) still verify: the
    # digest field a header does not use is left out of the signed bytes, not signed as null.
    legacy = _header(schema_version=1, payload_blake3=None, payload_sha256="ab" * 32)
    fields = json.loads(canonical_bytes(legacy).removeprefix(DOMAIN))
    assert fields["payload_sha256"] == "ab" * 32
    assert "payload_blake3" not in fields
    assert verify(sign(legacy, PRIVATE), PUBLIC)


def test_canonical_bytes_do_not_depend_on_metric_order() -> None:
    a = _header(train_metrics={"loss": 1.0, "accuracy": 0.5})
    b = _header(train_metrics={"accuracy": 0.5, "loss": 1.0})
    assert canonical_bytes(a) == canonical_bytes(b)


def test_a_signed_header_verifies_with_its_public_key() -> None:
    signed = sign(_header(), PRIVATE)
    assert signed.signature is not None
    assert len(base64.b64decode(signed.signature)) == 64
    assert verify(signed, PUBLIC)
    assert public_key_of(PRIVATE) == PUBLIC


def test_the_signature_survives_the_wire_round_trip() -> None:
    # The aggregator rebuilds the header from AMQP headers: defaults filled in, floats intact.
    signed = sign(_header(), PRIVATE)
    wire = signed.model_dump(mode="json", exclude_none=True)
    assert verify(UpdateHeader.model_validate(wire), PUBLIC)


TAMPERED: dict[str, Any] = {
    "job": "job-2",
    "update_id": str(uuid.UUID(int=8)),
    "device_id": "dev-1",
    "base_version": 4,
    "num_samples": 11,
    "kind": "weights",
    "keys": "partial",
    "codec": "fp16",
    "payload": "blob",
    "payload_blake3": "cd" * 32,
    "payload_sha256": "cd" * 32,
    "payload_bytes": 121,
    "train_metrics": {"loss": 0.0, "accuracy": 0.5},
    "sent_at": 1_700_000_000.126,
}


def test_every_header_field_is_covered() -> None:
    # If a field is added to UpdateHeader, it must be added to TAMPERED (and so is signed).
    assert set(TAMPERED) == set(UpdateHeader.model_fields) - {"schema_version", "signature"}


@pytest.mark.parametrize(("field", "value"), TAMPERED.items())
def test_tampering_with_any_field_breaks_the_signature(field: str, value: Any) -> None:
    # Arrange
    signed = sign(_header(), PRIVATE)
    # Act
    tampered = signed.model_copy(update={field: value})
    # Assert
    assert not verify(tampered, PUBLIC)


def test_another_devices_key_does_not_verify() -> None:
    # Arrange: device B's key signs a header that claims to be device A
    other_private, other_public = generate_key_pair()
    forged = sign(_header(device_id="dev-a"), other_private)
    # Act / Assert
    assert not verify(forged, PUBLIC)
    assert verify(forged, other_public)


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "not base64!",
        base64.b64encode(b"x" * 63).decode(),
        base64.b64encode(b"x" * 64).decode(),
    ],
)
def test_missing_or_malformed_signatures_do_not_verify(signature: str | None) -> None:
    header = _header(signature=signature)
    assert not verify(header, PUBLIC)


@pytest.mark.parametrize("key", ["", "AAAA", "not base64!", base64.b64encode(b"k" * 33).decode()])
def test_malformed_keys_are_refused(key: str) -> None:
    assert not verify(sign(_header(), PRIVATE), key)
    with pytest.raises(InvalidKey):
        check_public_key(key)
    with pytest.raises(InvalidKey):
        public_key_of(key)


def test_key_pairs_are_fresh_and_32_bytes() -> None:
    private, public = generate_key_pair()
    assert (private, public) != (PRIVATE, PUBLIC)
    assert len(base64.b64decode(private)) == len(base64.b64decode(public)) == 32
    assert check_public_key(public) == public


def test_signing_is_fast_enough_for_every_update() -> None:
    header = sign(_header(), PRIVATE)
    start = time.perf_counter()
    for _ in range(200):
        assert verify(header, PUBLIC)
    # Ed25519 verification is tens of microseconds; a generous bound keeps CI stable.
    assert time.perf_counter() - start < 2.0
