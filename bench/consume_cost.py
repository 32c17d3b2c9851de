"""Consume cost: CPU per message of aio-pika's consumer vs aiormq's, and of batched acks.

Run: `python bench/consume_cost.py [--messages 3000] [--size 100000] [--repeats 3]`.
Each run fills a throwaway quorum queue with equal messages (update-like headers), then
consumes and acks all of them with the aggregator's prefetch, timing this process's CPU and,
when RabbitMQ runs on this machine, the broker's (its `beam.smp` process):
- through aio-pika's `Queue.consume` (an IncomingMessage and a task of its own per message);
- through `basic_consume` on the aiormq channel underneath, one ack frame per message;
- the same, acking ten at a time through `ChannelAcks` as the aggregator acks a version of
  FedBuff K=10: one `multiple` ack frame, and one quorum-queue command, for the ten.
The aggregator's consumer (infra/amqp_broker.py) is the third. The median of `--repeats`
runs of each, interleaved.
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

from bench.drain_ab import local_process_cpu
from bench.harness import AMQP_URL, bench_job_id
from bench.measure import median
from infra.amqp_acks import ChannelAcks

PREFETCH = 22  # the aggregator's for FedBuff K=10: 2 x (K + 1)
VERSION_SIZE = 10  # acks gathered at once, as for one version of FedBuff K=10
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


async def with_aiormq(queue: str, count: int, *, batched: bool = False) -> float:
    """Return the CPU seconds to consume and ack `count` messages on the aiormq channel:
    an ack frame each, or with `batched`, through ChannelAcks ten at a time."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=PREFETCH)
        acks = ChannelAcks(channel)
        done = asyncio.Event()
        held: list[int] = []
        seen = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            properties = message.header.properties
            _ = properties.headers, message.body, properties.message_id
            assert message.delivery_tag is not None
            seen += 1
            if not batched:
                await channel.basic_ack(message.delivery_tag)
            else:
                acks.delivered(message.delivery_tag)
                held.append(message.delivery_tag)
                if len(held) == VERSION_SIZE or seen == count:
                    tags = held.copy()
                    held.clear()
                    await asyncio.gather(*(acks.ack(tag) for tag in tags))
            if seen == count:
                done.set()

        started = time.process_time()
        await channel.basic_consume(queue, on_message)
        async with asyncio.timeout(TIMEOUT):
            await done.wait()
        return time.process_time() - started
    finally:
        await connection.close()


async def with_batched_acks(queue: str, count: int) -> float:
    """`with_aiormq`, acking ten messages at a time through ChannelAcks."""
    return await with_aiormq(queue, count, batched=True)


async def run_once(
    consume: Callable[[str, int], Awaitable[float]], count: int, size: int
) -> tuple[float, float | None]:
    """Fill a fresh queue, consume it with `consume`, delete it; return CPU us per message
    of this process and of the broker (None if it is not on this machine)."""
    queue = f"{bench_job_id('consume-cost')}.raw"
    broker = local_process_cpu("beam.smp")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        try:
            await fill(channel, queue, count, size)
            before = broker() if broker else 0.0
            ours = await consume(queue, count) / count * 1e6
            theirs = (broker() - before) / count * 1e6 if broker else None
            return ours, theirs
        finally:
            await channel.queue_delete(queue)


CONSUMERS = {"aio-pika": with_aio_pika, "aiormq": with_aiormq, "batched": with_batched_acks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in CONSUMERS}
    for run in range(args.repeats):
        for name, consume in CONSUMERS.items():
            runs[name].append(asyncio.run(run_once(consume, args.messages, args.size)))
        print(
            f"run {run + 1}: "
            + ", ".join(f"{name} {_describe(results[-1])}" for name, results in runs.items()),
            file=sys.stderr,
        )
    ours = {name: median([r[0] for r in results]) for name, results in runs.items()}
    broker = {name: [r[1] for r in results if r[1] is not None] for name, results in runs.items()}
    acks = (
        f"broker {median(broker['batched']):.0f} vs {median(broker['aiormq']):.0f} us/msg"
        if broker["batched"] and broker["aiormq"]
        else "broker not on this machine"
    )
    print(
        f"consume-cost: aiormq {ours['aiormq']:.0f} us/msg vs aio-pika {ours['aio-pika']:.0f} "
        f"= ratio {ours['aio-pika'] / ours['aiormq']:.2f}; acks in tens {ours['batched']:.0f} "
        f"us/msg ({acks}); {args.messages} messages of {args.size} bytes, prefetch "
        f"{PREFETCH}, median of {args.repeats}"
    )


def _describe(result: tuple[float, float | None]) -> str:
    ours, broker = result
    return f"{ours:.0f} us/msg" + (f" (broker {broker:.0f})" if broker is not None else "")


if __name__ == "__main__":
    main()
