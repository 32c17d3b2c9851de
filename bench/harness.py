"""What the benchmarks share: synthetic models, a throwaway job, an in-process aggregator.

Every job created here has its own id (`bench-<name>-<hex>`) and is deleted, keys and
queues, on the way out, even after a failure: the services are shared with other people.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import torch

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.service import Aggregator
from device_agent.sender import send_update
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import JobConfig, StalenessConfig, StrategyConfig, UpdateHeader, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from schemas.digests import blake3_hex

AMQP_URL = os.environ.get("FEDQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("FEDQ_REDIS_URL", "redis://127.0.0.1:6379/0")
# safetensors' JSON header for a handful of tensors stays well under this.
_HEADER_ALLOWANCE = 512


def bench_job_id(name: str) -> str:
    """Return a job id no one else uses."""
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


def synthetic_model(payload_bytes: int, tensors: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Build float32 tensors whose safetensors encoding is about `payload_bytes` long."""
    elements = max(tensors, (payload_bytes - _HEADER_ALLOWANCE) // 4)
    generator = torch.Generator().manual_seed(seed)
    sizes = [elements // tensors] * tensors
    sizes[-1] += elements - sum(sizes)
    return {
        f"layer{i}.weight": torch.randn(n, generator=generator) * 0.01 for i, n in enumerate(sizes)
    }


def fedbuff(buffer_size: int, max_staleness: int = 100) -> StrategyConfig:
    """FedBuff with K=`buffer_size` and FedBuff's 1/sqrt(1+tau) staleness weight."""
    return StrategyConfig(
        name="fedbuff",
        buffer_size=buffer_size,
        max_staleness=max_staleness,
        staleness=StalenessConfig(name="sqrt"),
    )


@dataclass
class BenchJob:
    """A job on the real services with the connections that created it."""

    config: JobConfig
    broker: AmqpBroker
    store: RedisModelStore

    @property
    def job(self) -> str:
        return self.config.job


@contextlib.asynccontextmanager
async def bench_job(
    name: str, model: dict[str, torch.Tensor], strategy: StrategyConfig, **settings: Any
) -> AsyncIterator[BenchJob]:
    """Create a job whose version 0 is `model`, with any other JobConfig `settings`; delete
    all its keys and queues afterwards."""
    job = bench_job_id(name)
    broker = await AmqpBroker.connect(AMQP_URL, connection_name=f"{job}-setup")
    store = RedisModelStore.from_url(REDIS_URL, job)
    config = JobConfig(
        job=job,
        task="bench",
        strategy=strategy,
        model_schema=schema_of(model),
        created_at=time.time(),
        **settings,
    )
    model_bytes = encode(model)
    meta = VersionMeta(
        version=0,
        created_at=time.time(),
        sha256=sha256_hex(model_bytes),
        model_bytes=len(model_bytes),
    )
    try:
        # No log stream: the raw baselines write each message to one queue, and so do we.
        await broker.declare_job(job, log_stream=False)
        await store.create_job(config, model_bytes, meta)
        del model_bytes
        yield BenchJob(config, broker, store)
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


def update_header(
    config: JobConfig, payload: bytes, blake3: str, base_version: int
) -> UpdateHeader:
    """Describe a pre-encoded delta payload (whose BLAKE3 digest is `blake3`) as a fresh
    update (new id, now), as an agent does."""
    return UpdateHeader(
        job=config.job,
        update_id=str(uuid.uuid4()),
        device_id=f"bench-{uuid.uuid4().hex[:6]}",
        base_version=base_version,
        num_samples=10,
        kind="delta",
        codec="none",
        payload="blob" if len(payload) > config.inline_limit_bytes else "inline",
        payload_blake3=blake3,
        payload_bytes=len(payload),
        sent_at=time.time(),
    )


async def publish_updates(
    bench: BenchJob, payload: bytes, count: int, concurrency: int, base_version: int = 0
) -> list[str]:
    """Send `count` copies of a delta as distinct updates, `concurrency` publishers at once."""
    # Hashed once: the aggregator's work is measured, not the publishers'.
    digest = blake3_hex(payload)
    ids: list[str] = []
    remaining = iter(range(count))

    async def publisher() -> None:
        for _ in remaining:
            header = update_header(bench.config, payload, digest, base_version)
            ids.append(header.update_id)
            await send_update(bench.broker, bench.store, bench.config, header, payload)

    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    return ids


@contextlib.asynccontextmanager
async def running_aggregator(job: str) -> AsyncIterator[Aggregator]:
    """Run an aggregator for `job` in this process, on connections of its own."""
    broker = await AmqpBroker.connect(AMQP_URL, connection_name=f"{job}-aggregator")
    store = RedisModelStore.from_url(REDIS_URL, job)
    try:
        async with Aggregator(job=job, broker=broker, store=store) as aggregator:
            task = asyncio.create_task(aggregator.run())
            try:
                yield aggregator
            finally:
                aggregator.stop()
                await task
    finally:
        await store.close()
        await broker.close()


async def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.002) -> None:
    """Poll `predicate` until it holds; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        # Polled: the predicate reads in-process counters that have no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(poll)


@dataclass
class RawQueue:
    """A quorum queue on the same broker for the plain aio-pika baselines."""

    name: str
    publisher: aio_pika.abc.AbstractChannel
    consumer: aio_pika.abc.AbstractChannel

    async def publish(self, body: bytes) -> None:
        """Publish persistent, mandatory and confirmed, as fedq publishes an update."""
        message = aio_pika.Message(
            body, message_id=str(uuid.uuid4()), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.publisher.default_exchange.publish(
            message, routing_key=self.name, mandatory=True, timeout=60
        )

    async def consume(
        self,
        prefetch: int,
        on_message: Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        """Consume with manual acks and `prefetch` unacked messages, as the aggregator does."""
        await self.consumer.set_qos(prefetch_count=prefetch)
        queue = await self.consumer.get_queue(self.name, ensure=True)
        await queue.consume(on_message, no_ack=False)


@contextlib.asynccontextmanager
async def raw_queue(name: str) -> AsyncIterator[RawQueue]:
    """Declare a throwaway quorum queue with a publisher and a consumer connection."""
    queue_name = f"{bench_job_id(name)}.raw"
    pub_conn = await aio_pika.connect_robust(AMQP_URL)
    con_conn = await aio_pika.connect_robust(AMQP_URL)
    try:
        publisher = await pub_conn.channel(publisher_confirms=True, on_return_raises=True)
        consumer = await con_conn.channel()
        await consumer.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        try:
            yield RawQueue(queue_name, publisher, consumer)
        finally:
            # Close the consumer first: deleting a queue under it makes the broker cancel it.
            await con_conn.close()
            cleanup = await pub_conn.channel()
            await cleanup.queue_delete(queue_name)
    finally:
        await con_conn.close()
        await pub_conn.close()
