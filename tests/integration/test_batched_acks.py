"""Acks asked together reach RabbitMQ as one `multiple` ack, and it settles only them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from infra.amqp_broker import AmqpDelivery
from schemas import StrategyConfig
from tests.integration.helpers import job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_acks_asked_together_settle_in_one_frame_and_only_their_own_messages(
    job_id: str,
) -> None:
    async with job_backends("real", job_id, StrategyConfig(name="fedbuff")) as backends:
        # Arrange: five deliveries held on one channel; a spy on the frames it sends
        ids = []
        for value in range(5):
            headers, body, update_id = update(job_id, {"w": torch.full((4,), float(value))})
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
            ids.append(update_id)
        stream = backends.broker.consume(job_id, prefetch=10)
        deliveries = [await anext(stream) for _ in ids]
        assert isinstance(deliveries[0], AmqpDelivery)
        channel: Any = deliveries[0]._acks.channel
        frames: list[tuple[int, bool]] = []
        send = channel.basic_ack

        async def spy(delivery_tag: int, multiple: bool = False, **options: Any) -> None:
            frames.append((delivery_tag, multiple))
            await send(delivery_tag, multiple=multiple, **options)

        channel.basic_ack = spy
        first, second, third, fourth, fifth = deliveries
        try:
            # Act: ack the first, second and fourth together while the third and fifth are
            # held; then requeue the third and ack the fifth
            await asyncio.gather(first.ack(), second.ack(), fourth.ack())
            await third.requeue()
            await fifth.ack()
            tags = [d._message.delivery_tag for d in deliveries]  # type: ignore[attr-defined]
        finally:
            await stream.aclose()
        # Assert: one multiple ack for the first two, the fourth alone (a multiple would
        # have settled the third too), and only the third back in the queue
        assert frames == [(tags[1], True), (tags[3], False), (tags[4], False)]
        assert await backends.broker.queue_depth(job_id) == (1, 0)
        again = backends.broker.consume(job_id, prefetch=10)
        try:
            back = await anext(again)
            assert (back.message_id, back.redelivered) == (ids[2], True)
            await back.ack()
        finally:
            await again.aclose()
