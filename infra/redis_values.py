"""Byte values of any size in Redis: a plain string up to one chunk, a hash of chunks beyond.

Redis refuses any single value over `proto-max-bulk-len` (512 MB by default) and a 1 GB
string would hold the connection for one long command. A value over `chunk_bytes` is
therefore a hash `{size, chunk, 0, 1, ...}` under the same key: RENAME, PERSIST, EXPIRE and
UNLINK treat it as one key, so the commit script moves it into place atomically as before.
A chunked value is written to a temporary key and renamed over the target, so no reader
ever sees half of it; it is read chunk by chunk into one preallocated bytearray that the
codec then decodes in place. A transfer has a deadline sized to its bytes (base + bytes /
assumed bandwidth) on top of the client's per-command socket timeout.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.digests import RunningHash
from schemas.safetensors_format import ByteBuffer, reuse_or_allocate

# Room for what Redis adds to a value when it allocates it (an sds header and terminator,
# about 12 bytes): a chunk of exactly 2 MiB would take jemalloc's next size class up.
ALLOCATION_HEADROOM = 64
# 2 MiB per command (less the headroom). `python bench/redis_chunks.py --mib 476 --chunks
# 0,2,4,16` on the 2-core VM, alternating: written in 0.42-0.46 s and read in 0.67-0.69 s in
# 2 MiB chunks, 0.38-0.41 / 0.61-0.66 s in 4 MiB, 0.61-0.62 / 0.77-0.85 s in 16 MiB,
# 1.45-1.49 / 1.31-1.36 s as one value; a 10 MB value (write, read, unlink) took 18.5 ms in
# 2 MiB chunks, 21 ms in 4 MiB and 25 ms as one value, hence 2. Why smaller is faster, in
# Redis's jemalloc: an allocation of 8 MiB or more goes to its oversize arena, which hands
# freed pages back to the kernel at once, so every big chunk faults fresh pages in (on a VM,
# pages the host may first have to back); smaller ones reuse the pages of values freed
# before. A 16 MiB chunk also took a 20 MiB size class (used_memory 1.28x the bytes, against
# 1.004x now).
CHUNK_BYTES = 2 * 2**20 - ALLOCATION_HEADROOM
# Deadline of one value's transfer: a fixed allowance plus its bytes at a pessimistic rate.
BASE_SECONDS = 10.0
BYTES_PER_SECOND = 20e6
# A chunked value's own temporary key disappears by itself if its writer dies mid-way.
PARTIAL_TTL_SECONDS = 3600
_SIZE, _CHUNK = b"size", b"chunk"
# Under this, hashing (about 1 ms per MB) costs less than a hop to a worker thread.
_HASH_IN_THREAD_BYTES = 256 * 2**10


@dataclass(frozen=True)
class ValueIO:
    """Write and read possibly huge byte values of one Redis client."""

    client: aioredis.Redis
    chunk_bytes: int = CHUNK_BYTES
    base_seconds: float = BASE_SECONDS
    bytes_per_second: float = BYTES_PER_SECOND

    def deadline(self, nbytes: int) -> float:
        """Seconds a transfer of `nbytes` may take: base + bytes / assumed bandwidth."""
        return self.base_seconds + nbytes / self.bytes_per_second

    async def write(self, key: str, data: ByteBuffer, *, ex: int) -> None:
        """Store `data` at `key` with a TTL of `ex` seconds, chunked if it is large."""
        if len(data) <= self.chunk_bytes:
            await self.client.set(key, data, ex=ex)
            return
        deadline = _Deadline(self.deadline(len(data)))
        # Same key prefix, so the same Redis Cluster slot as `key`.
        temp = f"{key}:partial:{uuid.uuid4().hex}"
        await self.client.hset(temp, mapping={_SIZE: len(data), _CHUNK: self.chunk_bytes})
        await self.client.expire(temp, min(ex, PARTIAL_TTL_SECONDS))
        view = memoryview(data)
        # One command per chunk, awaited: a pipeline would buffer the whole value again.
        for index, start in enumerate(range(0, len(data), self.chunk_bytes)):
            deadline.check()
            await self.client.hset(temp, str(index), view[start : start + self.chunk_bytes])
        deadline.check()
        await self.client.expire(temp, ex)
        await self.client.rename(temp, key)

    async def read(
        self, key: str, into: bytearray | None = None, digest: RunningHash | None = None
    ) -> ByteBuffer | None:
        """Return the value at `key` (bytes, or a bytearray if chunked), None if absent.

        A chunked value is read into `into` when its length is exactly the value's (memory
        already faulted in costs less than fresh memory), else into a new bytearray.
        `digest`, if given, is fed the value's bytes: a chunked value's chunk by chunk in a
        worker thread while the next chunk is read, so the hash costs little more time than
        the transfer (hashlib lets go of the GIL).
        """
        try:
            value = cast(bytes | None, await self.client.get(key))
        except ResponseError as exc:
            # GET on a hash answers WRONGTYPE: the value is chunked.
            if "WRONGTYPE" not in str(exc):
                raise
        else:
            if value is not None and digest is not None:
                await _feed(digest, value)
            return value
        size, chunk = await self.client.hmget(key, [_SIZE, _CHUNK])
        if size is None or chunk is None:
            return None
        return await self._read_chunks(key, int(size), int(chunk), into, digest)

    async def _read_chunks(
        self, key: str, size: int, chunk: int, into: bytearray | None, digest: RunningHash | None
    ) -> bytearray | None:
        deadline = _Deadline(self.deadline(size))
        out = reuse_or_allocate(into, size)
        view = memoryview(out)
        # The hash of the chunk before this one, running while this one is read.
        hashing: asyncio.Future[None] | None = None
        try:
            for index, start in enumerate(range(0, size, chunk)):
                deadline.check()
                part = cast(bytes | None, await self.client.hget(key, str(index)))
                # Gone or short: the value was pruned or deleted while it was being read.
                if part is None or len(part) != min(chunk, size - start):
                    return None
                end = start + len(part)
                view[start:end] = part
                if digest is not None:
                    if hashing is not None:
                        await hashing
                    hashing = asyncio.ensure_future(_feed(digest, view[start:end]))
        finally:
            # Never leave a thread reading the buffer: the caller may reuse it at once.
            if hashing is not None:
                await asyncio.wait([hashing])
            view.release()
        if hashing is not None:
            hashing.result()  # done by now; raises what the last hash raised
        return out


async def _feed(digest: RunningHash, data: ByteBuffer | memoryview) -> None:
    """Hash `data` into `digest`, in a worker thread unless it is small."""
    if len(data) < _HASH_IN_THREAD_BYTES:
        digest.update(data)
    else:
        await asyncio.to_thread(digest.update, data)


class _Deadline:
    """A whole transfer's time limit, checked between its commands.

    Each command (one chunk at most) is bounded by the client's socket timeout; cancelling
    one midway is not relied on, since the client may retry a cancelled command.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._end = time.monotonic() + seconds

    def check(self) -> None:
        """Raise a redis TimeoutError (the store: BackendUnavailable) once time is up."""
        if time.monotonic() > self._end:
            raise RedisTimeoutError(f"transfer over its {self._seconds:.0f} s deadline")
