"""The dead-letter rework on the in-process broker: keep, requeue and drop, in order."""

from __future__ import annotations

import pytest

from infra.dead_letters import keep_all, matching, peek_dead_letters, rework_dead_letters
from infra.memory_broker import MemoryBroker

pytestmark = pytest.mark.unit
REASONS = {"a": "too_stale", "b": "hash_mismatch", "c": "too_stale"}


async def _broker_with_dead_letters(job: str) -> MemoryBroker:
    broker = MemoryBroker()
    await broker.declare_job(job)
    for message_id in REASONS:
        await broker.publish_raw(job, b"x", headers={"device_id": "d"}, message_id=message_id)
    deliveries = broker.consume(job, prefetch=10, idle_timeout=0.5)
    for _ in REASONS:
        delivery = await anext(deliveries)
        await delivery.dead_letter(REASONS[delivery.message_id or ""], "test")
    await deliveries.aclose()
    return broker


async def test_peek_keeps_everything_in_order() -> None:
    broker = await _broker_with_dead_letters("j")

    first = await peek_dead_letters(broker, "j")

    assert [letter.message_id for letter in first] == ["a", "b", "c"]
    assert await peek_dead_letters(broker, "j") == first


async def test_requeue_a_reason_then_drop_the_rest() -> None:
    broker = await _broker_with_dead_letters("j")

    done = await rework_dead_letters(broker, "j", matching("too_stale", "requeue"))
    dropped = await rework_dead_letters(broker, "j", matching(None, "drop"))

    assert [(letter.message_id, action) for letter, action in done] == [
        ("a", "requeue"),
        ("b", "keep"),
        ("c", "requeue"),
    ]
    assert [letter.message_id for letter, _ in dropped] == ["b"]
    assert await rework_dead_letters(broker, "j", keep_all) == []
    assert (await broker.queue_depth("j"))[0] == 2
