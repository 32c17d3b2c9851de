"""StreamFollower: one blocking read shared by every waiter, and no entry missed."""

from __future__ import annotations

import asyncio

import pytest

from infra.stream_follower import START, Mark, StreamFollower, StreamId, stream_id_key

pytestmark = pytest.mark.unit


class FakeStream:
    """An in-memory versions stream whose reads block until an entry is appended."""

    def __init__(self) -> None:
        self.entries: list[Mark] = []
        self.reads = 0
        self._appended = asyncio.Condition()

    async def append(self, version: int) -> Mark:
        mark = (f"{1000 + version}-0", version)
        async with self._appended:
            self.entries.append(mark)
            self._appended.notify_all()
        return mark

    async def read_after(self, last_id: StreamId) -> Mark | None:
        self.reads += 1
        after = stream_id_key(last_id)
        async with self._appended:
            try:
                await asyncio.wait_for(
                    self._appended.wait_for(lambda: self._newer(after) is not None), 1.0
                )
            except TimeoutError:
                return None
            return self._newer(after)

    def _newer(self, after: tuple[int, int]) -> Mark | None:
        newer = [m for m in self.entries if stream_id_key(m[0]) > after]
        return newer[-1] if newer else None


@pytest.mark.parametrize(
    ("a", "b"), [("1-0", "1-1"), ("9-5", "10-0"), (b"1700000000000-0", "1700000000000-1")]
)
def test_stream_ids_sort_like_the_stream(a: StreamId, b: StreamId) -> None:
    assert stream_id_key(a) < stream_id_key(b)


async def test_many_waiters_share_one_read_and_all_wake_on_a_commit() -> None:
    # arrange
    stream = FakeStream()
    seen = await stream.append(0)
    follower = StreamFollower(stream.read_after)
    waiters = [asyncio.create_task(follower.wait_past(0, seen, 5.0)) for _ in range(500)]
    await asyncio.sleep(0.05)
    # act
    await stream.append(1)
    versions = await asyncio.gather(*waiters)
    # assert: one read (plus at most the one read on after it) for 500 waiters
    assert versions == [1] * 500
    assert stream.reads <= 2
    await follower.close()


async def test_a_commit_seen_by_another_read_still_wakes_a_late_waiter() -> None:
    # arrange: a waiter that read the stream before the commit the follower already saw
    stream = FakeStream()
    seen = await stream.append(0)
    follower = StreamFollower(stream.read_after)
    first = asyncio.create_task(follower.wait_past(0, seen, 5.0))
    await asyncio.sleep(0.05)
    await stream.append(1)
    assert await first == 1
    # act
    late = await asyncio.wait_for(follower.wait_past(0, seen, 5.0), 0.5)
    # assert
    assert late == 1
    await follower.close()


async def test_a_waiter_times_out_with_the_newest_version_known() -> None:
    stream = FakeStream()
    follower = StreamFollower(stream.read_after)
    assert await follower.wait_past(0, START, 0.2) == -1
    await follower.close()


async def test_a_failed_read_reaches_its_waiters() -> None:
    async def broken(last_id: StreamId) -> Mark | None:
        raise ConnectionError("redis is down")

    follower = StreamFollower(broken)
    with pytest.raises(ConnectionError, match="down"):
        await follower.wait_past(0, START, 1.0)
