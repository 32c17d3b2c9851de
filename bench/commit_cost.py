"""Commit cost: CPU of committing one version in Redis vs a plain SET of the same bytes.

Run: `python bench/commit_cost.py [--size 100000] [--contributors 10] [--commits 500]
[--repeats 3]`. Commits `--commits` versions of a `--size`-byte model, each naming that many
contributors from distinct devices, through `RedisModelStore.commit` (the script that checks
the version, moves the model in place, marks the contributors applied and adds to the
versions stream and the device tallies), and SETs the same bytes as often; interleaved runs,
medians. For each: this process's CPU per call (redis-py) and Redis's own, from the time
`INFO commandstats` reports for every command in the window.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import REDIS_URL, bench_job, fedbuff, synthetic_model
from bench.measure import Summary, human_bytes, median, ratio
from infra.keys import JobKeys
from infra.redis_store import RedisModelStore
from schemas import VersionMeta
from schemas.codec import encode, sha256_hex


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="model bytes")
    parser.add_argument("--contributors", type=int, default=10, help="updates per version")
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


async def redis_command_us(client: aioredis.Redis) -> float:
    """Microseconds Redis has spent in commands since its stats were last reset."""
    stats = await client.info("commandstats")
    return float(sum(entry["usec"] for entry in stats.values()))


async def cpu_per_call(
    client: aioredis.Redis, work: Awaitable[None], calls: int
) -> tuple[float, float]:
    """Await `work` (`calls` calls); return this process's and Redis's CPU per call, in us."""
    cpu, redis_us = time.process_time(), await redis_command_us(client)
    await work
    client_us = (time.process_time() - cpu) * 1e6
    return client_us / calls, (await redis_command_us(client) - redis_us) / calls


def versions(first: int, count: int, model: bytes, contributors: int) -> list[VersionMeta]:
    """Describe `count` versions from `first` on, each of `contributors` fresh updates from
    as many devices."""
    metas = []
    sha = sha256_hex(model)
    for version in range(first, first + count):
        ids = [str(uuid.uuid4()) for _ in range(contributors)]
        metas.append(
            VersionMeta(
                version=version,
                created_at=time.time(),
                sha256=sha,
                model_bytes=len(model),
                contributors=ids,
                devices=[f"bench-device-{uuid.uuid4().hex[:6]}" for _ in ids],
                staleness=[1] * len(ids),
            )
        )
    return metas


async def commit_all(store: RedisModelStore, model: bytes, metas: list[VersionMeta]) -> None:
    for meta in metas:
        await store.commit(meta.version - 1, model, meta)


async def set_all(client: aioredis.Redis, key: str, model: bytes, count: int) -> None:
    for _ in range(count):
        await client.set(key, model)


async def measure(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Return (commit, SET) costs per call, client CPU plus Redis CPU, one per repeat."""
    model = encode(synthetic_model(args.size))
    client = aioredis.Redis.from_url(REDIS_URL)
    commits: list[float] = []
    sets: list[float] = []
    async with bench_job("commit", synthetic_model(args.size), fedbuff(10)) as bench:
        key = f"{JobKeys(bench.job).prefix}:bench-set"
        for run in range(args.repeats):
            # Made before the timed window: only the commits are timed.
            metas = versions(1 + run * args.commits, args.commits, model, args.contributors)
            commit_cpu = await cpu_per_call(
                client, commit_all(bench.store, model, metas), args.commits
            )
            set_cpu = await cpu_per_call(
                client, set_all(client, key, model, args.commits), args.commits
            )
            commits.append(sum(commit_cpu))
            sets.append(sum(set_cpu))
            print(
                f"run {run + 1}: commit {commits[-1]:.0f} us (redis-py {commit_cpu[0]:.0f}, "
                f"Redis {commit_cpu[1]:.0f}), SET {sets[-1]:.0f} us (redis-py "
                f"{set_cpu[0]:.0f}, Redis {set_cpu[1]:.0f}) of CPU per call",
                file=sys.stderr,
                flush=True,
            )
    await client.aclose()
    return commits, sets


def main() -> None:
    args = parse_args()
    commits, sets = asyncio.run(measure(args))
    summary = Summary(
        name=f"commit-{human_bytes(args.size).replace(' ', '')}",
        figure=f"{median(commits):.0f} us CPU per commit",
        baseline=f"{median(sets):.0f} us per SET",
        # Higher is better: the SET's cost over the commit's.
        ratio=ratio(1 / median(commits), 1 / median(sets)),
        goal=None,
        extra=(
            f"{args.contributors} contributors per version, {args.commits} commits, "
            f"client (redis-py) plus Redis CPU, median of {args.repeats}"
        ),
    )
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
