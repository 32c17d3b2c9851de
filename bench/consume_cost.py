"""Consume cost: CPU per message of aio-pika's consumer vs aiormq's, on one prefilled queue.

Run: `python bench/consume_cost.py [--messages 3000] [--size 100000] [--repeats 3]`.
Each run fills a throwaway quorum queue with equal messages (update-like headers), then
consumes and acks all of them with the aggregator's prefetch, timing this process's CPU:
through aio-pika's `Queue.consume` (an IncomingMessage and a task of its own per message)
and through `basic_consume` on the aiormq channel underneath, which is how the aggregator's
consumer (infra/amqp_broker.py) reads. The median of `--repeats` runs of each, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aiormq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import AMQP_URL, bench_job_id
from bench.measure import median

PREFETCH = 22  # the aggregator's for FedBuff K=10: 2 x (K + 1)
PUBLISH_BATCH = 50
TIMEOUT = 300.0  # seconds for one consumer to take the whole queue


async def fill(channel: aio_pika.abc.AbstractChannel, queue: str, count: int, size: int) -> None:
    """Publish `count` persistent messages of `size` bytes, with an update's headers."""
    body = os.urandom(size)
    for start in range(0, count, PUBLISH_BATCH):
        batch = min(PUBLISH_BATCH, count - start)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        headers={"job": "bench", "update_id": str(uuid.uuid4()), "base_version": 0},
                        message_id=str(uuid.uuid4()),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                )
                for _ in range(batch)
            )
        )


async def with_aio_pika(queue: str, count: int) -> float:
    """Return the CPU seconds to consume and ack `count` messages through aio-pika."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        source = await channel.get_queue(queue, ensure=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            _ = message.headers, message.body, message.message_id
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        started = time.process_time()
        await source.consume(on_message)
        async with asyncio.timeout(TIMEOUT):
            await done.wait()
        return time.process_time() - started


async def with_aiormq(queue: str, count: int) -> float:
    """Return the CPU seconds to consume and ack `count` messages on the aiormq channel."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=PREFETCH)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            properties = message.header.properties
            _ = properties.headers, message.body, properties.message_id
            assert message.delivery_tag is not None
            await channel.basic_ack(message.delivery_tag)
            seen += 1
            if seen == count:
                done.set()

        started = time.process_time()
        await channel.basic_consume(queue, on_message)
        async with asyncio.timeout(TIMEOUT):
            await done.wait()
        return time.process_time() - started
    finally:
        await connection.close()


async def run_once(consume: Callable[[str, int], Awaitable[float]], count: int, size: int) -> float:
    """Fill a fresh queue, consume it with `consume`, delete it; return CPU us per message."""
    queue = f"{bench_job_id('consume-cost')}.raw"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        try:
            await fill(channel, queue, count, size)
            return await consume(queue, count) / count * 1e6
        finally:
            await channel.queue_delete(queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pika: list[float] = []
    rmq: list[float] = []
    for run in range(args.repeats):
        pika.append(asyncio.run(run_once(with_aio_pika, args.messages, args.size)))
        rmq.append(asyncio.run(run_once(with_aiormq, args.messages, args.size)))
        print(f"run {run + 1}: aio-pika {pika[-1]:.0f} us/msg, aiormq {rmq[-1]:.0f} us/msg")
    ours, baseline = median(rmq), median(pika)
    print(
        f"consume-cost: aiormq {ours:.0f} us/msg vs aio-pika {baseline:.0f} us/msg = "
        f"ratio {baseline / ours:.2f} (CPU saved per message: {baseline - ours:.0f} us); "
        f"{args.messages} messages of {args.size} bytes, prefetch {PREFETCH}, "
        f"median of {args.repeats}"
    )


if __name__ == "__main__":
    main()
