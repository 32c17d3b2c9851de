"""The commit pipeline: a version is committed while the previous one's deliveries are still
being acked and announced, and announcements still go out in version order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch

from aggregator.service import Aggregator
from infra.protocols import Broker, Delivery, DeliveryStream
from schemas import StalenessConfig, StrategyConfig
from schemas.codec import decode
from tests.integration.helpers import INITIAL, Backends, delta, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
# Every update a version of its own, each the last plus its delta.
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=10, staleness=StalenessConfig(name="constant")
)


class HeldAnnouncements:
    """The real broker, except that announcing a version waits at a gate the test opens."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.gate = asyncio.Event()
        self.announced: list[int] = []

    async def announce_version(self, job: str, version: int) -> None:
        """Announce once the gate is open, noting the order."""
        await self.gate.wait()
        self.announced.append(version)
        await self._broker.announce_version(job, version)

    def __getattr__(self, name: str) -> object:
        return getattr(self._broker, name)


class HeldSettling(HeldAnnouncements):
    """Also holds the ack of every delivery it hands out at the same gate."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        self.acked: list[str | None] = []

    def consume(self, job: str, **options: Any) -> DeliveryStream:
        """Consume, each delivery's ack waiting for the gate."""
        return _HeldStream(self._broker.consume(job, **options), self.gate, self.acked)


class _HeldStream:
    def __init__(self, stream: DeliveryStream, gate: asyncio.Event, acked: list[str | None]):
        self._stream = stream
        self._gate = gate
        self._acked = acked

    def __aiter__(self) -> _HeldStream:
        return self

    async def __anext__(self) -> Delivery:
        delivery = await anext(self._stream)
        return cast(Delivery, AckSpy(delivery, self._acked, self._gate))

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _publish(backends: Backends, values: list[float]) -> None:
    """Publish one update per value, each its delta."""
    job = backends.config.job
    for value in values:
        headers, body, update_id = update(job, delta(value))
        await backends.broker.publish_raw(job, body, headers=headers, message_id=update_id)


async def _deliveries(backends: Backends, values: list[float]) -> tuple[Any, list[Delivery]]:
    await _publish(backends, values)
    stream = backends.broker.consume(backends.config.job, prefetch=10)
    return stream, [await anext(stream) for _ in values]


def _aggregator(backends: Backends, broker: HeldAnnouncements) -> Aggregator:
    return Aggregator(
        job=backends.config.job,
        broker=cast(Broker, broker),
        store=backends.store,
        retry_seconds=0.1,
    )


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll `predicate` until it holds; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - acks raise no event to wait on
            await asyncio.sleep(0.01)


class AckSpy:
    """A delivery that notes when it is acked, and acks only once `gate` (if any) is open."""

    def __init__(
        self, delivery: Delivery, acked: list[str | None], gate: asyncio.Event | None = None
    ) -> None:
        self._delivery = delivery
        self._acked = acked
        self._gate = gate

    async def ack(self) -> None:
        """Ack (after the gate), then note the message id."""
        if self._gate is not None:
            await self._gate.wait()
        await self._delivery.ack()
        self._acked.append(self._delivery.message_id)

    def __getattr__(self, name: str) -> object:
        return getattr(self._delivery, name)


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_versions_are_committed_while_the_last_ones_are_still_announced(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1) as backends:
        # Arrange: three updates, three versions; no announcement can finish yet
        broker = HeldAnnouncements(backends.broker)
        stream, deliveries = await _deliveries(backends, [1.0, 2.0, 4.0])
        acked: list[str | None] = []
        spies = [cast(Delivery, AckSpy(delivery, acked)) for delivery in deliveries]
        try:
            async with _aggregator(backends, broker) as aggregator:
                # Act: all three are folded and committed with version 1 still unannounced
                # (before, the second commit waited for the first announcement: a timeout)
                await asyncio.wait_for(aggregator.handle_batch(spies), timeout=10)
                durable = await backends.store.wait_for_version(after=2, timeout=10)
                # and all three acked meanwhile (before, a version's acks waited for the
                # last one's announcement, and so held the prefetch window)
                with contextlib.suppress(TimeoutError):
                    await wait_until(lambda: len(acked) == 3, timeout=5)
                acked_meanwhile = len(acked)
                announced_meanwhile = list(broker.announced)
                broker.gate.set()
                await aggregator.settle_commit()
        finally:
            await stream.aclose()
        # Assert: durable and acked before any announcement, then announced in order
        assert (durable, acked_meanwhile, announced_meanwhile) == (3, 3, [])
        assert broker.announced == [1, 2, 3]
        assert await backends.broker.queue_depth(job_id) == (0, 0)
        model = await backends.store.get_model(3)
        assert model is not None
        torch.testing.assert_close(decode(model)["w"], INITIAL["w"] + 7.0)


@pytest.mark.parametrize("kind", ["real", "memory"])
async def test_a_stop_lets_the_versions_still_settling_ack_on_the_open_consumer(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1) as backends:
        # Arrange: three versions committed by a running aggregator, their acks held
        broker = HeldSettling(backends.broker)
        await _publish(backends, [1.0, 2.0, 4.0])
        async with _aggregator(backends, broker) as aggregator:
            running = asyncio.create_task(aggregator.run())
            await backends.store.wait_for_version(after=2, timeout=10)
            # Act: stop while the three versions still wait to be acked, then let them settle
            aggregator.stop()
            await asyncio.sleep(0.3)
            broker.gate.set()
            await asyncio.wait_for(running, timeout=10)
        # Assert: every committed update was acked (before, the stop closed the consumer's
        # channel first: the late acks failed and the updates came back as redeliveries)
        assert broker.announced == [1, 2, 3]
        assert await backends.broker.queue_depth(job_id) == (0, 0)
