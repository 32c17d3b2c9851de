"""Large: a 500 MB update from publish to committed version vs raw Redis SET+GET of the bytes.

Run: `python bench/large.py [--quick] [--bytes 500000000] [--repeats 2] [--updates 3]`.
A job whose model is `--bytes` of float32 runs FedBuff with K=1 (every update is a version)
under `python -m aggregator` in a child process, as deployed. The figure is the time from
`send_update` (the claim-check SET of the payload, then the confirmed publish) to the moment
the store reports the new version: the aggregator's GET of the blob, decode and validation,
the fold, the encode and the commit (SET + Lua) in between. Each run sends `--updates`
updates, one after the other, to a fresh aggregator, and the figure is the median of all but
the first: the service's steady state. There the aggregator writes into the buffers the
update before left (the first update's time, which pays for faulting them in, is reported
beside it), and Redis holds a constant number of versions, each commit pruning the oldest:
the job keeps the fewest the config allows (keep_versions=2, max_staleness=1), so that
pruning starts at the second update instead of after `versions_kept` of them. The baseline
is a plain SET and GET of the same bytes on the same Redis from this process. Peak RSS is
the aggregator child's (VmHWM, the largest over the runs) and this sender's. Every key is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    AMQP_URL,
    REDIS_URL,
    BenchJob,
    bench_job,
    fedbuff,
    synthetic_model,
    update_header,
)
from bench.measure import Summary, median, ratio
from device_agent.sender import send_update
from schemas.codec import encode
from schemas.digests import blake3_hex

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 300.0
RUN_TIMEOUT = 600.0


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the default size is the issue's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=500_000_000)
    parser.add_argument("--quick", action="store_true", help="50 MB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--updates", type=int, default=3, help="per run, at least 2")
    args = parser.parse_args()
    if args.updates < 2:
        parser.error("--updates must be at least 2: the first one is not the steady state")
    return args


@contextlib.asynccontextmanager
async def aggregator_process(bench: BenchJob, log: Path) -> AsyncIterator[list[int]]:
    """Run `python -m aggregator` for the job until the block ends (SIGTERM), then reap it.

    The yielded list receives the child's peak RSS in bytes (VmHWM) just before it stops:
    getrusage's figure for children would count the pages it shared with this process
    between fork and exec.
    """
    env = {
        **os.environ,
        "FEDQ_JOB": bench.job,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "OMP_NUM_THREADS": "1",
    }
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aggregator", cwd=REPO, env=env, stdout=out, stderr=out
        )
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while (await bench.broker.queue_depth(bench.job))[1] < 1:
                if process.returncode is not None:
                    output = await asyncio.to_thread(log.read_text)
                    raise RuntimeError(f"the aggregator exited: {output[-2000:]}")
                await asyncio.sleep(0.2)
        peak: list[int] = []
        yield peak
        peak.append(peak_rss_bytes(process.pid))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()


def peak_rss_bytes(pid: int) -> int:
    """Read a live process's peak resident set size from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


async def pipeline_seconds(size: int, updates: int, workdir: Path) -> tuple[list[float], int]:
    """Return the seconds from send_update to the committed version of each of a fresh
    aggregator's `updates` updates, and the child's peak RSS."""
    model = synthetic_model(size)
    strategy = fedbuff(1, max_staleness=1)
    async with bench_job("large", model, strategy, keep_versions=2) as bench:
        del model
        payload = encode(synthetic_model(size, seed=1))
        digest = blake3_hex(payload)
        seconds: list[float] = []
        store = bench.store
        async with aggregator_process(bench, workdir / f"{bench.job}.log") as peak:
            for base_version in range(updates):
                header = update_header(bench.config, payload, digest, base_version=base_version)
                started = time.perf_counter()
                await send_update(bench.broker, store, bench.config, header, payload)
                version = await store.wait_for_version(after=base_version, timeout=RUN_TIMEOUT)
                seconds.append(time.perf_counter() - started)
                if version <= base_version:
                    raise RuntimeError(f"no version committed within {RUN_TIMEOUT}s")
        return seconds, peak[0]


async def redis_seconds(size: int) -> float:
    """Return the seconds of a plain SET then GET of `size` bytes (the key is deleted after)."""
    payload = encode(synthetic_model(size, seed=1))
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False, socket_timeout=RUN_TIMEOUT)
    key = f"bench:large-raw:{uuid.uuid4().hex}"
    try:
        started = time.perf_counter()
        await client.set(key, payload, ex=600)
        fetched = await client.get(key)
        elapsed = time.perf_counter() - started
        if fetched != payload:
            raise RuntimeError("Redis returned other bytes than it was given")
        return elapsed
    finally:
        await client.unlink(key)
        await client.aclose()


def main() -> None:
    """Print the summary line: seconds to a committed version against Redis SET+GET."""
    args = parse_args()
    torch.set_num_threads(1)
    size = 50_000_000 if args.quick else args.bytes
    firsts: list[float] = []
    ours: list[float] = []
    base: list[float] = []
    peaks: list[int] = []
    with tempfile.TemporaryDirectory(prefix="fedq-bench-large-") as workdir:
        for run in range(args.repeats):
            seconds, peak = asyncio.run(pipeline_seconds(size, args.updates, Path(workdir)))
            firsts.append(seconds[0])
            ours.extend(seconds[1:])
            peaks.append(peak)
            base.append(asyncio.run(redis_seconds(size)))
            steady = ", ".join(f"{s:.2f}" for s in seconds[1:])
            print(
                f"large run {run + 1}: publish to version {steady} s "
                f"(first update {seconds[0]:.2f} s), Redis SET+GET {base[-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    child_rss = max(peaks) / 2**30
    # ru_maxrss is in KiB on Linux.
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = Summary(
        name="large",
        figure=f"{median(ours):.2f} s",
        baseline=f"{median(base):.2f} s",
        # Seconds are lower-is-better: the ratio is the baseline's time over ours.
        ratio=ratio(1 / median(ours), 1 / median(base)),
        goal=0.6,
        extra=(
            f"{size / 1e6:.0f} MB, first update {median(firsts):.2f} s, "
            f"peak RSS aggregator {child_rss:.2f} GiB, "
            f"sender {own_rss:.2f} GiB, median of {len(ours)} updates in {args.repeats} runs"
        ),
    )
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
