"""Hundreds of hostile messages, big ones among them: the aggregator's memory stays bounded.

The messages are test_hostile_input.py's corpus plus four kinds of bad body near the 4 MiB
inline limit, on the real RabbitMQ and Redis. After a warm-up round, tracemalloc and the
process's resident size must show that nothing of them is kept once they are dead-lettered.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.service import Aggregator
from schemas.codec import encode
from schemas.digests import blake3_hex
from tests.integration.helpers import Backends, job_backends
from tests.integration.test_hostile_input import STRATEGY, _corpus, _headers

pytestmark = pytest.mark.integration


# Near the default 4 MiB inline limit: the biggest bodies a device may send through RabbitMQ.
BIG = 4 * 2**20 - 4096
MEMORY_MESSAGES = 300
MEMORY_BIG = 24
# Bounds on the aggregator process while it handles the hostile messages after a warm-up:
# Python allocations at their peak (tracemalloc), what is still allocated once they are all
# dead-lettered, and resident memory growth. The big bodies alone add up to about 94 MiB, so
# a consumer that held on to them would blow each bound.
PEAK_BOUND = 48 * 2**20
RETAINED_BOUND = 4 * 2**20
RSS_BOUND = 64 * 2**20


def _big_hostile(job: str, rng: random.Random) -> list[tuple[dict[str, Any], bytes, str]]:
    """Four kinds of big bad message: junk bytes, a wrong tensor, a lying hash, a lying size."""
    junk = rng.randbytes(BIG)
    wrong = encode({"x": torch.zeros(BIG // 4 - 64)})
    return [
        (
            _headers(job=job, payload_bytes=len(junk), payload_blake3=blake3_hex(junk)),
            junk,
            "malformed_payload",
        ),
        (
            _headers(job=job, payload_bytes=len(wrong), payload_blake3=blake3_hex(wrong)),
            wrong,
            "wrong_keys",
        ),
        (
            _headers(job=job, payload_bytes=len(junk), payload_blake3="0" * 64),
            junk,
            "hash_mismatch",
        ),
        (_headers(job=job), junk, "size_mismatch"),
    ]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _dead_lettered(backends: Backends, count: int, seconds: float) -> None:
    """Wait until `count` messages are through: counting the rejection is the last step."""
    deadline = time.monotonic() + seconds
    while (done := sum((await backends.store.rejection_counts()).values())) < count:
        assert time.monotonic() < deadline, f"only {done} of {count} dead-lettered"
        await asyncio.sleep(0.05)


async def _publish_hostile(
    backends: Backends, messages: list[tuple[dict[str, Any], bytes, str]]
) -> None:
    for headers, body, _ in messages:
        await backends.broker.publish_raw(
            backends.config.job, body, headers=headers, message_id=str(uuid.uuid4())
        )


def _hostile_batch(job: str, count: int, big: int) -> list[tuple[dict[str, Any], bytes, str]]:
    rng = random.Random(count)
    small = list(_corpus(job).values())
    bigs = _big_hostile(job, rng)
    batch = [bigs[i % len(bigs)] for i in range(big)]
    batch += [small[i % len(small)] for i in range(count - big)]
    rng.shuffle(batch)
    return batch


@pytest.mark.timeout(180)
async def test_hundreds_of_hostile_messages_keep_the_aggregator_memory_bounded(
    job_id: str,
) -> None:
    async with job_backends("real", job_id, STRATEGY) as backends:
        model_before = await backends.store.get_model(0)
        async with Aggregator(
            job=job_id, broker=backends.broker, store=backends.store, retry_seconds=0.1
        ) as aggregator:
            running = asyncio.create_task(aggregator.run())
            # Arrange: a warm-up round, so caches, pools and the allocator settle first
            warm_up = _hostile_batch(job_id, 40, 4)
            await _publish_hostile(backends, warm_up)
            await _dead_lettered(backends, len(warm_up), 60)
            batch = _hostile_batch(job_id, MEMORY_MESSAGES, MEMORY_BIG)
            gc.collect()
            rss_before = _rss_bytes()
            tracemalloc.start()
            try:
                baseline, _ = tracemalloc.get_traced_memory()
                # Act
                await _publish_hostile(backends, batch)
                await _dead_lettered(backends, len(warm_up) + len(batch), 120)
                gc.collect()
                retained, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            rss_growth = _rss_bytes() - rss_before
            alive = not running.done()
            aggregator.stop()
            await asyncio.wait_for(running, timeout=20)
        # Assert: memory bounded, every message dead-lettered, the model untouched
        print(
            f"\n{len(batch)} hostile messages ({MEMORY_BIG} of {BIG} bytes): tracemalloc peak"
            f" {(peak - baseline) / 2**20:.1f} MiB, retained {(retained - baseline) / 2**20:.2f}"
            f" MiB, RSS growth {rss_growth / 2**20:.1f} MiB"
        )
        assert alive
        assert peak - baseline < PEAK_BOUND
        assert retained - baseline < RETAINED_BOUND
        assert rss_growth < RSS_BOUND
        dead = await backends.broker.drain_dead_letters(job_id, timeout=30)
        assert len(dead) == len(warm_up) + len(batch)
        reasons = {reason for _, _, reason in batch}
        assert {d.reason for d in dead} == reasons
        assert await backends.store.current_version() == 0
        assert await backends.store.get_model(0) == model_before
