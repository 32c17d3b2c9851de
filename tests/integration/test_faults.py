"""Crashes on the real services: aggregators killed with SIGKILL, and two of them at once.

Every update is the same delta `c`, and FedBuff with constant staleness and K updates per
version adds exactly `c` per version. So the exactly-once effect is visible in the model
itself: after V versions it must equal x0 + V*c, with V*K distinct updates applied and every
published update accounted for -- none lost, none counted twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import torch

from infra import keys
from schemas import StalenessConfig, StrategyConfig
from schemas.codec import decode, sha256_hex
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import INITIAL, Backends, delta, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
K = 4
UPDATES = 120
STEP = 0.01
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/lib/rabbitmq/bin/rabbitmqctl"
STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=K, max_staleness=10_000, staleness=StalenessConfig(name="constant")
)


@pytest.fixture
async def backends(job_id: str) -> AsyncIterator[Backends]:
    async with job_backends("real", job_id, STRATEGY) as real:
        yield real


def _aggregator(job: str, log: Path, idle_exit: float | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FEDQ_JOB": job, "FEDQ_AMQP_URL": AMQP_URL, "FEDQ_REDIS_URL": REDIS_URL}
    if idle_exit is not None:
        env["FEDQ_IDLE_EXIT_SECONDS"] = str(idle_exit)
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator"], env=env, stdout=output, stderr=subprocess.STDOUT
        )


async def _publish_all(
    backends: Backends, job: str, pause: float, count: int = UPDATES
) -> list[str]:
    ids = []
    for i in range(count):
        headers, body, update_id = update(job, delta(STEP, STEP), device_id=f"dev-{i % 5}")
        await backends.broker.publish_raw(job, body, headers=headers, message_id=update_id)
        ids.append(update_id)
        await asyncio.sleep(pause)
    return ids


async def _check_exactly_once(backends: Backends, published: list[str]) -> None:
    store = backends.store
    version = await store.current_version()
    # Every published update is in exactly one version, and versions have no gap.
    metas = [await store.get_meta(v) for v in range(1, version + 1)]
    assert all(meta is not None and meta.version == v for v, meta in enumerate(metas, 1))
    contributors = [u for meta in metas if meta for u in meta.contributors]
    assert sorted(contributors) == sorted(published)
    assert version == UPDATES // K
    assert await store.applied_count() == UPDATES
    assert await backends.broker.drain_dead_letters(backends.config.job) == []
    # The model shows each update's effect exactly once, and its bytes match their sha256.
    model_bytes = await store.get_model(version)
    assert model_bytes is not None
    meta = metas[-1]
    assert meta is not None and sha256_hex(model_bytes) == meta.sha256
    model = decode(model_bytes)
    torch.testing.assert_close(model["w"], INITIAL["w"] + version * STEP)
    torch.testing.assert_close(model["b"], INITIAL["b"] + version * STEP)


async def _drain(job: str, log: Path) -> None:
    """Let one last aggregator fold whatever the killed ones left in the queue."""
    final = _aggregator(job, log, idle_exit=2.0)
    assert await asyncio.to_thread(final.wait, 60) == 0, log.read_text()[-3000:]


async def test_sigkilled_aggregators_lose_nothing_and_count_nothing_twice(
    backends: Backends, job_id: str, tmp_path: Path
) -> None:
    # Arrange
    log = tmp_path / "aggregator.log"
    rng = random.Random(7)
    publishing = asyncio.create_task(_publish_all(backends, job_id, pause=0.02))
    kills = 0
    # Act: start an aggregator, SIGKILL it at a random moment, again and again
    while not publishing.done() or kills < 4:
        process = _aggregator(job_id, log)
        await asyncio.sleep(rng.uniform(1.5, 3.0))  # interpreter start is ~1.5 s of it
        process.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
        kills += 1
    published = await publishing
    await _drain(job_id, log)
    # Assert
    assert kills >= 4
    await _check_exactly_once(backends, published)


# Two interpreter starts (torch imports) and rabbitmqctl calls: ~40 s alone, up to twice
# the module's bound on a 2-core machine at load 6-8.
@pytest.mark.timeout(240)
async def test_two_aggregators_one_consumes_and_the_standby_takes_over(
    backends: Backends, job_id: str, tmp_path: Path
) -> None:
    # Arrange: the first aggregator becomes the single active consumer, the second stands by.
    # Each step waits for what it needs, not for a time: under load an interpreter start
    # alone can take longer than any fixed sleep.
    active_log, standby_log = tmp_path / "active.log", tmp_path / "standby.log"
    active = _aggregator(job_id, active_log)
    await _until(lambda: _registered_consumers(job_id), [True], "the first to subscribe")
    standby = _aggregator(job_id, standby_log)
    await _until(lambda: _registered_consumers(job_id), [True, False], "the second to wait")
    _, consumers = await backends.broker.queue_depth(job_id)
    # Act: the active one commits from the first half; SIGKILL it while the rest is published
    half = UPDATES // 2
    published = await _publish_all(backends, job_id, pause=0.02, count=half)
    await _until(lambda: _committed(active_log), True, "the active one to commit")
    publishing = asyncio.create_task(_publish_all(backends, job_id, pause=0.02, count=half))
    active.send_signal(signal.SIGKILL)
    await asyncio.to_thread(active.wait, 10)
    published += await publishing
    await _until(lambda: _committed(standby_log), True, "the standby to commit")
    # The standby folds the rest by itself (no drain aggregator: one interpreter start less).
    await _until(backends.store.applied_count, UPDATES, "the standby to fold every update")
    standby.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(standby.wait, 30) == 0, standby_log.read_text()[-3000:]
    # Assert: RabbitMQ 3.10 counts only the active consumer of a single-active-consumer
    # queue (while both were subscribed); the standby committed versions after the
    # takeover; nothing lost or doubled
    assert consumers == 1
    await _check_exactly_once(backends, published)


async def _until(
    probe: Callable[[], Awaitable[object]], expected: object, what: str, timeout: float = 90.0
) -> None:
    """Poll `probe` until it returns `expected`; fail saying `what` did not happen in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (seen := await probe()) != expected:
        assert loop.time() < deadline, f"waited {timeout}s for {what}: last saw {seen!r}"
        await asyncio.sleep(0.2)


async def _committed(log: Path) -> bool:
    return "committed version" in log.read_text(errors="replace")


async def _registered_consumers(job: str) -> list[bool]:
    """Whether each consumer of the job's queue is the active one, active first.

    From rabbitmqctl (read-only): RabbitMQ 3.10 counts only the active consumer of a
    single-active-consumer queue, so the queue's consumer count cannot show the standby.
    """
    command = [RABBITMQCTL, "list_consumers", "-q", "queue_name", "active"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)
    rows = [line.split() for line in done.stdout.decode().splitlines()]
    queue = keys.updates_queue(job)
    return sorted((row[1] == "true" for row in rows if row[:1] == [queue]), reverse=True)
