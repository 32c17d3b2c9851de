"""The edge's grouping rules on the in-process broker and store: plans, base versions, flushes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from aggregator.edge import EdgeForwarder
from aggregator.strategies import Contribution, Receipt
from aggregator.strategies.hierarchical import partial_update_id
from aggregator.validation import parse_header
from infra.forward_ledger import MemoryForwardLedger
from schemas import StrategyConfig, UpdateHeader
from schemas.codec import decode
from tests.integration.helpers import Backends, job_backends

pytestmark = pytest.mark.unit


class _Delivery:
    """A delivery that records how it was settled."""

    def __init__(self, update_id: str) -> None:
        self.message_id = update_id
        self.headers: Mapping[str, Any] = {}
        self.body = b""
        self.redelivered = False
        self.user_id: str | None = None
        self.acked = False

    async def ack(self) -> None:
        assert not self.acked, "settled twice"
        self.acked = True

    async def dead_letter(self, reason: str, detail: str) -> None:
        raise AssertionError("the forwarder never dead-letters")

    async def requeue(self) -> None:
        raise AssertionError("the forwarder never requeues")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _update(name: str, w: float, n: int, base: int = 0) -> tuple[UpdateHeader, _Delivery, Any]:
    update_id = f"{name * 8}-0000-4000-8000-000000000000"[:36]
    receipt = Receipt(update_id=update_id, device_id="d", staleness=0, num_samples=n)
    delta = {"w": torch.full((4,), float(w)), "b": torch.tensor([float(w)])}
    contribution = Contribution(receipt=receipt, base_version=base, delta=delta)
    header = UpdateHeader(
        job="edge",
        update_id=update_id,
        device_id="d",
        base_version=base,
        num_samples=n,
        payload_sha256="0" * 64,
        payload_bytes=0,
        sent_at=0.0,
    )
    return header, _Delivery(update_id), contribution


async def _upstream(root: Backends) -> list[tuple[UpdateHeader, dict[str, torch.Tensor]]]:
    """Take every partial update published to the root so far."""
    out = []
    async for delivery in root.broker.consume(root.config.job, prefetch=100, idle_timeout=0.05):
        header = parse_header(delivery.headers, root.config.job)
        out.append((header, decode(delivery.body)))
        await delivery.ack()
    return out


def _forwarder(root: Backends, ledger: MemoryForwardLedger, clock: _Clock) -> EdgeForwarder:
    return EdgeForwarder(
        upstream=root.config.model_copy(update={"inline_limit_bytes": 2**20}),
        broker=root.broker,
        upstream_store=root.store,
        ledger=ledger,
        device_id="edge-1",
        buffer_size=3,
        flush_seconds=5.0,
        clock=clock,
    )


async def test_a_planned_group_reforms_under_its_id_whatever_the_redelivery_order() -> None:
    async with job_backends("memory", "root", StrategyConfig()) as root:
        # Arrange: a, b, c were planned as one partial before a crash; d and e are new
        ledger, clock = MemoryForwardLedger(), _Clock()
        a, b, c, d, e = (
            _update(x, w, n)
            for x, w, n in zip("abcde", [1, 2, 3, 4, 5], [1, 1, 2, 1, 1], strict=True)
        )
        planned = sorted(u[0].update_id for u in (a, b, c))
        await ledger.plan("0" * 8 + "-0000-5000-8000-" + "0" * 12, planned)
        forwarder = _forwarder(root, ledger, clock)

        # Act: they come back interleaved; then the trickle of d and e waits out flush_seconds
        for header, delivery, contribution in (d, a, e, b, c):
            await forwarder.accept(header, delivery, contribution)
        first = await _upstream(root)
        clock.now = 5.0
        await forwarder.flush_due()
        second = await _upstream(root)

        # Assert: the plan's id with a, b, c's weighted mean, then d and e under their own id
        [(header, tensors)] = first
        assert header.update_id == "0" * 8 + "-0000-5000-8000-" + "0" * 12
        assert header.num_samples == 4
        torch.testing.assert_close(tensors["w"], torch.full((4,), (1 + 2 + 6) / 4))
        [(header, _)] = second
        assert header.update_id == partial_update_id([d[0].update_id, e[0].update_id])
        assert header.device_id == "edge-1"
        assert all(u[1].acked for u in (a, b, c, d, e))
        assert await ledger.forwarded([u[0].update_id for u in (a, b, c, d, e)]) == [True] * 5


async def test_a_new_base_version_closes_the_open_group_and_forwarded_updates_are_skipped() -> None:
    async with job_backends("memory", "root", StrategyConfig()) as root:
        # Arrange
        ledger, clock = MemoryForwardLedger(), _Clock()
        forwarder = _forwarder(root, ledger, clock)
        old1, old2, new = (
            _update("a", 1, 1, base=0),
            _update("b", 1, 1, base=0),
            _update("c", 1, 1, base=1),
        )
        again = (old1[0], _Delivery(old1[0].update_id), old1[2])

        # Act: two updates from base 0, one from base 1, then a late redelivery of the first
        for header, delivery, contribution in (old1, old2, new, again):
            await forwarder.accept(header, delivery, contribution)
        published = await _upstream(root)

        # Assert: base 0's pair went up alone; base 1's update waits; the redelivery is acked
        assert [(h.base_version, h.num_samples) for h, _ in published] == [(0, 2)]
        assert not new[1].acked
        assert again[1].acked
        assert forwarder.stats.duplicates == 1
