"""RabbitMQ drops every connection of a running federation: nothing is lost or doubled.

The broker force-closes this test's own connections (found by their connection name, so no
other user of the shared broker is touched) twice while updates are being published and
folded. Publishers republish unconfirmed updates with the same id; the aggregator's consumer
comes back and gets its unacked deliveries again; the applied set turns repeats into no-ops.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
import torch

from aggregator.service import Aggregator
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig, UpdateHeader
from schemas.codec import decode
from tests.conftest import AMQP_URL
from tests.integration.helpers import INITIAL, delta, redis_tiny_job, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
K = 3
UPDATES = 60
STEP = 0.25
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=K, max_staleness=1000, staleness=StalenessConfig(name="constant")
)


def _close_connections(name: str, expected: int) -> int:
    """Make RabbitMQ close the connections named `name` once all `expected` are up; how many.

    Closing as soon as one is back would leave the other's loss untested (and a race: under
    load the two robust connections come back seconds apart).
    """
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
    if len(pids) < expected:
        return 0
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "fedq connection-loss test"],
            capture_output=True,
            check=True,
            timeout=30,
        )
    return len(pids)


async def _close_when_connected(name: str) -> int:
    """Wait for both robust connections to be back (aio-pika retries every 5 s), then drop them."""
    for _ in range(40):
        closed = await asyncio.to_thread(_close_connections, name, 2)
        if closed:
            return closed
        await asyncio.sleep(0.5)
    return 0


@pytest.fixture
async def store(job_id: str) -> AsyncIterator[RedisModelStore]:
    async with redis_tiny_job(job_id, STRATEGY) as redis_store:
        yield redis_store


async def test_forced_connection_loss_loses_and_doubles_nothing(
    store: RedisModelStore, job_id: str
) -> None:
    # Arrange: a publisher and an aggregator, each with its own named connection
    name = f"fedq-test-{job_id}"
    publisher = await AmqpBroker.connect(AMQP_URL, connection_name=name)
    consumer = await AmqpBroker.connect(AMQP_URL, connection_name=name)
    await publisher.declare_job(job_id)
    published: list[str] = []

    async def publish_all() -> None:
        for _ in range(UPDATES):
            headers, body, _ = update(job_id, delta(STEP, STEP), as_fields=True)
            header = UpdateHeader.model_validate(headers)
            await publisher.publish(header, body)  # republishes the same id after a loss
            published.append(header.update_id)
            await asyncio.sleep(0.03)

    try:
        async with Aggregator(
            job=job_id, broker=consumer, store=store, retry_seconds=0.2
        ) as aggregator:
            running = asyncio.create_task(aggregator.run())
            publishing = asyncio.create_task(publish_all())
            # Act: the broker drops all our connections, twice, mid-run
            closed = []
            for _ in range(2):
                await asyncio.sleep(0.6)
                closed.append(await _close_when_connected(name))
            await publishing
            # A deadline, not a count of polls: under load each poll takes longer.
            deadline = time.monotonic() + 60
            while await store.applied_count() < UPDATES:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            aggregator.stop()
            await asyncio.wait_for(running, timeout=20)
        # Assert: both connections were really dropped, twice
        assert closed == [2, 2]
        # Every update applied exactly once; versions gapless; the model moved V steps
        version = await store.current_version()
        metas = [await store.get_meta(v) for v in range(1, version + 1)]
        assert all(meta is not None for meta in metas)
        contributors = [u for m in metas if m for u in m.contributors]
        assert sorted(contributors) == sorted(published)
        assert version == UPDATES // K
        latest = await store.get_model(version)
        assert latest is not None
        torch.testing.assert_close(decode(latest)["w"], INITIAL["w"] + version * STEP)
        assert await publisher.drain_dead_letters(job_id) == []
    finally:
        await publisher.delete_job(job_id)
        await publisher.close()
        await consumer.close()
