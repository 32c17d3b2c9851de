"""A broker nack is transient: the agent's publish republishes the same update, on RabbitMQ."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue

from infra import keys
from infra.amqp_broker import AmqpBroker
from infra.errors import BackendUnavailable, PublishUnconfirmed
from infra.retry import retry_unavailable
from schemas import StrategyConfig, UpdateHeader
from tests.conftest import AMQP_URL
from tests.integration.helpers import Backends, delta, job_backends, update

pytestmark = pytest.mark.integration

STRATEGY = StrategyConfig(name="fedasync", alpha=0.5)


@pytest.fixture
async def backends(job_id: str) -> AsyncIterator[Backends]:
    """A declared job on the real RabbitMQ and Redis."""
    async with job_backends("real", job_id, STRATEGY) as opened:
        yield opened


@pytest.fixture
async def full_queue(job_id: str) -> AsyncIterator[AbstractQueue]:
    """A one-message queue on the job's routing key: the broker nacks what it cannot take."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    args = {"x-max-length": 1, "x-overflow": "reject-publish"}
    # Exclusive: it goes with this connection even if the test dies half-way.
    queue = await channel.declare_queue(f"{job_id}.full", exclusive=True, arguments=args)
    await queue.bind(keys.UPDATES_EXCHANGE, routing_key=job_id)
    yield queue
    await connection.close()


def header_of(job: str) -> tuple[UpdateHeader, bytes]:
    """Return the header and body of a well-formed inline update."""
    headers, body, _ = update(job, delta(0.1), as_fields=True)
    return UpdateHeader.model_validate(headers), body


async def message_ids(queue: AbstractQueue) -> list[str | None]:
    """Take every message of `queue` (acked) and return their message ids."""
    ids = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        ids.append(message.message_id)
        await message.ack()
    return ids


async def test_a_nacked_update_is_republished_with_its_id_once_the_queue_has_room(
    backends: Backends, full_queue: AbstractQueue, caplog: pytest.LogCaptureFixture
) -> None:
    # arrange: the first update fills the one-message queue; a consumer frees it in a second
    first, first_body = header_of(backends.config.job)
    second, second_body = header_of(backends.config.job)
    await backends.broker.publish(first, first_body)

    async def drain_soon() -> list[str | None]:
        await asyncio.sleep(1.0)
        return await message_ids(full_queue)

    # act: the agent's publish (device_agent/agent.py: send_update under retry_unavailable)
    draining = asyncio.create_task(drain_soon())
    with caplog.at_level(logging.WARNING, logger="infra.amqp_broker"):
        async with asyncio.timeout(30):
            await retry_unavailable(partial(backends.broker.publish, second, second_body))
    # assert: nacked first, then taken; both queues hold the second update under its own id
    assert await draining == [first.update_id]
    assert any("was nacked by the broker" in r.getMessage() for r in caplog.records)
    assert await message_ids(full_queue) == [second.update_id]
    received = await _job_update_ids(backends)
    # The job queue took the nacked copy too: a duplicate the aggregator skips by update id.
    assert received[0] == first.update_id
    assert set(received[1:]) == {second.update_id}


async def test_an_update_nacked_until_the_deadline_is_a_retryable_outage(
    backends: Backends, full_queue: AbstractQueue
) -> None:
    # arrange: nobody frees the one-message queue; a broker with a short publish deadline
    first, first_body = header_of(backends.config.job)
    second, second_body = header_of(backends.config.job)
    await backends.broker.publish(first, first_body)
    broker = await AmqpBroker.connect(AMQP_URL, publish_timeout=2.0)
    try:
        # act
        started = time.monotonic()
        with pytest.raises(PublishUnconfirmed, match="nacked by the broker") as raised:
            await broker.publish(second, second_body, timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        await broker.close()
    # assert: what the agents' retry loop waits out, after republishing for the deadline
    assert isinstance(raised.value, BackendUnavailable)
    assert 1.5 < elapsed < 20.0
    assert await message_ids(full_queue) == [first.update_id]


async def _job_update_ids(backends: Backends) -> list[str | None]:
    """Take every update of the job's own queue, as the aggregator would, and ack it."""
    ids = []
    async with asyncio.timeout(30):
        async for delivery in backends.broker.consume(
            backends.config.job, prefetch=10, idle_timeout=2.0
        ):
            ids.append(delivery.message_id)
            await delivery.ack()
    return ids
