"""The whole RabbitMQ node goes down mid-run and comes back: nothing is lost or doubled.

Unlike test_connection_loss.py, which only drops connections on the shared broker, this
stops a private node (cleanly, or with SIGKILL of its Erlang VM) while three publishers and
an aggregator are running on it, then starts it again on the same data directory. The
quorum queue keeps every confirmed update; publishers republish what was not confirmed with
the same update id; the aggregator's consumer comes back by itself; the applied set in the
shared Redis turns every repeat into a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
import torch

from aggregator.service import Aggregator
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig, UpdateHeader
from schemas.codec import decode, sha256_hex
from tests.integration.helpers import INITIAL, delta, redis_tiny_job, update
from tests.integration.private_rabbitmq import PrivateRabbitMQ

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
K = 3
PUBLISHERS = 3
# Each publisher keeps going until the node is back, then sends this many more.
TAIL = 10
PAUSE = 0.1
STEP = 0.125
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=K, max_staleness=1000, staleness=StalenessConfig(name="constant")
)
# aio-pika's default is 5 s between reconnection attempts; 0.5 s keeps the test short.
RECONNECT = "?reconnect_interval=0.5"
REPUBLISH_LOG = "publishing %s failed (%r); republishing after reconnect"


@pytest.fixture
async def store(job_id: str) -> AsyncIterator[RedisModelStore]:
    async with redis_tiny_job(job_id, STRATEGY) as redis_store:
        yield redis_store


def _republished_ids(records: list[logging.LogRecord]) -> list[str]:
    """The update ids that publishers logged as republished after a lost link."""
    ids = []
    for record in records:
        if record.name == "infra.amqp_broker" and record.msg == REPUBLISH_LOG:
            assert isinstance(record.args, tuple)
            ids.append(str(record.args[0]).split()[1])  # "message <id> to <exchange>/<key>"
    return ids


async def _wait_applied(store: RedisModelStore, count: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while (applied := await store.applied_count()) < count:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # polling: the store has counters, not events
    return applied


async def _check_exactly_once(store: RedisModelStore, published: list[str]) -> None:
    version = await store.current_version()
    metas = [await store.get_meta(v) for v in range(1, version + 1)]
    assert all(meta is not None and meta.version == v for v, meta in enumerate(metas, 1))
    contributors = [u for meta in metas if meta for u in meta.contributors]
    assert len(contributors) == len(set(contributors)) == len(published)
    assert sorted(contributors) == sorted(published)
    assert version == len(published) // K
    for v, meta in enumerate(metas, 1):
        model_bytes = await store.get_model(v)
        if model_bytes is not None:  # older models are pruned
            assert meta is not None and sha256_hex(model_bytes) == meta.sha256
    latest = await store.get_model(version)
    assert latest is not None
    torch.testing.assert_close(decode(latest)["w"], INITIAL["w"] + version * STEP)
    torch.testing.assert_close(decode(latest)["b"], INITIAL["b"] + version * STEP)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_node_restart_loses_and_doubles_nothing(
    private_rabbitmq: PrivateRabbitMQ,
    store: RedisModelStore,
    job_id: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: three publishers and an aggregator, each on its own robust connection
    caplog.set_level(logging.WARNING, logger="infra.amqp_broker")
    url = private_rabbitmq.url + RECONNECT
    publishers = [await AmqpBroker.connect(url) for _ in range(PUBLISHERS)]
    consumer = await AmqpBroker.connect(url)
    await consumer.declare_job(job_id)
    published: list[str] = []
    restarted = asyncio.Event()

    async def publish_one(broker: AmqpBroker, device: str) -> None:
        headers, body, _ = update(job_id, delta(STEP, STEP), device_id=device, as_fields=True)
        header = UpdateHeader.model_validate(headers)
        await broker.publish(header, body)  # returns once confirmed, across a restart
        published.append(header.update_id)

    async def publish_through(broker: AmqpBroker, device: str) -> None:
        after = 0
        while after < TAIL:
            await publish_one(broker, device)
            if restarted.is_set():
                after += 1
            await asyncio.sleep(PAUSE)

    try:
        async with Aggregator(
            job=job_id, broker=consumer, store=store, retry_seconds=0.2
        ) as aggregator:
            running = asyncio.create_task(aggregator.run())
            publishing = [
                asyncio.create_task(publish_through(broker, f"dev-{i}"))
                for i, broker in enumerate(publishers)
            ]
            # Act: the node goes down mid-run, stays down a moment, and boots again
            await _wait_applied(store, 2 * K, 30)
            before = aggregator.stats.versions
            down = time.monotonic()
            await asyncio.to_thread(
                private_rabbitmq.stop if how == "stop" else private_rabbitmq.kill
            )
            await asyncio.sleep(1.0)
            boot = await asyncio.to_thread(private_rabbitmq.start)
            restarted.set()
            await asyncio.gather(*publishing)
            while len(published) % K:  # whole versions only: K updates each
                await publish_one(publishers[0], "dev-0")
            applied = await _wait_applied(store, len(published), 40)
            recovered = time.monotonic() - down
            still_running = not running.done()
            aggregator.stop()
            await asyncio.wait_for(running, timeout=20)
        # Assert: the aggregator came back by itself and committed after the restart
        assert still_running
        assert applied == len(published)
        assert aggregator.stats.versions > before
        # Publishers republished what the restart left unconfirmed, under the same ids
        republished = _republished_ids(caplog.records)
        assert republished, "no publisher was caught by the restart"
        assert set(republished) <= set(published)
        await _check_exactly_once(store, published)
        assert await consumer.drain_dead_letters(job_id) == []
        print(
            f"\n{how}: first boot {private_rabbitmq.start_seconds[0]:.1f}s, reboot {boot:.1f}s;"
            f" all {len(published)} applied {recovered:.1f}s after the node went down;"
            f" {len(republished)} republishes of {len(set(republished))} ids;"
            f" {aggregator.stats.duplicates} duplicates acked"
        )
    finally:
        try:
            await consumer.delete_job(job_id)
        finally:
            # Closed whatever happened above: a robust connection left open keeps
            # reconnecting, and the event loop's teardown then never ends (the run hangs
            # instead of reporting the failure).
            for broker in (*publishers, consumer):
                await broker.close()
