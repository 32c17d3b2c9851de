"""Drain A/B: CPU per update of an in-process aggregator, this tree against another one.

Run: `python bench/drain_ab.py --base PATH [--size 100000] [--updates 2000] [--pairs 6]`,
PATH being a checkout of the code to compare with (`git worktree add /tmp/base <commit>`).
Each run is a child process that puts one code tree first on its path, fills a fresh job
with `--updates` + K updates of `--size` bytes, runs an `Aggregator` (FedBuff K=10) in its
own process from version 1 to the last, and reports its CPU seconds per update
(`process_time`), the broker's CPU per update when RabbitMQ runs on this machine, and
updates/s. Runs alternate base, this tree, base, ... so both see the
same machine: on a shared VM whose speed moves from hour to hour, only such pairs tell a
few percent apart. Prints the medians and their ratio (base CPU / this tree's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUFFER_SIZE = 10
CHILD_TIMEOUT = 600.0
KEYS = ("cpu_us", "broker_us", "rate")


async def drain_once(size: int, updates: int) -> dict[str, float]:
    """Fill a job, drain it with an in-process aggregator; return its CPU and rate."""
    from aggregator.service import Aggregator
    from bench.harness import (
        AMQP_URL,
        REDIS_URL,
        bench_job,
        fedbuff,
        publish_updates,
        synthetic_model,
    )
    from infra.amqp_broker import AmqpBroker
    from infra.redis_store import RedisModelStore
    from schemas.codec import encode

    model, payload = synthetic_model(size), encode(synthetic_model(size, seed=1))
    strategy = fedbuff(BUFFER_SIZE, max_staleness=updates)
    async with bench_job("drain-ab", model, strategy) as bench:
        await publish_updates(bench, payload, updates + BUFFER_SIZE, concurrency=4)
        broker = await AmqpBroker.connect(AMQP_URL, connection_name=f"{bench.job}-aggregator")
        store = RedisModelStore.from_url(REDIS_URL, bench.job)
        try:
            async with Aggregator(job=bench.job, broker=broker, store=store) as aggregator:
                running = asyncio.create_task(aggregator.run())
                # Start-up and the first version stay outside the timed window.
                version = await bench.store.wait_for_version(0, timeout=60)
                cpu, wall = time.process_time(), time.perf_counter()
                broker_cpu = local_process_cpu("beam.smp")
                broker_before = broker_cpu() if broker_cpu else 0.0
                target = 1 + updates // BUFFER_SIZE
                async with asyncio.timeout(CHILD_TIMEOUT):
                    while version < target:
                        version = await bench.store.wait_for_version(version, timeout=5)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                broker_us = (broker_cpu() - broker_before) / updates * 1e6 if broker_cpu else -1
                aggregator.stop()
                await running
        finally:
            await store.close()
            await broker.close()
    return {"cpu_us": cpu / updates * 1e6, "broker_us": broker_us, "rate": updates / wall}


def local_process_cpu(command: str) -> Callable[[], float] | None:
    """Return a reader of the CPU seconds of the first process on this machine whose command
    is `command` (`beam.smp`, `redis-server`), or None if there is none.

    Here, not in bench/harness.py: a child imports `bench` from the tree it measures, which
    may predate it, but runs this file's own functions.
    """
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == command:
                return process_cpu(int(entry.name))
        except OSError:
            continue
    return None


def process_cpu(pid: int) -> Callable[[], float]:
    """Return a reader of process `pid`'s CPU seconds (Linux /proc)."""
    return functools.partial(_cpu_seconds, Path(f"/proc/{pid}/stat"))


def _cpu_seconds(stat: Path) -> float:
    """User plus system CPU seconds of a process, from its /proc stat line."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(root: Path, size: int, updates: int) -> dict[str, float]:
    """Run one drain in a child process with `root`'s code first on its path."""
    command = [sys.executable, __file__, "--child", str(root), str(size), str(updates)]
    done = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        root, size, updates = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        # The tree under test first: it shadows the installed (editable) fedq.
        sys.path.insert(0, str(root))
        os.chdir(root)
        print(json.dumps(asyncio.run(drain_once(size, updates))))
        return
    # Only now: a child must import `bench` from the tree it measures, not from this one.
    sys.path.insert(0, str(ROOT))
    from bench.measure import median

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    for pair in range(args.pairs):
        for name, root in (("base", args.base.resolve()), ("this", ROOT)):
            runs[name].append(run_child(root, args.size, args.updates))
            last = runs[name][-1]
            print(
                f"pair {pair + 1} {name}: {last['cpu_us']:.0f} us/update, "
                f"broker {last['broker_us']:.0f} us/update, {last['rate']:.0f} updates/s",
                file=sys.stderr,
            )
    cpu, broker, rate = ({n: median([r[k] for r in v]) for n, v in runs.items()} for k in KEYS)
    # The broker's CPU is only there when RabbitMQ runs on this machine (-1 otherwise).
    broker_part = (
        f"broker {broker['this']:.0f} vs {broker['base']:.0f} us/update, "
        if broker["this"] >= 0 and broker["base"] >= 0
        else ""
    )
    print(
        f"drain-ab: this tree {cpu['this']:.0f} us/update vs base {cpu['base']:.0f} = ratio "
        f"{cpu['base'] / cpu['this']:.2f} ({broker_part}updates/s {rate['this']:.0f} vs "
        f"{rate['base']:.0f}); {args.updates} updates of {args.size} bytes, FedBuff "
        f"K={BUFFER_SIZE}, medians of {args.pairs} alternating pairs"
    )


if __name__ == "__main__":
    main()
