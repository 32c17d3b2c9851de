"""Header schema versions during a rolling upgrade: the current one and the one before it."""

from __future__ import annotations

import time
import uuid

import pytest

from aggregator.validation import parse_header
from schemas import SCHEMA_VERSION, Rejection, RejectReason
from schemas.messages import accepted_schema_versions

pytestmark = pytest.mark.unit


def _headers(schema_version: object) -> dict[str, object]:
    return {
        "schema_version": schema_version,
        "job": "j",
        "update_id": str(uuid.uuid4()),
        "device_id": "dev-0",
        "base_version": 0,
        "num_samples": 1,
        "payload_sha256": "0" * 64,
        "payload_bytes": 1,
        "sent_at": time.time(),
    }


@pytest.mark.parametrize(
    ("current", "accepted"), [(1, {1}), (2, {1, 2}), (3, {2, 3}), (10, {9, 10})]
)
def test_a_reader_accepts_its_schema_and_the_previous_one(current: int, accepted: set[int]) -> None:
    assert accepted_schema_versions(current) == accepted


def test_the_aggregator_parses_every_accepted_version() -> None:
    for version in accepted_schema_versions(SCHEMA_VERSION):
        assert parse_header(_headers(version), "j").schema_version == version


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, SCHEMA_VERSION - 2, 0, -1, True, "1"])
def test_other_versions_are_malformed_headers_that_say_what_is_accepted(version: object) -> None:
    with pytest.raises(Rejection) as caught:
        parse_header(_headers(version), "j")
    assert caught.value.reason is RejectReason.MALFORMED_HEADER
    assert "schema_version" in caught.value.detail
