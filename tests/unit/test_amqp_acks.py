"""ChannelAcks: acks asked together go as one `multiple` frame, which never covers a tag
that is still held or settled another way."""

from __future__ import annotations

import asyncio

import pytest

from infra.amqp_acks import ChannelAcks, plan_acks

pytestmark = pytest.mark.unit


class FakeChannel:
    """Records the ack frames; fails them with `error` once it is set."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bool]] = []
        self.error: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.frames.append((delivery_tag, multiple))


def _acks(channel: FakeChannel, tags: range) -> ChannelAcks:
    acks = ChannelAcks(channel)  # type: ignore[arg-type]
    for tag in tags:
        acks.delivered(tag)
    return acks


def test_a_run_below_every_held_tag_is_one_multiple_ack() -> None:
    assert plan_acks([1, 2, 3], {1, 2, 3, 5}) == [(3, True, [1, 2, 3])]


def test_tags_above_a_held_tag_are_acked_alone() -> None:
    # 3 is held: a multiple ack of 4 or 5 would settle it too
    assert plan_acks([1, 2, 4, 5], {1, 2, 3, 4, 5}) == [
        (2, True, [1, 2]),
        (4, False, [4]),
        (5, False, [5]),
    ]


def test_a_lone_tag_is_a_plain_ack() -> None:
    assert plan_acks([7], {7, 9}) == [(7, False, [7])]
    assert plan_acks([9], {7, 9}) == [(9, False, [9])]


async def test_acks_asked_in_one_pass_go_out_together() -> None:
    channel = FakeChannel()
    acks = _acks(channel, range(1, 13))
    # Act: a version's ten acks, gathered as the aggregator gathers them
    await asyncio.gather(*(acks.ack(tag) for tag in range(1, 11)))
    # Assert: one frame; 11 and 12 are still held
    assert channel.frames == [(10, True)]
    await acks.ack(12)
    assert channel.frames == [(10, True), (12, False)]


async def test_acks_asked_while_a_frame_is_on_its_way_go_in_the_next_one() -> None:
    channel = FakeChannel()
    acks = _acks(channel, range(1, 7))
    channel.gate.clear()
    first = asyncio.gather(*(acks.ack(tag) for tag in (1, 2, 3)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.gather(*(acks.ack(tag) for tag in (4, 5, 6)))
    await asyncio.sleep(0)
    channel.gate.set()
    await asyncio.gather(first, second)
    assert channel.frames == [(3, True), (6, True)]


async def test_a_tag_settled_alone_bounds_multiple_acks_until_its_frame_is_written() -> None:
    channel = FakeChannel()
    acks = _acks(channel, range(1, 6))
    written = asyncio.Event()
    requeuing = asyncio.ensure_future(acks.settle_alone(2, written.wait))
    await asyncio.sleep(0)
    # Act: ack 1 and 3 while 2's requeue is not written yet, then 4 and 5 after it is
    await asyncio.gather(acks.ack(1), acks.ack(3))
    written.set()
    await requeuing
    await asyncio.gather(acks.ack(4), acks.ack(5))
    # Assert: 3 went alone (a multiple of 3 would have settled 2 too); 4 and 5 as one
    assert channel.frames == [(1, False), (3, False), (5, True)]


async def test_a_failed_frame_fails_every_ack_it_covered_and_the_rest() -> None:
    channel = FakeChannel()
    acks = _acks(channel, range(1, 6))
    channel.error = ConnectionError("channel closed")
    results = await asyncio.gather(*(acks.ack(tag) for tag in (1, 2, 4)), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    # The ledger is not stuck: a later ack on a working channel goes out
    channel.error = None
    await acks.ack(5)
    assert channel.frames == [(5, False)]
