"""Ingest: updates/s the aggregator applies (FedBuff, K=10) vs raw aio-pika publish+consume.

Run: `python bench/ingest.py [--quick] [--repeats 3] [--sizes 100000,1000000,10000000]`.
Per size, `--concurrency` publishers in this process send N updates of that size (fedq's
`send_update`: a confirmed, persistent, mandatory publish, through a Redis claim-check over
the 4 MiB inline limit) while the aggregator service (`python -m aggregator`, a child
process, as it runs in production) folds them; the figure is N over the time from the first
publish to the commit of the last version. The baseline, in the same run on the same broker,
publishes N equal-size messages the same way to a plain quorum queue, and a child process
(`bench/raw_consumer.py`) consumes them with the aggregator's prefetch and one ack each: the
same split of work between processes, so neither side shares its event loop with its
publishers. One summary line per size, the median of `--repeats` runs of each.

Then, unless `--no-drain`, the same per size with the queue filled before the consumer
starts (`ingest-drain-*`, no goal): each consumer alone, from its first version (or first 10
messages) to its last, which separates the aggregator's own capacity from the broker's
publish path and the CPU the two sides share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain_ab import local_process_cpu, process_cpu
from bench.harness import (
    AMQP_URL,
    REDIS_URL,
    bench_job,
    fedbuff,
    publish_updates,
    raw_queue,
    synthetic_model,
)
from bench.measure import Summary, human_bytes, median, rate, ratio
from infra.redis_store import RedisModelStore
from schemas.codec import encode

BUFFER_SIZE = 10
# Updates per size: enough for several versions at each size, bounded in bytes. At 100 KB,
# 1,000 updates took the raw baseline about a second, and its rate moved by 50% from one run
# to the next (685-1,050 msg/s, 2026-12-02); 3,000 keep each run several seconds long. At
# 1 MB, 400 updates lasted 1.6 s and gave 0.60-0.83 from run to run; 1,500 gave 0.69-0.77.
COUNTS = {100_000: 3000, 1_000_000: 1500, 10_000_000: 100}
QUICK_COUNTS = {100_000: 100, 1_000_000: 50, 10_000_000: 20}
RUN_TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parents[1]
RAW_CONSUMER = str(ROOT / "bench" / "raw_consumer.py")


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the defaults are the issue's sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--quick", action="store_true", help="fewer updates per size")
    parser.add_argument(
        "--updates", type=int, default=None, help="updates per size (default: by size)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="publishers at once")
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        help="skip the drain runs (queue filled first: each consumer alone)",
    )
    return parser.parse_args()


def update_count(size: int, quick: bool, asked: int | None = None) -> int:
    """Return how many updates to send at `size` (`asked`, if given): a multiple of K."""
    table = QUICK_COUNTS if quick else COUNTS
    count = asked or table.get(size, 20 if quick else 40)
    return max(BUFFER_SIZE, count - count % BUFFER_SIZE)


@contextlib.asynccontextmanager
async def child(*args: str, job: str | None = None) -> AsyncIterator[Process]:
    """Run a Python child process (stdout piped) and SIGTERM it, then wait, on the way out."""
    # Warnings only: a line per commit would interleave with the progress lines.
    env = dict(
        os.environ, FEDQ_AMQP_URL=AMQP_URL, FEDQ_REDIS_URL=REDIS_URL, FEDQ_LOG_LEVEL="WARNING"
    )
    if job is not None:
        env["FEDQ_JOB"] = job
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


class CpuSplit:
    """CPU per update of each process on this machine over a timed window: the benchmark
    (publishers), its consumer child, RabbitMQ and Redis. When they saturate the cores they
    share, this says which process a change should take CPU from."""

    def __init__(self, consumer_pid: int) -> None:
        readers = {
            "publishers": time.process_time,
            "consumer": process_cpu(consumer_pid),
            "rabbitmq": local_process_cpu("beam.smp"),
            "redis": local_process_cpu("redis-server"),
        }
        self._readers = {name: read for name, read in readers.items() if read is not None}
        self._start = {name: read() for name, read in self._readers.items()}

    def per_update_us(self, count: int) -> dict[str, float]:
        """Each process's CPU since the window began, in us per update."""
        return {
            name: (read() - self._start[name]) / count * 1e6 for name, read in self._readers.items()
        }


def describe_split(split: dict[str, float]) -> str:
    """`CPU publishers 610, consumer 1140, rabbitmq 910, redis 100 = 2760 us/update`."""
    parts = ", ".join(f"{name} {us:.0f}" for name, us in split.items())
    return f"CPU {parts} = {sum(split.values()):.0f} us/update"


async def wait_for_version(store: RedisModelStore, target: int) -> None:
    """Return once the job's committed version reaches `target`."""
    version = await store.current_version()
    async with asyncio.timeout(RUN_TIMEOUT):
        while version < target:
            version = await store.wait_for_version(version, timeout=5.0)


async def fedq_rate(
    size: int, count: int, concurrency: int, *, drain: bool = False
) -> tuple[float, dict[str, float]]:
    """Return the updates/s the aggregator service applies with `concurrency` publishers
    (with `drain`, from a queue filled before it starts: the aggregator alone), and the CPU
    split of the timed window."""
    model = synthetic_model(size)
    payload = encode(synthetic_model(size, seed=1))
    versions = count // BUFFER_SIZE
    strategy = fedbuff(BUFFER_SIZE, max_staleness=versions + 2)
    async with bench_job("ingest", model, strategy) as bench:
        if drain:
            await publish_updates(bench, payload, BUFFER_SIZE + count, concurrency)
        async with child("-m", "aggregator", job=bench.job) as aggregator:
            # Warm up (start-up, first consume, first commit) outside the timed window.
            if not drain:
                await publish_updates(bench, payload, BUFFER_SIZE, concurrency)
            await wait_for_version(bench.store, 1)
            started, split = time.perf_counter(), CpuSplit(aggregator.pid)
            if not drain:
                await publish_updates(bench, payload, count, concurrency, base_version=1)
            await wait_for_version(bench.store, 1 + versions)
            elapsed, cpu = time.perf_counter() - started, split.per_update_us(count)
    return rate(count, elapsed), cpu


async def raw_rate(
    size: int, count: int, concurrency: int, *, drain: bool = False
) -> tuple[float, dict[str, float]]:
    """Return the messages/s of plain aio-pika publish+consume of `size`-byte messages (with
    `drain`, consumed from a queue filled before the consumer starts), and the CPU split."""
    body = encode(synthetic_model(size, seed=1))
    async with raw_queue("ingest") as raw:
        if drain:
            await publish_raw(raw.publish, body, BUFFER_SIZE + count, concurrency)
        # The aggregator's prefetch for K=10: 2 x (K + 1).
        prefetch = str(2 * (BUFFER_SIZE + 1))
        consumer_args = (RAW_CONSUMER, raw.name, prefetch, str(BUFFER_SIZE), str(count))
        async with child(*consumer_args) as consumer:
            assert consumer.stdout is not None
            await expect_line(consumer.stdout, b"ready")
            if not drain:
                await publish_raw(raw.publish, body, BUFFER_SIZE, concurrency)
            await expect_line(consumer.stdout, b"warm")
            started, split = time.perf_counter(), CpuSplit(consumer.pid)
            if not drain:
                await publish_raw(raw.publish, body, count, concurrency)
            await expect_line(consumer.stdout, b"done")
            elapsed, cpu = time.perf_counter() - started, split.per_update_us(count)
    return rate(count, elapsed), cpu


async def expect_line(stream: asyncio.StreamReader, expected: bytes) -> None:
    """Read the consumer's next line; anything else (or nothing) means it failed."""
    async with asyncio.timeout(RUN_TIMEOUT):
        line = (await stream.readline()).strip()
    if line != expected:
        raise RuntimeError(f"raw consumer said {line!r}, expected {expected!r}")


async def publish_raw(
    publish: Callable[[bytes], Awaitable[None]], body: bytes, count: int, concurrency: int
) -> None:
    """Publish `count` messages, `concurrency` confirmed publishes at once."""
    remaining = iter(range(count))

    async def publisher() -> None:
        for _ in remaining:
            await publish(body)

    await asyncio.gather(*(publisher() for _ in range(concurrency)))


def measure(size: int, args: argparse.Namespace, *, drain: bool) -> Summary:
    """Run fedq and the baseline `repeats` times each, interleaved; summarize the medians."""
    count = update_count(size, args.quick, args.updates)
    ours: list[float] = []
    raws: list[float] = []
    mode = "drain" if drain else "ingest"
    for run in range(args.repeats):
        our_rate, our_cpu = asyncio.run(fedq_rate(size, count, args.concurrency, drain=drain))
        raw, raw_cpu = asyncio.run(raw_rate(size, count, args.concurrency, drain=drain))
        ours.append(our_rate)
        raws.append(raw)
        print(
            f"{mode} {human_bytes(size)} run {run + 1}: fedq {our_rate:.1f} updates/s "
            f"({describe_split(our_cpu)}), raw {raw:.1f} msg/s ({describe_split(raw_cpu)}); "
            f"{count} messages",
            file=sys.stderr,
            flush=True,
        )
    label = human_bytes(size).replace(" ", "")
    what = "queue filled first, consumers alone" if drain else f"{args.concurrency} publishers"
    return Summary(
        name=f"ingest-drain-{label}" if drain else f"ingest-{label}",
        figure=f"{median(ours):.1f} updates/s",
        baseline=f"{median(raws):.1f} msg/s",
        ratio=ratio(median(ours), median(raws)),
        # The goal is for publish+consume; a drain only shows the consumer's share.
        goal=None if drain else 0.8,
        extra=f"{count} updates, {what}, FedBuff K={BUFFER_SIZE}, median of {args.repeats}",
    )


def main() -> None:
    """Print one summary line per update size."""
    args = parse_args()
    torch.set_num_threads(1)
    for size in (int(s) for s in args.sizes.split(",")):
        print(measure(size, args, drain=False).line(), flush=True)
        if args.drain:
            print(measure(size, args, drain=True).line(), flush=True)


if __name__ == "__main__":
    main()
