"""The ingest baseline's consumer, in a process of its own as the aggregator is.

Run by `bench/ingest.py`: `python bench/raw_consumer.py QUEUE PREFETCH WARMUP COUNT`. It
consumes QUEUE with manual acks and PREFETCH unacked messages (the aggregator's settings),
acks each message as it comes, and prints one line to stdout at each milestone: `ready` once
subscribed, `warm` after WARMUP messages, `done` after WARMUP + COUNT, then exits.
"""

from __future__ import annotations

import asyncio
import os
import sys

import aio_pika

AMQP_URL = os.environ.get("FEDQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def consume(queue_name: str, prefetch: int, warmup: int, count: int) -> None:
    """Ack every message of `queue_name`, announcing `warm` and `done` on stdout."""
    connection = await aio_pika.connect(AMQP_URL)
    finished = asyncio.Event()
    consumed = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal consumed
        await message.ack()
        consumed += 1
        if consumed == warmup:
            print("warm", flush=True)
        if consumed == warmup + count:
            print("done", flush=True)
            finished.set()

    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        await queue.consume(on_message, no_ack=False)
        print("ready", flush=True)
        await finished.wait()


def main() -> None:
    queue_name, prefetch, warmup, count = sys.argv[1], *map(int, sys.argv[2:5])
    asyncio.run(consume(queue_name, prefetch, warmup, count))


if __name__ == "__main__":
    main()
