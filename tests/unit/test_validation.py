"""Header parsing and size/hash checks of the aggregator's validation step."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from aggregator.validation import check_payload, check_sizes, parse_header
from schemas import JobConfig, Rejection, RejectReason, TensorSpec
from schemas.codec import sha256_hex
from schemas.digests import blake3_hex, payload_hex
from schemas.wire import UPDATE_HEADER, update_fields, update_headers, with_fields

pytestmark = pytest.mark.unit
JOB = "job-a"
BODY = b"0123456789"


def _headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "schema_version": 2,
        "job": JOB,
        "update_id": str(uuid.uuid4()),
        "device_id": "dev-1",
        "base_version": 3,
        "num_samples": 100,
        "kind": "delta",
        "codec": "none",
        "payload": "inline",
        "payload_blake3": blake3_hex(BODY),
        "payload_bytes": len(BODY),
        "train_metrics": {"loss": 0.5},
        "sent_at": time.time(),
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not None or k == "signature"}


def _config(max_update_bytes: int = 1000) -> JobConfig:
    return JobConfig(
        job=JOB,
        task="t",
        model_schema={"w": TensorSpec(shape=(2,), dtype="float32")},
        max_update_bytes=max_update_bytes,
        created_at=time.time(),
    )


def test_valid_headers_parse_and_transport_headers_are_ignored() -> None:
    header = parse_header({**_headers(), "x-delivery-count": 2, "x-death": []}, JOB)
    assert header.base_version == 3
    assert header.train_metrics == {"loss": 0.5}


def test_byte_string_headers_are_decoded() -> None:
    raw = _headers()
    raw["device_id"] = b"dev-1"
    assert parse_header(raw, JOB).device_id == "dev-1"


# Bad field values, each with the reason a header holding it is rejected for.
BAD_FIELDS: list[tuple[dict[str, Any], RejectReason]] = [
    ({"update_id": "not-a-uuid"}, RejectReason.MALFORMED_HEADER),
    ({"base_version": -1}, RejectReason.MALFORMED_HEADER),
    ({"base_version": "3"}, RejectReason.MALFORMED_HEADER),
    ({"num_samples": 0}, RejectReason.MALFORMED_HEADER),
    ({"num_samples": 10**12}, RejectReason.MALFORMED_HEADER),
    ({"kind": "gradient"}, RejectReason.MALFORMED_HEADER),
    ({"codec": "zip"}, RejectReason.MALFORMED_HEADER),
    ({"schema_version": 99}, RejectReason.MALFORMED_HEADER),
    ({"device_id": "x" * 500}, RejectReason.MALFORMED_HEADER),
    ({"device_id": b"\xff\xfe"}, RejectReason.MALFORMED_HEADER),
    ({"train_metrics": {"loss": float("nan")}}, RejectReason.MALFORMED_HEADER),
    ({"unexpected": "field"}, RejectReason.MALFORMED_HEADER),
    ({"payload_blake3": "AB" * 32}, RejectReason.MALFORMED_HEADER),
    ({"payload_blake3": "ab" * 31}, RejectReason.MALFORMED_HEADER),
    # Exactly one digest: not both (which one would be checked?), not neither.
    ({"payload_sha256": sha256_hex(BODY)}, RejectReason.MALFORMED_HEADER),
    ({"job": "another-job"}, RejectReason.UNKNOWN_JOB),
]
# The same that a JSON document can carry (not the byte strings of the per-field form).
BAD_DOCUMENT_FIELDS = [
    (changes, reason)
    for changes, reason in BAD_FIELDS
    if not any(isinstance(v, bytes) for v in changes.values())
]


@pytest.mark.parametrize(("changes", "reason"), BAD_FIELDS)
def test_bad_headers_are_rejected_with_reason(
    changes: dict[str, Any], reason: RejectReason
) -> None:
    with pytest.raises(Rejection) as caught:
        parse_header(_headers(**changes), JOB)
    assert caught.value.reason == reason


def _document(**changes: Any) -> dict[str, Any]:
    return {UPDATE_HEADER: json.dumps(_headers(**changes))}


def test_the_document_form_round_trips_every_field_exactly() -> None:
    header = parse_header(_headers(signature="c2ln", sent_at=1_712_345_678.123456789), JOB)
    # Act: send it as agents do, read it back as the aggregator does
    received = parse_header({**update_headers(header), "x-delivery-count": 1}, JOB)
    assert received == header
    assert received.sent_at == 1_712_345_678.123456789


@pytest.mark.parametrize(("changes", "reason"), BAD_DOCUMENT_FIELDS)
def test_a_bad_document_is_rejected_for_the_same_reasons_as_bad_fields(
    changes: dict[str, Any], reason: RejectReason
) -> None:
    with pytest.raises(Rejection) as caught:
        parse_header(_document(**changes), JOB)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "raw",
    [
        {UPDATE_HEADER: "{not json"},
        {UPDATE_HEADER: "[1, 2]"},
        {UPDATE_HEADER: 7},
        {UPDATE_HEADER: {"job": JOB}},
        {**_document(), "device_id": "dev-2"},
    ],
    ids=["not_json", "not_an_object", "a_number", "a_table", "beside_a_field"],
)
def test_a_document_that_is_not_one_json_object_alone_is_malformed(raw: dict[str, Any]) -> None:
    with pytest.raises(Rejection) as caught:
        parse_header(raw, JOB)
    assert caught.value.reason == RejectReason.MALFORMED_HEADER


def test_update_fields_reads_either_form_and_junk_as_nothing() -> None:
    fields = _headers()
    assert update_fields(fields) == fields
    assert update_fields({UPDATE_HEADER: json.dumps(fields)}) == fields
    assert update_fields({UPDATE_HEADER: "{not json"}) == {}
    assert update_fields({UPDATE_HEADER: "[1]"}) == {}


def test_missing_field_is_malformed() -> None:
    raw = _headers()
    del raw["payload_blake3"]
    with pytest.raises(Rejection) as caught:
        parse_header(raw, JOB)
    assert caught.value.reason == RejectReason.MALFORMED_HEADER


def test_too_many_headers_is_malformed() -> None:
    raw = {**_headers(), **{f"h{i}": i for i in range(100)}}
    with pytest.raises(Rejection) as caught:
        parse_header(raw, JOB)
    assert caught.value.reason == RejectReason.MALFORMED_HEADER


@pytest.mark.parametrize(
    ("changes", "body", "reason"),
    [
        ({"payload_bytes": 5000}, BODY, RejectReason.OVERSIZED),
        ({"payload_bytes": 11}, BODY, RejectReason.SIZE_MISMATCH),
        ({"payload": "blob"}, BODY, RejectReason.UNEXPECTED_BODY),
    ],
)
def test_size_checks(changes: dict[str, Any], body: bytes, reason: RejectReason) -> None:
    header = parse_header(_headers(**changes), JOB)
    with pytest.raises(Rejection) as caught:
        check_sizes(header, body, _config())
    assert caught.value.reason == reason


# Agents of this release send BLAKE3 (schema 2); those of the one before, SHA-256 (schema 1).
DIGESTS = {
    "blake3": {},
    "sha256": {"schema_version": 1, "payload_blake3": None, "payload_sha256": sha256_hex(BODY)},
}


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_hash_mismatch(algorithm: str) -> None:
    header = parse_header(_headers(**DIGESTS[algorithm]), JOB)
    with pytest.raises(Rejection) as caught:
        check_payload(header, b"9876543210")
    assert caught.value.reason == RejectReason.HASH_MISMATCH
    assert caught.value.detail == f"payload {algorithm} differs from the header's"


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_a_hash_taken_as_the_payload_arrived_is_the_one_checked(algorithm: str) -> None:
    # The aggregator hashes a claim-check blob while reading it and hands the digest over.
    header = parse_header(_headers(**DIGESTS[algorithm]), JOB)
    digest = payload_hex(header.payload_digest[0], BODY)
    check_payload(header, BODY, digest)
    with pytest.raises(Rejection) as caught:
        check_payload(header, BODY, payload_hex(header.payload_digest[0], b"what arrived"))
    assert caught.value.reason == RejectReason.HASH_MISMATCH


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_good_payload_passes_every_check(algorithm: str) -> None:
    header = parse_header(_headers(**DIGESTS[algorithm]), JOB)
    assert header.payload_digest[0] == algorithm
    check_sizes(header, BODY, _config())
    check_payload(header, BODY)


def test_with_fields_changes_either_form_in_place_and_leaves_junk_alone() -> None:
    fields = _headers()
    assert with_fields(fields, job="job-b") == {**fields, "job": "job-b"}
    moved = with_fields({UPDATE_HEADER: json.dumps(fields), "x-death": []}, job="job-b")
    assert parse_header(moved, "job-b") == parse_header({**fields, "job": "job-b"}, "job-b")
    assert moved["x-death"] == []
    junk = {UPDATE_HEADER: "{not json"}
    assert with_fields(junk, job="job-b") == junk
