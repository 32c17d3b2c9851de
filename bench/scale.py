"""Scale: 1,000 concurrent light agents against one aggregator; updates/s and p50/p99 latency.

Run: `python bench/scale.py [--quick] [--agents 1000] [--seconds 60] [--repeats 2]`.
Each agent is a coroutine with a tiny model (1,000 float32) and no training, in a closed
loop: publish an update on the latest version it knows (`send_update`, confirmed), wait
until a committed version lists it, think `--think` seconds, again. The agents share
`--connections` broker connections; one aggregator (FedBuff K=10) runs in this process.
Latency is from the start of the publish to the version's `created_at`, read back from its
meta in Redis; updates/s and percentiles count the updates that started in the window after
the first `--warmup` fraction. The baseline runs the same agents, loop and connections on
plain aio-pika: a persistent, confirmed publish of an equal-size message to a quorum queue,
done when a consumer (the aggregator's prefetch, one ack each) has received it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    AMQP_URL,
    BenchJob,
    bench_job,
    bench_job_id,
    fedbuff,
    running_aggregator,
    synthetic_model,
    update_header,
)
from bench.measure import Summary, WindowStats, median, ratio, window_stats
from device_agent.sender import send_update
from infra.amqp_broker import AmqpBroker
from schemas.codec import encode
from schemas.digests import blake3_hex

BUFFER_SIZE = 10
TINY_BYTES = 4_000
DRAIN_TIMEOUT = 120.0
POLL_SECONDS = 0.05
# An update waits behind at most `agents` others, i.e. agents / K versions.
MAX_STALENESS = 2_000

# An agent's round: publish, wait until done; returns when it was done (epoch seconds).
Send = Callable[[int], Awaitable[float]]
Samples = list[tuple[float, float]]


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the default agent count is the issue's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="15 s per run")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of --seconds")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between updates")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


async def closed_loop(send: Send, args: argparse.Namespace, seconds: float) -> WindowStats:
    """Run every agent's publish-wait-think loop for `seconds`; summarize the window.

    Agents keep going past the end until every round begun before it is done: a round waits
    for a buffer to fill, and only later rounds can fill the last one.
    """
    samples: Samples = []
    begin = time.time()
    end = begin + seconds
    open_rounds = 0

    async def agent(index: int) -> None:
        nonlocal open_rounds
        while True:
            started = time.time()
            counted = started < end
            open_rounds += counted
            done_at = await send(index)
            if counted:
                samples.append((started, done_at - started))
                open_rounds -= 1
            if args.think:
                await asyncio.sleep(args.think)

    agents = [asyncio.create_task(agent(i)) for i in range(args.agents)]
    try:
        async with asyncio.timeout(seconds + DRAIN_TIMEOUT):
            # Polled, not evented: it also notices an agent that failed (they only end so).
            while time.time() < end or open_rounds > 0:
                for task in agents:
                    if task.done():
                        task.result()
                await asyncio.sleep(POLL_SECONDS)
    finally:
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    return window_stats(samples, begin + args.warmup * seconds, end)


class InclusionWatcher:
    """Follow committed versions and wake the agents whose updates they contain."""

    def __init__(self, bench: BenchJob) -> None:
        self.bench = bench
        self.version = 0
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.stopped = False

    def stop(self) -> None:
        """End `run` after its current read.

        Not by cancelling: redis-py can swallow a cancellation that lands inside a command
        (redis/redis-py#2028), and a swallowed one left `run` polling forever (a 60 s run hung
        at its end this way).
        """
        self.stopped = True

    async def run(self) -> None:
        """Read each new version's meta and resolve its contributors' futures."""
        while not self.stopped:
            # Polled rather than `wait_for_version` (XREAD BLOCK): in these runs that call
            # now and then did not return before the client's 120 s socket timeout.
            current = await self.bench.store.current_version()
            if current == self.version:
                await asyncio.sleep(POLL_SECONDS)
                continue
            for version in range(self.version + 1, current + 1):
                meta = await self.bench.store.get_meta(version)
                assert meta is not None, f"version {version} has no meta"
                for update_id in meta.contributors:
                    future = self.waiting.pop(update_id, None)
                    if future is not None and not future.done():
                        future.set_result(meta.created_at)
            self.version = current


async def fedq_stats(args: argparse.Namespace, seconds: float) -> WindowStats:
    """Run the agents against an aggregator and return the window's figures."""
    model = synthetic_model(TINY_BYTES, tensors=2)
    payload = encode(synthetic_model(TINY_BYTES, tensors=2, seed=1))
    digest = blake3_hex(payload)
    async with (
        bench_job("scale", model, fedbuff(BUFFER_SIZE, MAX_STALENESS)) as bench,
        broker_pool(args.connections, bench.job) as brokers,
        running_aggregator(bench.job),
    ):
        watcher = InclusionWatcher(bench)
        watching = asyncio.create_task(watcher.run())

        async def send(index: int) -> float:
            header = update_header(bench.config, payload, digest, watcher.version)
            included: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            watcher.waiting[header.update_id] = included
            broker = brokers[index % len(brokers)]
            await send_update(broker, bench.store, bench.config, header, payload)
            # The version's own timestamp: inclusion, not when the watcher noticed it.
            return await included

        try:
            return await closed_loop(send, args, seconds)
        finally:
            watcher.stop()
            await watching


@contextlib.asynccontextmanager
async def broker_pool(size: int, job: str) -> AsyncIterator[list[AmqpBroker]]:
    """Open `size` publishing connections for the agents to share."""
    brokers: list[AmqpBroker] = []
    try:
        for i in range(size):
            brokers.append(await AmqpBroker.connect(AMQP_URL, connection_name=f"{job}-agents-{i}"))
        yield brokers
    finally:
        for broker in brokers:
            await broker.close()


async def raw_stats(args: argparse.Namespace, seconds: float) -> WindowStats:
    """Run the same loop on plain aio-pika: done when the consumer has the message."""
    body = encode(synthetic_model(TINY_BYTES, tensors=2, seed=1))
    queue = f"{bench_job_id('scale')}.raw"
    waiting: dict[str, asyncio.Future[float]] = {}
    connections = [await aio_pika.connect_robust(AMQP_URL) for _ in range(args.connections + 1)]
    try:
        channels = [await c.channel(publisher_confirms=True) for c in connections[1:]]
        consumer = await connections[0].channel()
        await consumer.set_qos(prefetch_count=2 * (BUFFER_SIZE + 1))
        declared = await consumer.declare_queue(
            queue, durable=True, arguments={"x-queue-type": "quorum"}
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            future = waiting.pop(message.message_id or "", None)
            if future is not None and not future.done():
                future.set_result(time.time())

        await declared.consume(on_message, no_ack=False)

        async def send(index: int) -> float:
            message_id = str(uuid.uuid4())
            done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            waiting[message_id] = done
            message = aio_pika.Message(
                body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            channel = channels[index % len(channels)]
            await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
            return await done

        try:
            return await closed_loop(send, args, seconds)
        finally:
            await connections[0].close()
            cleanup = await connections[1].channel()
            await cleanup.queue_delete(queue)
    finally:
        for connection in connections:
            await connection.close()


def main() -> None:
    """Print the summary line: sustained updates/s against raw msg/s, with latencies."""
    args = parse_args()
    torch.set_num_threads(1)
    seconds = 15.0 if args.quick else args.seconds
    ours: list[WindowStats] = []
    raws: list[WindowStats] = []
    for run in range(args.repeats):
        ours.append(asyncio.run(fedq_stats(args, seconds)))
        raws.append(asyncio.run(raw_stats(args, seconds)))
        print(f"scale run {run + 1}: fedq {ours[-1]}, raw {raws[-1]}", file=sys.stderr, flush=True)
    rate_ours = median([s.per_second for s in ours])
    rate_raw = median([s.per_second for s in raws])
    summary = Summary(
        name="scale",
        figure=f"{rate_ours:.0f} updates/s",
        baseline=f"{rate_raw:.0f} msg/s",
        ratio=ratio(rate_ours, rate_raw),
        goal=None,
        extra=(
            f"{args.agents} agents, latency p50 {median([s.p50 for s in ours]):.2f} s "
            f"p99 {median([s.p99 for s in ours]):.2f} s (raw p50 "
            f"{median([s.p50 for s in raws]):.2f} s p99 {median([s.p99 for s in raws]):.2f} s), "
            f"FedBuff K={BUFFER_SIZE}, {seconds:.0f} s runs, median of {args.repeats}"
        ),
    )
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
