"""The batched `applied` check: one round trip per batch, and still every duplicate skipped,
also while the version it would have to know about is being committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
import torch

from aggregator import service
from aggregator.service import Aggregator
from infra.protocols import Delivery, ModelStore
from schemas import StalenessConfig, StrategyConfig
from schemas.codec import decode
from tests.integration.helpers import INITIAL, Backends, delta, job_backends, update

pytestmark = pytest.mark.integration
FEDBUFF_2 = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=1, staleness=StalenessConfig(name="constant")
)


class CountingStore:
    """Count the store's `applied` calls and hold commits at a gate; the rest is the real store."""

    def __init__(self, store: object) -> None:
        self._store = store
        self.applied_calls = 0
        self.gate = asyncio.Event()

    async def applied(self, update_ids: Sequence[str]) -> list[bool]:
        """Count the call, then ask the real store."""
        self.applied_calls += 1
        result: list[bool] = await self._store.applied(update_ids)  # type: ignore[attr-defined]
        return result

    async def commit(self, *args: Any) -> None:
        """Commit once the test opens the gate."""
        await self.gate.wait()
        await self._store.commit(*args)  # type: ignore[attr-defined]

    async def land_commit(self, aggregator: Aggregator | None) -> None:
        """Open the gate and wait until `aggregator` has taken the held commit as durable."""
        assert aggregator is not None
        self.gate.set()
        async with asyncio.timeout(5):
            await aggregator.settle_commit()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def _publish(backends: Backends, built: tuple[dict[str, Any], bytes, str]) -> None:
    headers, body, update_id = built
    await backends.broker.publish_raw(
        backends.config.job, body, headers=headers, message_id=update_id
    )


@contextlib.asynccontextmanager
async def _aggregator(
    backends: Backends, store: CountingStore, count: int
) -> AsyncIterator[tuple[Aggregator, list[Delivery]]]:
    """Take `count` deliveries and yield them with an aggregator on `store`; close after."""
    stream = backends.broker.consume(backends.config.job, prefetch=10)
    try:
        deliveries: list[Delivery] = [await anext(stream) for _ in range(count)]
        async with Aggregator(
            job=backends.config.job,
            broker=backends.broker,
            store=cast(ModelStore, store),
            retry_seconds=0.1,
        ) as aggregator:
            yield aggregator, deliveries
    finally:
        await stream.aclose()


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_redeliveries_during_and_after_a_commit_are_applied_once(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: A, B (-> version 1) and A again as one batch; then A in a batch alone
        first = update(job_id, delta(1.0))
        for built in (first, update(job_id, delta(3.0)), first, first):
            await _publish(backends, built)
        store = CountingStore(backends.store)
        async with _aggregator(backends, store, 4) as (aggregator, deliveries):
            # Act: the second A comes while version 1 is being committed (held at the
            # gate), when the flag read for the batch still says "not applied"...
            await aggregator.handle_batch(deliveries[:3])
            calls_during_commit = store.applied_calls
            version_during_commit = await backends.store.current_version()
            store.gate.set()
            await aggregator.settle_commit()
            # ...and the third one after it, in a batch of its own.
            await aggregator.handle_batch(deliveries[3:])
            await aggregator.settle_commit()
        # Assert: A counted once, though the batch read its flag before A was committed
        assert (calls_during_commit, version_during_commit) == (1, 0)
        assert await backends.store.current_version() == 1
        model = await backends.store.get_model(1)
        assert model is not None
        torch.testing.assert_close(decode(model)["w"], INITIAL["w"] + 2.0)
        assert aggregator.stats.duplicates == 2
        assert await backends.store.applied_count() == 2
        # A fresh read for the batch after the commit, which knows A is applied.
        assert store.applied_calls == 2
        assert await backends.broker.queue_depth(job_id) == (0, 0)
        assert await backends.broker.drain_dead_letters(job_id) == []


class CommitDuringRead(CountingStore):
    """The second `applied` read sees the store before a commit, and answers after the
    aggregator has taken that commit as durable (two connections, either order)."""

    aggregator: Aggregator | None = None

    async def applied(self, update_ids: Sequence[str]) -> list[bool]:
        """Read the flags; on the second call, let the held commit land before answering."""
        flags = await super().applied(update_ids)
        if self.applied_calls == 2:
            await self.land_commit(self.aggregator)
            assert self.aggregator is not None
            assert self.aggregator.version == 1
        return flags


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_a_flag_read_that_a_commit_overtakes_is_not_trusted(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: A and B make version 1; A again, in the next batch, whose flag read starts
        # before version 1 lands and answers after; then C
        first = update(job_id, delta(1.0))
        for built in (first, update(job_id, delta(3.0)), first, update(job_id, delta(5.0))):
            await _publish(backends, built)
        store = CommitDuringRead(backends.store)
        async with _aggregator(backends, store, 4) as (aggregator, deliveries):
            store.aggregator = aggregator
            # Act
            await aggregator.handle_batch(deliveries[:2])
            await aggregator.handle_batch(deliveries[2:3])
            await aggregator.handle_batch(deliveries[3:])
            await aggregator.settle_commit()
        # Assert: the second A is a duplicate, so C waits alone for a second update (before,
        # the stale "not applied" was trusted: A was folded again, and made version 2 with C)
        assert aggregator.stats.duplicates == 1
        assert await backends.store.current_version() == 1
        assert await backends.store.applied_count() == 2


class BlobAfterCommit(CountingStore):
    """Claim-check blobs are handed over only once the held commit has landed, so the batch
    goes on after its own commit at a known point."""

    aggregator: Aggregator | None = None

    async def get_blob(self, *args: Any, **kwargs: Any) -> Any:
        """Let the held commit land and be taken as durable, then fetch the blob."""
        await self.land_commit(self.aggregator)
        return await self._store.get_blob(*args, **kwargs)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_the_batch_read_stays_valid_across_its_own_commit(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: one batch of A, B (-> version 1), C by claim-check (fetched once version 1
        # has landed) and A again
        first = update(job_id, delta(1.0))
        headers, body, blob_id = update(job_id, delta(5.0), payload="blob")
        await backends.store.put_blob("dev-0", blob_id, body, 60)
        for built in (first, update(job_id, delta(3.0)), (headers, b"", blob_id), first):
            await _publish(backends, built)
        store = BlobAfterCommit(backends.store)
        async with _aggregator(backends, store, 4) as (aggregator, deliveries):
            store.aggregator = aggregator
            # Act
            await aggregator.handle_batch(deliveries)
            await aggregator.settle_commit()
            # Assert: one read for the whole batch, which knew A was applied once its own
            # commit landed (before, the rest of the batch was read again after the commit)
            assert store.applied_calls == 1
            assert aggregator.stats.duplicates == 1
            assert aggregator.strategy.pending() == [blob_id]
        assert await backends.store.current_version() == 1
        assert await backends.store.applied_count() == 2
        model = await backends.store.get_model(1)
        assert model is not None
        torch.testing.assert_close(decode(model)["w"], INITIAL["w"] + 2.0)


class _Body:
    """Stands in for a delivery in the inbox: `_gather_more` only looks at the size."""

    def __init__(self, size: int) -> None:
        self.body = bytes(size)


async def _gathered(
    backends: Backends, first: list[int], later: list[tuple[float, int]]
) -> list[int]:
    """Sizes `_gather_more` takes with deliveries of sizes `first` in hand and `later` ones
    arriving (seconds from now, size)."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    items: list[Any] = [_Body(size) for size in first]
    loop = asyncio.get_running_loop()
    for delay, size in later:
        loop.call_later(delay, inbox.put_nowait, _Body(size))
    async with Aggregator(
        job=backends.config.job, broker=backends.broker, store=backends.store
    ) as aggregator:
        await aggregator._gather_more(inbox, items)
    return [len(item.body) for item in items]


async def test_a_small_batch_waits_for_more_deliveries(
    job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_GATHER_SECONDS", 1.0)
    async with job_backends("memory", job_id, FEDBUFF_2) as backends:
        # A buffer of two: one in hand waits for a second, and not for a third
        assert await _gathered(backends, [10], [(0.01, 20), (0.3, 30)]) == [10, 20]
        # Two in hand already, half a megabyte, or a claim-check (no body): no wait
        assert await _gathered(backends, [10, 20], [(0.01, 30)]) == [10, 20]
        assert await _gathered(backends, [2**19], [(0.01, 30)]) == [2**19]
        assert await _gathered(backends, [0], [(0.01, 30)]) == [0]


async def test_a_small_batch_waits_no_longer_than_the_window(
    job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_GATHER_SECONDS", 0.001)
    async with job_backends("memory", job_id, FEDBUFF_2) as backends:
        assert await _gathered(backends, [10], [(0.3, 20)]) == [10]
