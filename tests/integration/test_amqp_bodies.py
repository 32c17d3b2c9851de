"""Delivery bodies read into one bytearray each (infra/amqp_body.py), on a real RabbitMQ."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from infra.amqp_body import _read_content, read_bodies_into_bytearrays
from infra.amqp_broker import AmqpBroker
from tests.conftest import AMQP_URL
from tests.contract.test_broker_contract import dead_letters, make_header

pytestmark = pytest.mark.integration
# The broker's frame_max is 131,072 bytes; a body frame carries 8 bytes less.
FRAME_BODY = 131_072 - 8
SIZES = [0, 1, FRAME_BODY, FRAME_BODY + 1, 1_000_003]


@pytest.fixture
async def broker(job_id: str) -> AsyncIterator[AmqpBroker]:
    amqp = await AmqpBroker.connect(AMQP_URL, publish_timeout=10.0)
    await amqp.declare_job(job_id)
    try:
        yield amqp
    finally:
        await amqp.delete_job(job_id)
        await amqp.close()


async def test_bodies_of_every_frame_count_arrive_whole_as_bytearrays(
    broker: AmqpBroker, job_id: str
) -> None:
    # Arrange: empty (a claim-check), one byte, exactly one frame, one byte over, eight frames
    bodies = [os.urandom(size) for size in SIZES]
    for body in bodies:
        await broker.publish(make_header(job_id, body), body)
    # Act
    deliveries = broker.consume(job_id, prefetch=len(bodies))
    async with asyncio.timeout(10):
        received = [await anext(deliveries) for _ in bodies]
    # Assert: writable memory the decoder uses in place, byte for byte what was sent
    try:
        assert [type(d.body) for d in received] == [bytearray] * len(bodies)
        assert [bytes(d.body) for d in received] == bodies
        # A dead letter copies such a body as it is.
        await received[-1].dead_letter("hash_mismatch", "test")
        [letter] = await dead_letters(broker, job_id, 1)
        assert letter.body == bodies[-1]
        for delivery in received[:-1]:
            await delivery.ack()
    finally:
        await deliveries.aclose()


class _Frames:
    """A stand-in aiormq channel that yields the given frames."""

    def __init__(self, *frames: Any) -> None:
        self._frames = list(frames)

    async def _get_frame(self) -> Any:
        return self._frames.pop(0)


async def test_body_frames_beyond_the_announced_size_are_refused() -> None:
    channel = _Frames(ContentBody(b"x" * 6), ContentBody(b"y" * 6))
    with pytest.raises(ValueError, match="overrun the announced 10 bytes"):
        await _read_content(channel, None, ContentHeader(body_size=10))


async def test_a_frame_that_is_not_body_is_refused() -> None:
    channel = _Frames(ContentHeader(body_size=3))
    with pytest.raises(ValueError, match="Unexpected frame"):
        await _read_content(channel, None, ContentHeader(body_size=3))


def test_a_channel_without_aiormqs_methods_is_left_alone() -> None:
    class Bare:
        pass

    bare = Bare()
    assert read_bodies_into_bytearrays(bare) is False  # type: ignore[arg-type]
    assert vars(bare) == {}
