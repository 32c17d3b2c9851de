"""/readyz of a running aggregator follows a real RabbitMQ node going down and coming back.

test_observability.py flips readiness with in-process doubles; this one runs `python -m
aggregator` with FEDQ_METRICS_PORT against a private RabbitMQ node (and the shared Redis),
stops the node, starts it again, and checks that consuming resumed by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig
from tests.conftest import REDIS_URL
from tests.integration.helpers import delta, redis_tiny_job, update
from tests.integration.private_rabbitmq import PrivateRabbitMQ, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=100, staleness=StalenessConfig(name="constant")
)
# How soon /readyz must notice that the node is gone.
NOT_READY_WITHIN = 5.0
# How soon after the node answers AMQP again the aggregator must be ready (reconnect + resume).
READY_AGAIN_WITHIN = 15.0


def _get_blocking(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""  # not listening (yet)


async def _readyz_until(port: int, status: int, seconds: float) -> tuple[float, str]:
    """Poll /readyz until it answers `status`; return how long that took and the body."""
    began = time.monotonic()
    url = f"http://127.0.0.1:{port}/readyz"
    while True:
        got, body = await asyncio.to_thread(_get_blocking, url)
        elapsed = time.monotonic() - began
        if got == status:
            return elapsed, body
        assert elapsed < seconds, f"/readyz still {got} {body!r} after {seconds}s"
        await asyncio.sleep(0.1)


def _aggregator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator"], env=env, stdout=output, stderr=subprocess.STDOUT
        )


@pytest.fixture
async def store(job_id: str) -> AsyncIterator[RedisModelStore]:
    async with redis_tiny_job(job_id, STRATEGY) as redis_store:
        yield redis_store


async def _version(store: RedisModelStore, at_least: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while (version := await store.current_version()) < at_least:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # polling: the store has counters, not events
    return version


async def test_readyz_flips_with_the_rabbitmq_node(
    private_rabbitmq: PrivateRabbitMQ, store: RedisModelStore, job_id: str, tmp_path: Path
) -> None:
    # Arrange: the aggregator process with its health server, on the private node
    url = private_rabbitmq.url + "?reconnect_interval=0.5"
    publisher = await AmqpBroker.connect(url)
    await publisher.declare_job(job_id)
    port = free_port()
    env = {
        **os.environ,
        "FEDQ_JOB": job_id,
        "FEDQ_AMQP_URL": url,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_METRICS_PORT": str(port),
        "FEDQ_METRICS_HOST": "127.0.0.1",
    }
    log = tmp_path / "aggregator.log"
    process = _aggregator(env, log)

    async def publish(count: int) -> None:
        for _ in range(count):
            headers, body, update_id = update(job_id, delta(1.0))
            await publisher.publish_raw(job_id, body, headers=headers, message_id=update_id)

    try:
        await _readyz_until(port, 200, 60)
        await publish(2)
        assert await _version(store, 1, 20) == 1
        # Act: the node stops; /readyz must say so
        await asyncio.to_thread(private_rabbitmq.stop)
        went_down, body = await _readyz_until(port, 503, NOT_READY_WITHIN)
        assert "broker: not connected" in body
        assert process.poll() is None, log.read_text()[-3000:]
        # The node comes back; /readyz too, and the aggregator consumes again by itself
        await asyncio.to_thread(private_rabbitmq.start)
        came_back, body = await _readyz_until(port, 200, READY_AGAIN_WITHIN)
        await publish(2)
        version = await _version(store, 2, 20)
        # Assert
        assert body == "ready\n"
        assert version == 2, log.read_text()[-3000:]
        print(f"\n/readyz 503 {went_down:.2f}s after the stop, 200 {came_back:.2f}s after boot")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        await publisher.delete_job(job_id)
        await publisher.close()
    assert code == 0, log.read_text()[-3000:]
