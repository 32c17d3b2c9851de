"""The Broker contract, checked identically on the in-memory broker and on RabbitMQ."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from aggregator.validation import parse_header
from infra.amqp_broker import broker_user
from infra.errors import BackendUnavailable, JobNotFound, PublishError
from infra.memory_broker import MemoryBroker
from infra.protocols import Broker, DeadLetter, Delivery
from schemas import UpdateHeader
from schemas.wire import UPDATE_HEADER
from tests.conftest import AMQP_URL

pytestmark = pytest.mark.contract

WAIT = 5.0  # upper bound on any single wait; the tests themselves take far less


def make_header(job: str, body: bytes, **overrides: Any) -> UpdateHeader:
    """An update header that validates against `body`."""
    fields: dict[str, Any] = {
        "job": job,
        "update_id": str(uuid.uuid4()),
        "device_id": "device-7",
        "base_version": 3,
        "num_samples": 128,
        "payload_sha256": hashlib.sha256(body).hexdigest(),
        "payload_bytes": len(body),
        "train_metrics": {"loss": 0.123456789012345, "accuracy": 0.875},
        "sent_at": time.time(),
        **overrides,
    }
    return UpdateHeader(**fields)


async def publish(broker: Broker, job: str, body: bytes = b"tensor-bytes") -> UpdateHeader:
    header = make_header(job, body)
    await broker.publish(header, body)
    return header


async def take(deliveries: AsyncIterator[Delivery], count: int) -> list[Delivery]:
    """The next `count` deliveries, failing the test if they do not come within WAIT."""
    async with asyncio.timeout(WAIT):
        return [await anext(deliveries) for _ in range(count)]


async def rest(deliveries: AsyncIterator[Delivery]) -> list[Delivery]:
    """Every further delivery until the iterator ends (it needs an idle_timeout)."""
    async with asyncio.timeout(WAIT):
        return [delivery async for delivery in deliveries]


async def dead_letters(broker: Broker, job: str, count: int) -> list[DeadLetter]:
    """Drain until `count` dead letters came (the broker dead-letters asynchronously)."""
    letters: list[DeadLetter] = []
    async with asyncio.timeout(WAIT):
        while len(letters) < count:
            letters += await broker.drain_dead_letters(job)
            await asyncio.sleep(0.05)
    return letters


async def depth(broker: Broker, job: str, expected: tuple[int, int]) -> tuple[int, int]:
    """Queue depth once it equals `expected`, or the last value seen after WAIT."""
    seen = await broker.queue_depth(job)
    deadline = time.monotonic() + WAIT
    while seen != expected and time.monotonic() < deadline:
        # Counts follow settlements (and consumer changes) with a small lag on RabbitMQ.
        await asyncio.sleep(0.05)
        seen = await broker.queue_depth(job)
    return seen


def own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a publisher set (the broker adds `x-` ones of its own)."""
    return {k: v for k, v in headers.items() if not k.startswith("x-")}


async def test_publish_consume_ack_leaves_queue_empty(broker: Broker, job: str) -> None:
    # arrange
    header = await publish(broker, job)
    deliveries = broker.consume(job, prefetch=4, idle_timeout=0.5)

    # act
    [delivery] = await take(deliveries, 1)
    await delivery.ack()

    # assert
    assert delivery.message_id == header.update_id
    assert not delivery.redelivered
    assert await rest(deliveries) == []
    assert await depth(broker, job, (0, 0)) == (0, 0)


async def test_headers_body_and_id_round_trip(broker: Broker, job: str) -> None:
    # arrange
    body = bytes(range(256)) * 4
    header = make_header(job, body, signature="sig-abc", sent_at=1_712_345_678.123456)

    # act
    await broker.publish(header, body)
    async with asyncio.timeout(WAIT):
        deliveries = broker.consume(job, prefetch=1)
        delivery = await anext(deliveries)
        await delivery.ack()
        await deliveries.aclose()

    # assert: the header travels as one JSON document, floats as exact doubles
    assert delivery.message_id == header.update_id
    assert delivery.body == body
    assert set(own_headers(delivery.headers)) == {UPDATE_HEADER}
    assert isinstance(delivery.headers[UPDATE_HEADER], str)
    assert parse_header(delivery.headers, job) == header


async def test_every_delivery_carries_the_publishing_user(broker: Broker, job: str) -> None:
    # arrange: one update, and one raw message
    await publish(broker, job)
    await broker.publish_raw(job, b"raw", headers={}, message_id=str(uuid.uuid4()))
    deliveries = broker.consume(job, prefetch=2, idle_timeout=0.5)

    # act
    received = await take(deliveries, 2)
    for delivery in received:
        await delivery.ack()

    # assert: the user the broker authenticated (RabbitMQ refuses any other user_id)
    assert [d.user_id for d in received] == [broker_user(AMQP_URL)] * 2
    assert await rest(deliveries) == []


async def test_unacked_message_comes_back_redelivered_after_consumer_stops(
    broker: Broker, job: str
) -> None:
    # arrange
    header = await publish(broker, job)
    first = broker.consume(job, prefetch=1)
    [held] = await take(first, 1)

    # act: stop the consumer without settling
    await first.aclose()
    second = broker.consume(job, prefetch=1, idle_timeout=0.5)
    [again] = await take(second, 1)
    await again.ack()

    # assert
    assert not held.redelivered
    assert again.message_id == header.update_id
    assert again.redelivered
    assert await rest(second) == []


async def test_cancelled_consumer_gives_messages_back(broker: Broker, job: str) -> None:
    # arrange
    header = await publish(broker, job)
    deliveries = broker.consume(job, prefetch=1)
    [held] = await take(deliveries, 1)

    # act: cancel the task that waits for the next delivery
    waiting = asyncio.create_task(take(deliveries, 1))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    # assert: the consumer ended, its unacked message is back, its delivery can't be settled
    with pytest.raises(StopAsyncIteration):
        await anext(deliveries)
    with pytest.raises(BackendUnavailable):
        await held.ack()
    second = broker.consume(job, prefetch=1, idle_timeout=0.5)
    [again] = await take(second, 1)
    assert (again.message_id, again.redelivered) == (header.update_id, True)
    await again.ack()
    assert await rest(second) == []


async def test_requeue_redelivers_first(broker: Broker, job: str) -> None:
    # arrange
    first = await publish(broker, job, b"first")
    second = await publish(broker, job, b"second")
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.5)

    # act
    [delivery] = await take(deliveries, 1)
    await delivery.requeue()
    received = []
    for _ in range(2):
        [each] = await take(deliveries, 1)
        await each.ack()
        received.append(each)

    # assert: the requeued message comes back at the front, marked redelivered
    assert delivery.message_id == first.update_id
    assert [(d.message_id, d.redelivered) for d in received] == [
        (first.update_id, True),
        (second.update_id, False),
    ]
    assert await rest(deliveries) == []


async def test_settling_twice_is_refused(broker: Broker, job: str) -> None:
    await publish(broker, job)
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.5)
    [delivery] = await take(deliveries, 1)
    await delivery.ack()

    with pytest.raises(RuntimeError, match="already settled"):
        await delivery.requeue()
    assert await rest(deliveries) == []


async def test_dead_letter_keeps_reason_detail_headers_and_body(broker: Broker, job: str) -> None:
    # arrange
    body = b"\x00suspicious\xff"
    header = await publish(broker, job, body)
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.5)
    [delivery] = await take(deliveries, 1)

    # act
    await delivery.dead_letter("hash_mismatch", "x" * 600)
    [letter] = await dead_letters(broker, job, 1)

    # assert: settled (nothing comes back), and the copy carries everything
    assert await rest(deliveries) == []
    assert letter.reason == "hash_mismatch"
    assert letter.detail == "x" * 500
    assert letter.message_id == header.update_id
    assert letter.body == body
    fields = parse_header(letter.headers, job)
    assert fields == header
    assert await broker.drain_dead_letters(job) == []


async def test_dead_letter_of_a_hostile_message(broker: Broker, job: str) -> None:
    # arrange: headers no UpdateHeader accepts, and no message id
    hostile = {"job": 7, "nested": {"deep": [1, "two", 3.5]}, "blob": bytearray(b"\xff\xfe")}
    await broker.publish_raw(job, b"junk", headers=hostile, message_id=None)
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.5)
    [delivery] = await take(deliveries, 1)

    # act
    await delivery.dead_letter("malformed_header", "job: not a string")
    [letter] = await dead_letters(broker, job, 1)

    # assert: headers are raw (bytes stay bytes), and the broker named the message
    assert delivery.message_id
    assert delivery.headers["blob"] == b"\xff\xfe"
    assert own_headers(letter.headers) == own_headers(delivery.headers)
    assert (letter.reason, letter.message_id, letter.body) == (
        "malformed_header",
        delivery.message_id,
        b"junk",
    )
    assert await rest(deliveries) == []


async def test_publish_of_unencodable_headers_is_refused(broker: Broker, job: str) -> None:
    with pytest.raises(PublishError):
        await broker.publish_raw(job, b"", headers={"bad": object()}, message_id="m-1")
    with pytest.raises(PublishError):
        await broker.publish_raw(job, b"", headers={"big": "x" * 100_000}, message_id="m-2")
    assert await depth(broker, job, (0, 0)) == (0, 0)


async def test_publish_to_undeclared_job_is_refused(broker: Broker, job_id: str) -> None:
    with pytest.raises(PublishError):
        await publish(broker, job_id)


async def test_consuming_an_undeclared_job_is_refused(broker: Broker, job_id: str) -> None:
    with pytest.raises(JobNotFound):
        await anext(broker.consume(job_id, prefetch=1, idle_timeout=0.5))
    with pytest.raises(JobNotFound):
        await broker.queue_depth(job_id)


async def test_idle_timeout_ends_iteration(broker: Broker, job: str) -> None:
    # arrange
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.3)

    # act
    started = time.monotonic()
    received = await rest(deliveries)
    waited = time.monotonic() - started

    # assert
    assert received == []
    assert 0.25 <= waited < 3.0


async def test_single_active_consumer(broker: Broker, job: str) -> None:
    # arrange: the first consumer holds the only message, unacked
    header = await publish(broker, job)
    active = broker.consume(job, prefetch=10)
    [held] = await take(active, 1)
    await publish(broker, job)  # the active consumer may take it; the standby must not

    # act: a second consumer waits
    standby = broker.consume(job, prefetch=10)
    waiting = asyncio.create_task(take(standby, 1))
    await asyncio.sleep(0.5)

    # assert: nothing for the standby until the active one stops; only the active one counts
    assert not waiting.done()
    assert await depth(broker, job, (0, 1)) == (0, 1)
    await active.aclose()
    [taken] = await waiting
    assert (taken.message_id, taken.redelivered) == (header.update_id, True)
    assert not held.redelivered
    await standby.aclose()


async def test_prefetch_bounds_unacked_deliveries(broker: Broker, job: str) -> None:
    # arrange
    headers = [await publish(broker, job, bytes([i])) for i in range(3)]
    deliveries = broker.consume(job, prefetch=2, idle_timeout=0.5)

    # act
    first_two = await take(deliveries, 2)

    # assert: the third stays in the queue until one of the two is acked
    assert await depth(broker, job, (1, 1)) == (1, 1)
    await first_two[0].ack()
    [third] = await take(deliveries, 1)
    assert [d.message_id for d in [*first_two, third]] == [h.update_id for h in headers]
    for delivery in (first_two[1], third):
        await delivery.ack()
    assert await rest(deliveries) == []


async def test_delivery_limit_dead_letters(broker: Broker, job: str) -> None:
    # arrange
    header = await publish(broker, job, b"poison")
    deliveries = broker.consume(job, prefetch=1, idle_timeout=0.5)

    # act: every consumer gives it back (as a crashing consumer would)
    delivered = 0
    async with asyncio.timeout(WAIT):
        async for delivery in deliveries:
            delivered += 1
            await delivery.requeue()

    # assert: the first delivery and five more, then the broker dead-letters it
    assert delivered == 6
    [letter] = await dead_letters(broker, job, 1)
    assert letter.reason == "delivery_limit"
    assert (letter.message_id, letter.body) == (header.update_id, b"poison")
    assert parse_header(letter.headers, job) == header
    assert await depth(broker, job, (0, 0)) == (0, 0)


async def test_queue_depth_counts_ready_messages_and_consumers(broker: Broker, job: str) -> None:
    for i in range(3):
        await publish(broker, job, bytes([i]))
    assert await depth(broker, job, (3, 0)) == (3, 0)

    deliveries = broker.consume(job, prefetch=1)
    [delivery] = await take(deliveries, 1)
    assert await depth(broker, job, (2, 1)) == (2, 1)

    await delivery.ack()
    await deliveries.aclose()
    assert await depth(broker, job, (2, 0)) == (2, 0)


async def test_announce_version_never_raises(broker: Broker, job: str) -> None:
    await broker.announce_version(job, 1)
    await broker.announce_version("no-such-job", 2)
    if isinstance(broker, MemoryBroker):
        assert broker.announcements == [(job, 1), ("no-such-job", 2)]


async def test_declare_job_is_idempotent_and_optionally_logs(broker: Broker, job: str) -> None:
    # arrange
    await broker.declare_job(job, log_stream=True)
    await broker.declare_job(job, log_stream=True)

    # act
    header = await publish(broker, job)

    # assert: one copy in the update queue (the log stream holds another)
    assert await depth(broker, job, (1, 0)) == (1, 0)
    if isinstance(broker, MemoryBroker):
        assert [m[0] for m in broker.logged(job)] == [header.update_id]


async def test_deleting_the_job_fails_its_consumer(broker: Broker, job_id: str) -> None:
    # arrange
    await broker.declare_job(job_id)
    deliveries = broker.consume(job_id, prefetch=1)
    waiting = asyncio.create_task(take(deliveries, 1))
    await asyncio.sleep(0.3)

    # act
    await broker.delete_job(job_id)

    # assert
    with pytest.raises(BackendUnavailable):
        await waiting
