"""Ingest: updates/s the aggregator applies (FedBuff, K=10) vs raw aio-pika publish+consume.

Run: `python bench/ingest.py [--quick] [--repeats 3] [--sizes 100000,1000000,10000000]`.
Per size, `--concurrency` publishers send N updates of that size (fedq's `send_update`: a
confirmed, persistent, mandatory publish, through a Redis claim-check over the 4 MiB inline
limit) while an aggregator in this process folds them; the figure is N over the time from
the first publish to the commit of the last version. The baseline, in the same process on the
same broker, publishes N equal-size messages the same way to a plain quorum queue and
consumes them with the aggregator's prefetch and one ack each. One summary line per size,
the median of `--repeats` runs of each.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    bench_job,
    fedbuff,
    publish_updates,
    raw_queue,
    running_aggregator,
    synthetic_model,
    wait_until,
)
from bench.measure import Summary, human_bytes, median, rate, ratio
from schemas.codec import encode

BUFFER_SIZE = 10
# Updates per size: enough for several versions at each size, bounded in bytes.
COUNTS = {100_000: 400, 1_000_000: 200, 10_000_000: 40}
QUICK_COUNTS = {100_000: 100, 1_000_000: 50, 10_000_000: 20}
RUN_TIMEOUT = 600.0


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the defaults are the issue's sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--quick", action="store_true", help="fewer updates per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="publishers at once")
    return parser.parse_args()


def update_count(size: int, quick: bool) -> int:
    """Return how many updates to send at `size`: a multiple of K."""
    table = QUICK_COUNTS if quick else COUNTS
    count = table.get(size, 20 if quick else 40)
    return max(BUFFER_SIZE, count - count % BUFFER_SIZE)


async def fedq_rate(size: int, count: int, concurrency: int) -> float:
    """Return the updates/s an aggregator applies with `concurrency` publishers feeding it."""
    model = synthetic_model(size)
    payload = encode(synthetic_model(size, seed=1))
    versions = count // BUFFER_SIZE
    strategy = fedbuff(BUFFER_SIZE, max_staleness=versions + 2)
    async with (
        bench_job("ingest", model, strategy) as bench,
        running_aggregator(bench.job) as aggregator,
    ):
        # Warm up (first consume, first commit) outside the timed window.
        await publish_updates(bench, payload, BUFFER_SIZE, concurrency)
        await wait_until(lambda: aggregator.version >= 1, RUN_TIMEOUT)
        started = time.perf_counter()
        await publish_updates(bench, payload, count, concurrency, base_version=1)
        await wait_until(lambda: aggregator.version >= 1 + versions, RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    return rate(count, elapsed)


async def raw_rate(size: int, count: int, concurrency: int) -> float:
    """Return the messages/s of plain aio-pika publish+consume of `size`-byte messages."""
    body = encode(synthetic_model(size, seed=1))
    consumed = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal consumed
        await message.ack()
        consumed += 1

    async with raw_queue("ingest") as raw:
        # The aggregator's prefetch for K=10: 2 x (K + 1).
        await raw.consume(2 * (BUFFER_SIZE + 1), on_message)
        await publish_raw(raw.publish, body, BUFFER_SIZE, concurrency)
        await wait_until(lambda: consumed >= BUFFER_SIZE, RUN_TIMEOUT)
        started = time.perf_counter()
        await publish_raw(raw.publish, body, count, concurrency)
        await wait_until(lambda: consumed >= BUFFER_SIZE + count, RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    return rate(count, elapsed)


async def publish_raw(
    publish: Callable[[bytes], Awaitable[None]], body: bytes, count: int, concurrency: int
) -> None:
    """Publish `count` messages, `concurrency` confirmed publishes at once."""
    remaining = iter(range(count))

    async def publisher() -> None:
        for _ in remaining:
            await publish(body)

    await asyncio.gather(*(publisher() for _ in range(concurrency)))


def measure(size: int, args: argparse.Namespace) -> Summary:
    """Run fedq and the baseline `repeats` times each, interleaved; summarize the medians."""
    count = update_count(size, args.quick)
    ours: list[float] = []
    raws: list[float] = []
    for run in range(args.repeats):
        ours.append(asyncio.run(fedq_rate(size, count, args.concurrency)))
        raws.append(asyncio.run(raw_rate(size, count, args.concurrency)))
        print(
            f"ingest {human_bytes(size)} run {run + 1}: fedq {ours[-1]:.1f} updates/s, "
            f"raw {raws[-1]:.1f} msg/s ({count} messages)",
            file=sys.stderr,
            flush=True,
        )
    label = human_bytes(size).replace(" ", "")
    return Summary(
        name=f"ingest-{label}",
        figure=f"{median(ours):.1f} updates/s",
        baseline=f"{median(raws):.1f} msg/s",
        ratio=ratio(median(ours), median(raws)),
        goal=0.8,
        extra=f"{count} updates, FedBuff K={BUFFER_SIZE}, median of {args.repeats}",
    )


def main() -> None:
    """Print one summary line per update size."""
    args = parse_args()
    torch.set_num_threads(1)
    for size in (int(s) for s in args.sizes.split(",")):
        print(measure(size, args).line(), flush=True)


if __name__ == "__main__":
    main()
