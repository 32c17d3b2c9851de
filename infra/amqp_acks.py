"""Acks of one consumer channel, sent together: one `basic.ack multiple` for a run of them.

A version's acks are asked for at once (one per contributor). Sent one frame each, every ack
is also a command of the quorum queue; one `multiple` ack settles the whole run in one frame
and one command. `python bench/consume_cost.py`, consuming 100 KB messages and acking ten at
a time: 218 against 298 us of CPU per message in the consumer, 93 against 237 in RabbitMQ.

`multiple` settles every unacked tag up to its own, on the broker's side, so it may only
cover tags that are all asked for now: a tag delivered and not yet settled, or whose own
settle (a dead-lettering's ack, a requeue) has not been written yet, bounds the run. A tag
leaves the ledger only once the frame that settles it has been written, so frames that could
overlap are never both on their way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiormq


class ChannelAcks:
    """The unsettled delivery tags of one consumer channel, and the acks waiting to go."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._unsettled: set[int] = set()
        self._asked: dict[int, asyncio.Future[None]] = {}
        self._sending: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        """Note a tag handed out: it bounds any `multiple` ack until it is settled."""
        self._unsettled.add(tag)

    async def ack(self, tag: int) -> None:
        """Ack `tag` with the other acks asked for in this pass of the event loop."""
        done = asyncio.get_running_loop().create_future()
        self._asked[tag] = done
        if self._sending is None or self._sending.done():
            # Runs after the tasks already scheduled: a version's gathered acks join first.
            self._sending = asyncio.ensure_future(self._send())
        await done

    async def settle_alone(self, tag: int, settle: Callable[[], Awaitable[None]]) -> None:
        """Run a settle of `tag` that is not an ack (a requeue), keeping `tag` a bound for
        `multiple` acks until its frame has been written."""
        try:
            await settle()
        finally:
            self._unsettled.discard(tag)

    async def _send(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                for tag, multiple, covered in plan_acks(sorted(asked), self._unsettled):
                    try:
                        await self.channel.basic_ack(tag, multiple=multiple)
                    finally:
                        self._unsettled.difference_update(covered)
                    for covered_tag in covered:
                        _resolve(asked.pop(covered_tag))
            except BaseException as exc:
                # The channel is gone (or the loop is): every ack not sent fails with it.
                for future in asked.values():
                    _resolve(future, exc)
                if not isinstance(exc, Exception):
                    raise


def plan_acks(asked: list[int], unsettled: set[int]) -> list[tuple[int, bool, list[int]]]:
    """Return the ack frames for the `asked` tags (ascending): (tag, multiple, tags covered).

    The asked tags below every other unsettled tag go as one `multiple` ack of the highest of
    them; each one above such a tag goes alone, since a `multiple` would settle that tag too.
    """
    others = unsettled.difference(asked)
    bound = min(others, default=None)
    run = [tag for tag in asked if bound is None or tag < bound]
    frames: list[tuple[int, bool, list[int]]] = []
    if len(run) > 1:
        frames.append((run[-1], True, run))
    elif run:
        frames.append((run[0], False, run))
    frames.extend((tag, False, [tag]) for tag in asked[len(run) :])
    return frames


def _resolve(future: asyncio.Future[None], error: BaseException | None = None) -> None:
    if future.done():  # its ack() was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
