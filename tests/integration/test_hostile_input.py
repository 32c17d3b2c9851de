"""Hostile messages beyond the core list, and a hypothesis fuzz over headers and bodies.

Every message here must be dead-lettered with a reason (or refused by the broker before it
is queued), the model must stay at version 0, and the aggregator must keep consuming.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.errors import PublishError
from schemas import SCHEMA_VERSION, StalenessConfig, StrategyConfig
from schemas.codec import encode, sha256_hex
from schemas.digests import blake3_hex
from schemas.wire import UPDATE_HEADER
from tests.integration.helpers import delta, drain, job_backends, update

pytestmark = pytest.mark.integration
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=3, staleness=StalenessConfig(name="constant")
)
GOOD = encode(delta(1.0))


def _headers(**changes: Any) -> dict[str, Any]:
    """An update's headers in the per-field form, with `changes`."""
    headers, _, _ = update("placeholder", delta(1.0), as_fields=True)
    return {**headers, **changes}


def _document(**changes: Any) -> dict[str, Any]:
    """An update's `fedq-update` document, with `changes` made inside it."""
    return {UPDATE_HEADER: json.dumps(_headers(**changes))}


def _corpus(job: str) -> dict[str, tuple[dict[str, Any], bytes, str]]:
    """Hostile messages, each with the reason it must be dead-lettered for."""
    truncated = GOOD[: len(GOOD) // 2]
    oversized = GOOD + b"\0" * 64
    nested: dict[str, Any] = {"x": 1.0}
    for _ in range(20):
        nested = {"inner": nested}
    base = {"job": job}
    return {
        "truncated_body": (
            _headers(**base, payload_bytes=len(truncated), payload_blake3=blake3_hex(truncated)),
            truncated,
            "malformed_payload",
        ),
        "body_longer_than_header": (_headers(**base), oversized, "size_mismatch"),
        "over_job_limit": (_headers(**base, payload_bytes=2**31), GOOD, "oversized"),
        "huge_device_id": (_headers(**base, device_id="d" * 20_000), GOOD, "malformed_header"),
        "nested_metrics": (_headers(**base, train_metrics=nested), GOOD, "malformed_header"),
        "non_utf8_string": (
            _headers(**base, device_id=bytearray(b"\xc3\x28")),
            GOOD,
            "malformed_header",
        ),
        "absurd_num_samples": (_headers(**base, num_samples=10**15), GOOD, "malformed_header"),
        "negative_payload_bytes": (_headers(**base, payload_bytes=-1), GOOD, "malformed_header"),
        "future_schema": (
            _headers(**base, schema_version=SCHEMA_VERSION + 1),
            GOOD,
            "malformed_header",
        ),
        # Both digests: which one would be checked?
        "both_digests": (
            _headers(**base, payload_sha256=sha256_hex(GOOD)),
            GOOD,
            "malformed_header",
        ),
        "codec_lies": (_headers(**base, codec="fp16"), GOOD, "wrong_dtype"),
        "blob_with_body": (_headers(**base, payload="blob"), GOOD, "unexpected_body"),
        "bool_as_version": (_headers(**base, base_version=True), GOOD, "malformed_header"),
        "metrics_not_a_table": (_headers(**base, train_metrics="loss=1"), GOOD, "malformed_header"),
        "empty_headers": ({}, GOOD, "malformed_header"),
        "document_not_json": ({UPDATE_HEADER: "{not json"}, GOOD, "malformed_header"),
        "document_not_an_object": ({UPDATE_HEADER: "[1, 2]"}, GOOD, "malformed_header"),
        "document_not_a_string": ({UPDATE_HEADER: 7}, GOOD, "malformed_header"),
        "document_and_fields": (
            {**_headers(**base), **_document(**base)},
            GOOD,
            "malformed_header",
        ),
        "document_bad_field": (_document(**base, num_samples=0), GOOD, "malformed_header"),
        "document_lies_about_size": (_document(**base, payload_bytes=5), GOOD, "size_mismatch"),
        "document_of_another_job": (_document(job="another-job"), GOOD, "unknown_job"),
    }


@pytest.mark.parametrize("kind", ["real", "memory"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_header_values_are_refused_at_publish(
    kind: str, job_id: str, value: float
) -> None:
    # RabbitMQ closes the connection on a NaN header (Erlang has no NaN): refuse it first.
    async with job_backends(kind, job_id, STRATEGY) as backends:
        with pytest.raises(PublishError, match="not finite"):
            await backends.broker.publish_raw(
                job_id, GOOD, headers=_headers(job=job_id, sent_at=value), message_id=None
            )
        # The connection is still good: a valid update goes through.
        headers, body, update_id = update(job_id, delta(1.0))
        await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        assert (await backends.broker.queue_depth(job_id))[0] == 1


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_hostile_corpus_is_dead_lettered_and_changes_nothing(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, STRATEGY) as backends:
        # Arrange
        expected = {}
        for name, (headers, body, reason) in _corpus(job_id).items():
            message_id = f"{name}-{uuid.uuid4().hex[:6]}"
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=message_id)
            expected[message_id] = reason
        # Act
        aggregator = await drain(backends, idle=0.5)
        # Assert: each for its reason, the model untouched, the loop alive to the end
        dead = await backends.broker.drain_dead_letters(job_id)
        assert {d.message_id: d.reason for d in dead} == expected
        assert await backends.store.current_version() == 0
        assert aggregator.stats.received == len(expected)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars, lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8
)
_field_names = st.sampled_from(
    [
        "schema_version",
        "job",
        "update_id",
        "device_id",
        "base_version",
        "num_samples",
        "kind",
        "codec",
        "payload",
        "payload_blake3",
        "payload_bytes",
        "train_metrics",
        "sent_at",
        "signature",
    ]
)


@st.composite
def _hostile_message(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A well-formed header with some fields replaced by junk, and a junk or honest body."""
    body = draw(st.binary(max_size=300) | st.just(GOOD))
    headers = _headers(payload_bytes=len(body), payload_blake3=blake3_hex(body))
    for name in draw(st.lists(_field_names, max_size=4)):
        headers[name] = draw(_values)
    headers.update(draw(st.dictionaries(st.text(max_size=12), _values, max_size=3)))
    if body == GOOD and headers.get("job") == "placeholder":
        # An honest body under a header that may still be valid: break the header for sure.
        headers["update_id"] = "not-a-uuid"
    return headers, body


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(_hostile_message(), min_size=1, max_size=8))
def test_fuzzed_messages_never_change_the_model(
    messages: list[tuple[dict[str, Any], bytes]],
) -> None:
    asyncio.run(_fuzz(messages))


async def _fuzz(messages: list[tuple[dict[str, Any], bytes]]) -> None:
    job = f"t-fuzz-{uuid.uuid4().hex[:8]}"
    async with job_backends("memory", job, STRATEGY) as backends:
        queued = 0
        for headers, body in messages:
            headers = {**headers, "job": job} if headers.get("job") == "placeholder" else headers
            try:
                await backends.broker.publish_raw(job, body, headers=headers, message_id=None)
            except PublishError:
                continue  # refused by the broker's header encoding: never queued
            queued += 1
        started = time.monotonic()
        aggregator = await drain(backends, idle=0.5)
        dead = await backends.broker.drain_dead_letters(job)
        assert len(dead) == queued
        assert all(d.reason and d.detail for d in dead)
        assert await backends.store.current_version() == 0
        assert aggregator.stats.received == queued
        assert time.monotonic() - started < 30
