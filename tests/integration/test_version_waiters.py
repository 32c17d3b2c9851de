"""Many coroutines of one process waiting for versions on one store, on the real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial

import pytest

from infra.redis_store import RedisModelStore
from infra.retry import retry_unavailable
from tests.conftest import REDIS_URL
from tests.contract.test_store_contract import commit_next, create

pytestmark = pytest.mark.integration

# Over the 100 connections of redis-py's pool: with one XREAD BLOCK per waiter the rest got
# MaxConnectionsError, which the agents' retry loop backs off from for a minute and more.
WAITERS = 300
ROUNDS = 8
# Generous for a loaded 2-core machine; the stall it guards against lasts minutes.
BOUND_SECONDS = 40.0


@pytest.fixture
async def stores(job_id: str) -> AsyncIterator[tuple[RedisModelStore, RedisModelStore]]:
    """A waiters' store and a committer's store on one fresh job, deleted afterwards."""
    waiters = RedisModelStore.from_url(REDIS_URL, job_id, timeout=10.0)
    committer = RedisModelStore.from_url(REDIS_URL, job_id, timeout=10.0)
    await create(committer)
    yield waiters, committer
    await committer.delete_job()
    await waiters.close()
    await committer.close()


async def test_hundreds_of_waiters_on_one_store_follow_synchronous_rounds(
    stores: tuple[RedisModelStore, RedisModelStore],
) -> None:
    # arrange: FedAvg-like rounds: the next version comes once every waiter saw the last one,
    # so one waiter backing off holds every round back, as a slow device holds FedAvg back
    waiters, committer = stores
    arrived = [0] * (ROUNDS + 1)
    round_done = asyncio.Event()

    async def waiter() -> None:
        version = 0
        while version < ROUNDS:
            after = version
            # The agent's call: 1 s waits, outages retried (device_agent/agent.py).
            version = await retry_unavailable(partial(waiters.wait_for_version, after, 1.0))
            if version > after:
                arrived[version] += 1
                if arrived[version] == WAITERS:
                    round_done.set()

    async def rounds() -> None:
        for value in range(ROUNDS):
            round_done.clear()
            await commit_next(committer, float(value))
            await round_done.wait()

    # act
    started = time.monotonic()
    async with asyncio.timeout(BOUND_SECONDS):
        await asyncio.gather(rounds(), *(waiter() for _ in range(WAITERS)))
    # assert: every waiter saw every round's version
    assert arrived[1:] == [WAITERS] * ROUNDS
    assert time.monotonic() - started < BOUND_SECONDS


async def test_a_waiter_wakes_at_once_while_others_share_the_read(
    stores: tuple[RedisModelStore, RedisModelStore],
) -> None:
    # arrange: a long waiter keeps the shared read in flight
    waiters, committer = stores
    long_wait = asyncio.create_task(waiters.wait_for_version(5, 30.0))
    await asyncio.sleep(0.2)
    # act: a commit, then a second waiter joining the read in flight
    await commit_next(committer, 1.0)
    version = await waiters.wait_for_version(0, 10.0)
    # assert: it returns the committed version, not the end of a block
    assert version == 1
    for value in range(2, 7):
        await commit_next(committer, float(value))
    assert await asyncio.wait_for(long_wait, 10.0) == 6
