"""Redis goes away mid-run: the aggregator waits, acks nothing uncommitted, and resumes.

The test runs a private redis-server (AOF, fsync always) on a free port, so killing it
disturbs nobody else; RabbitMQ is the shared real broker.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aggregator.service import Aggregator
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import JobConfig, StalenessConfig, StrategyConfig, VersionMeta
from schemas.codec import decode, encode, schema_of, sha256_hex
from tests.conftest import AMQP_URL
from tests.integration.helpers import INITIAL, delta, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
STEP = 0.5
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=100, staleness=StalenessConfig(name="constant")
)


class PrivateRedis:
    """A redis-server of this test's own, which it may kill and restart at will."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed (scripts/services.sh uses it too)"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    if redis.process is not None and redis.process.poll() is None:
        redis.kill()


async def _version(store: RedisModelStore, at_least: int, seconds: float = 45.0) -> int:
    # A deadline, not a count of polls: under load each poll (and Redis's restart) is slower.
    deadline = time.monotonic() + seconds
    while (version := await store.current_version()) < at_least:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return version


async def test_aggregator_waits_for_redis_and_loses_nothing(
    private_redis: PrivateRedis, job_id: str
) -> None:
    # Arrange: a job on the private Redis, an aggregator running on it
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(private_redis.url, job_id, timeout=2.0)
    model = encode(INITIAL)
    config = JobConfig(
        job=job_id, task="tiny", strategy=STRATEGY, model_schema=schema_of(INITIAL), created_at=0.0
    )
    await broker.declare_job(job_id)
    await store.create_job(
        config,
        model,
        VersionMeta(version=0, created_at=0.0, sha256=sha256_hex(model), model_bytes=len(model)),
    )
    published: list[str] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            headers, body, update_id = update(job_id, delta(STEP, STEP))
            await broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
            published.append(update_id)

    try:
        async with Aggregator(job=job_id, broker=broker, store=store, retry_seconds=0.2) as agg:
            running = asyncio.create_task(agg.run())
            await publish(4)
            assert await _version(store, 2) == 2
            # Act: Redis dies; updates keep coming; the aggregator can commit nothing
            private_redis.kill()
            await publish(4)
            await asyncio.sleep(3.0)
            committed_during_outage = agg.stats.versions
            # Redis comes back (from its AOF) and the aggregator carries on by itself
            private_redis.start()
            final = await _version(store, 4)
            agg.stop()
            await asyncio.wait_for(running, timeout=20)
        # Assert: nothing was committed, so nothing acked, while Redis was away; afterwards
        # every update is in exactly one version and the model moved by exactly 4 steps
        assert committed_during_outage == 2
        assert final == 4
        metas = [await store.get_meta(v) for v in range(1, 5)]
        assert sorted(u for m in metas if m for u in m.contributors) == sorted(published)
        latest = await store.get_model(4)
        assert latest is not None
        torch.testing.assert_close(decode(latest)["w"], INITIAL["w"] + 4 * STEP)
        assert await broker.queue_depth(job_id) == (0, 0)
    finally:
        await store.delete_job()
        await broker.delete_job(job_id)
        await store.close()
        await broker.close()
