"""One blocking stream read at a time, shared by every coroutine that waits on the stream.

An XREAD BLOCK holds a pooled connection for the whole block. With one read per waiter, a
process with more waiters than the pool has connections (redis-py's default pool stops at
100) gets MaxConnectionsError for the rest, which callers see as an outage and back off from
for up to minutes while versions keep coming. Here a store has one read in flight however
many coroutines wait, and every one of them wakes when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

StreamId = bytes | str
# A position in the versions stream: an entry's id and the version it announced.
Mark = tuple[StreamId, int]
# Read the entries after this id (blocking at most one block): the last one's mark, or None.
ReadAfter = Callable[[StreamId], Coroutine[Any, Any, Mark | None]]
START: Mark = ("0-0", -1)


def stream_id_key(stream_id: StreamId) -> tuple[int, int]:
    """Return a stream id ("millis-seq") as a pair that sorts like the stream."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    millis, _, seq = text.partition("-")
    return int(millis), int(seq or 0)


class StreamFollower:
    """Share one blocking read of a versions stream among many waiters."""

    def __init__(self, read_after: ReadAfter) -> None:
        self._read_after = read_after
        # The newest entry known to exist; versions only grow along the stream.
        self._newest: Mark = START
        self._read: asyncio.Task[Mark | None] | None = None
        self._waiters = 0

    @property
    def following(self) -> bool:
        """Whether a read is in flight: it returns any entry after the newest one known."""
        return self._read is not None and not self._read.done()

    async def wait_past(self, after: int, seen: Mark | None, timeout: float) -> int:
        """Return the newest version known once it exceeds `after` or when `timeout` ends.

        `seen` is the newest entry the caller read before it read the version (`after`), so
        the entry of the next commit comes after it. Without one, the caller relies on a read
        in flight (`following`) or on the newest entry this follower already knows.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._note(seen)
        self._waiters += 1
        try:
            while self._newest[1] <= after:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                read = self._current_read()
                # asyncio.wait, unlike wait_for, leaves the shared read running for the others.
                await asyncio.wait({read}, timeout=remaining)
                if read.done():
                    self._note(read.result())
        finally:
            self._waiters -= 1
        return self._newest[1]

    def _current_read(self) -> asyncio.Task[Mark | None]:
        if self._read is None or self._read.done():
            # From the newest known entry: every waiter's next entry comes after it.
            self._read = asyncio.create_task(self._read_after(self._newest[0]))
            self._read.add_done_callback(self._after_read)
        return self._read

    def _after_read(self, read: asyncio.Task[Mark | None]) -> None:
        # Every waiter may have timed out before a failed read ended: its error is for the
        # next waiter's own read to show, not an "exception was never retrieved" later.
        if read.cancelled() or read.exception() is not None:
            return
        self._note(read.result())
        if self._waiters:
            # Read on at once: waiters woken now call again, and with a read in flight they
            # need no commands of their own (`following`).
            self._current_read()

    def _note(self, mark: Mark | None) -> None:
        if mark is not None and stream_id_key(mark[0]) > stream_id_key(self._newest[0]):
            self._newest = mark

    async def close(self) -> None:
        """Cancel the read in flight (it holds a connection for up to one block)."""
        if self._read is not None and not self._read.done():
            self._read.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read
