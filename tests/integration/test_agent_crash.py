"""Agents SIGKILLed mid-round, mid-upload or mid-publish: no partial update is ever folded.

Every update of this job goes by claim-check (the inline limit is 1 KiB), so a kill can land
between the blob upload and the publish. The blob is written before its header is
published and the header carries the payload's sha256, so the aggregator can only ever see
whole updates; a blob whose header never went out simply expires.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as redis

from aggregator.service import Aggregator
from fedq.jobs import create_job, initial_job
from infra.amqp_broker import AmqpBroker
from infra.keys import JobKeys
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig, TrainingConfig
from schemas.codec import sha256_hex
from tests.conftest import AMQP_URL, REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=1000, staleness=StalenessConfig(name="constant")
)


def _agent(job: str, log: Path, updates: int | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FEDQ_JOB": job,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_ROLE": "agent",
        "FEDQ_DEVICE_ID": "crashy",
    }
    if updates is not None:
        env["FEDQ_UPDATES"] = str(updates)
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent"], env=env, stdout=output, stderr=subprocess.STDOUT
        )


async def test_killed_agents_never_leave_a_partial_update(job_id: str, tmp_path: Path) -> None:
    # Arrange: a digits job whose every update is a claim-check blob
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, job_id)
    config, model, meta = initial_job(
        job_id, "digits-mlp", STRATEGY, TrainingConfig(num_devices=2, local_epochs=1)
    )
    config = config.model_copy(update={"inline_limit_bytes": 1024, "blob_ttl_seconds": 600})
    await create_job(store, broker, config, model, meta, log_stream=False)
    log = tmp_path / "agent.log"
    rng = random.Random(11)
    try:
        async with Aggregator(job=job_id, broker=broker, store=store, retry_seconds=0.2) as agg:
            running = asyncio.create_task(agg.run())
            # Act: kill the agent at random moments, five times, then let one finish 3 updates
            for _ in range(5):
                agent = _agent(job_id, log)
                await asyncio.sleep(rng.uniform(2.0, 5.0))
                agent.send_signal(signal.SIGKILL)
                await asyncio.to_thread(agent.wait, 10)
            last = _agent(job_id, log, updates=3)
            assert await asyncio.to_thread(last.wait, 60) == 0, log.read_text()[-3000:]
            # Until the queue is empty and its updates are in, not a fixed sleep: under load
            # the aggregator can take longer than any.
            await _folded(broker, store, job_id, at_least=3, seconds=60)
            agg.stop()
            await asyncio.wait_for(running, timeout=20)
        # Assert: only whole updates were folded -- nothing dead-lettered, every version's
        # model matches its hash, and each version holds exactly one update (K=1)
        assert await broker.drain_dead_letters(job_id) == []
        version = await store.current_version()
        assert version >= 3
        assert await store.applied_count() == version
        for v in range(max(1, version - 3), version + 1):
            meta_v, model_v = await store.get_meta(v), await store.get_model(v)
            assert meta_v is not None and model_v is not None
            assert sha256_hex(model_v) == meta_v.sha256
        # Blobs of applied updates are gone; an orphan (killed between upload and publish)
        # still has its expiry, so nothing stays forever.
        client = redis.Redis.from_url(REDIS_URL)
        try:
            blob_keys = [
                k async for k in client.scan_iter(match=f"{JobKeys(job_id).prefix}:blob:*")
            ]
            for key in blob_keys:
                assert 0 < await client.ttl(key) <= 600
        finally:
            await client.aclose()
    finally:
        await store.delete_job()
        await broker.delete_job(job_id)
        await store.close()
        await broker.close()


async def _folded(
    broker: AmqpBroker, store: RedisModelStore, job: str, *, at_least: int, seconds: float
) -> None:
    """Wait until no update is waiting in the job's queue and `at_least` versions exist."""
    deadline = time.monotonic() + seconds
    while (await broker.queue_depth(job))[0] or await store.current_version() < at_least:
        assert time.monotonic() < deadline, f"updates not folded within {seconds}s"
        await asyncio.sleep(0.2)
