"""The fedq pytest plugin: a `replay` fixture that replays a recording and returns its versions.

Registered through the `pytest11` entry point, so any project with fedq installed can write::

    async def test_my_strategy(replay):
        versions = await replay("run.fedqlog")              # in process, no services
        versions = await replay("run.fedqlog", backend="amqp")  # real RabbitMQ and Redis
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from schemas import StrategyConfig, VersionMeta

Replay = Callable[..., Awaitable["list[VersionMeta]"]]


async def _replay(
    path: str | Path,
    backend: str = "direct",
    *,
    strategy: StrategyConfig | None = None,
    job: str | None = None,
) -> list[VersionMeta]:
    """Replay `path` into a fresh job and return the VersionMeta of every version it made."""
    # Imported here so that merely installing fedq does not load torch into every pytest run.
    from fedq.recording import read_recording
    from fedq.replay import replay_direct, replay_recording
    from infra.amqp_broker import AmqpBroker
    from infra.redis_store import RedisModelStore
    from infra.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL

    recording = read_recording(Path(path))
    if recording.error is not None:
        raise recording.error
    job = job or f"replay-{uuid.uuid4().hex[:12]}"
    if backend == "direct":
        return (await replay_direct(recording, job=job, strategy=strategy)).versions
    if backend != "amqp":
        raise ValueError(f"backend must be 'direct' or 'amqp', not {backend!r}")
    amqp_url = os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL)
    redis_url = os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL)
    broker = await AmqpBroker.connect(amqp_url)
    store = RedisModelStore.from_url(redis_url, job)
    try:
        result = await replay_recording(recording, broker, store, strategy=strategy)
        return result.versions
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


@pytest.fixture
def replay() -> Replay:
    """Return `await replay(path, backend="direct"|"amqp", strategy=None)` -> [VersionMeta]."""
    return _replay
