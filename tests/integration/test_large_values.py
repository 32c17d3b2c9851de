"""Chunked Redis values on the real Redis: blobs and models over one chunk, TTLs, deadlines."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.errors import BackendUnavailable
from infra.keys import JobKeys
from infra.redis_store import RedisModelStore
from infra.redis_values import ValueIO
from schemas import JobConfig, VersionMeta
from schemas.codec import sha256_hex
from schemas.safetensors_format import ByteBuffer, has_no_views

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHUNK = 1024


@pytest.fixture
async def store(client: aioredis.Redis, job_id: str) -> AsyncIterator[RedisModelStore]:
    redis_store = RedisModelStore(client, job_id, values=ValueIO(client, chunk_bytes=CHUNK))
    yield redis_store
    await redis_store.delete_job()


def _meta(version: int, model: bytes | bytearray, contributors: int = 0) -> VersionMeta:
    return VersionMeta(
        version=version, created_at=time.time(), sha256=sha256_hex(model), model_bytes=len(model)
    )


def _two_versions_kept(job: str) -> JobConfig:
    return JobConfig(
        job=job,
        task="tiny",
        model_schema={"w": {"shape": (1,), "dtype": "float32"}},
        keep_versions=2,
        strategy={"max_staleness": 0},
        created_at=time.time(),
    )


async def _keys(client: aioredis.Redis, job: str) -> set[bytes]:
    return {key async for key in client.scan_iter(match=JobKeys(job).pattern)}


@pytest.mark.parametrize("size", [0, CHUNK, CHUNK + 1, 10 * CHUNK + 7])
async def test_a_blob_of_any_size_round_trips_with_its_ttl(
    store: RedisModelStore, client: aioredis.Redis, job_id: str, size: int
) -> None:
    # Arrange
    data = bytearray(os.urandom(size))
    key = JobKeys(job_id).blob("dev-0", "u1")
    # Act
    await store.put_blob("dev-0", "u1", data, ttl_seconds=100)
    back = await store.get_blob("dev-0", "u1")
    # Assert: chunked beyond one chunk, one key either way, expiring, nothing else left
    assert back == data
    assert await client.type(key) == (b"hash" if size > CHUNK else b"string")
    assert 90 <= await client.ttl(key) <= 100
    assert await _keys(client, job_id) == {key.encode()}
    await store.delete_blobs([("dev-0", "u1")])
    assert await store.get_blob("dev-0", "u1") is None
    assert await _keys(client, job_id) == set()


async def test_a_chunked_value_is_read_into_a_scratch_buffer_of_its_length(
    store: RedisModelStore,
) -> None:
    # Arrange: a chunked blob, a plain one, and scratch buffers of other bytes
    chunked, plain = os.urandom(3 * CHUNK + 5), os.urandom(CHUNK)
    await store.put_blob("dev-0", "big", chunked, ttl_seconds=100)
    await store.put_blob("dev-0", "small", plain, ttl_seconds=100)
    right, wrong = bytearray(len(chunked)), bytearray(len(chunked) - 1)
    # Act
    into_right = await store.get_blob("dev-0", "big", right)
    into_wrong = await store.get_blob("dev-0", "big", wrong)
    small = await store.get_blob("dev-0", "small", bytearray(len(plain)))
    # Assert: the value either way; only a chunked value of the buffer's length uses it
    assert into_right is right and right == chunked
    assert into_wrong is not wrong and into_wrong == chunked
    assert wrong == bytearray(len(chunked) - 1)
    assert small == plain
    await store.delete_blobs([("dev-0", "big"), ("dev-0", "small")])


@pytest.mark.parametrize("size", [CHUNK, 10 * CHUNK + 7])
async def test_a_read_feeds_the_digest_the_value_and_leaves_no_view_on_its_buffer(
    store: RedisModelStore, size: int
) -> None:
    # Arrange: a plain or a chunked blob, and a scratch buffer of its length
    data = os.urandom(size)
    await store.put_blob("dev-0", "u1", data, ttl_seconds=100)
    into, digest = bytearray(size), hashlib.sha256()
    # Act
    back = await store.get_blob("dev-0", "u1", into, digest)
    # Assert: the digest is the value's, and a chunked read's buffer can be resized again
    # (the aggregator reuses it only then: nothing may still be hashing it)
    assert back == data
    assert digest.hexdigest() == sha256_hex(data)
    assert (back is into) == (size > CHUNK)
    assert has_no_views(into)


async def test_chunked_models_commit_prune_and_delete_as_one_key(
    store: RedisModelStore, client: aioredis.Redis, job_id: str
) -> None:
    # Arrange: models of five chunks, two versions kept
    models = [bytearray(os.urandom(5 * CHUNK)) for _ in range(4)]
    config = _two_versions_kept(job_id)
    await store.create_job(config, models[0], _meta(0, models[0]))
    # Act
    for version in range(1, 4):
        await store.commit(version - 1, models[version], _meta(version, models[version]))
    # Assert: the latest two are there, byte for byte; the older ones and every
    # temporary or partial key are gone
    assert await store.latest() == (3, models[3])
    assert await store.get_model(2) == models[2]
    assert await store.get_model(1) is None
    keys = JobKeys(job_id)
    model_keys = {k for k in await _keys(client, job_id) if b":model:" in k}
    assert model_keys == {keys.model(2).encode(), keys.model(3).encode()}
    assert await client.ttl(keys.model(3)) == -1
    await store.delete_job()
    assert await _keys(client, job_id) == set()


@dataclass(frozen=True)
class _KeysAtWrite(ValueIO):
    """A ValueIO that notes which model keys exist when each value starts to be written."""

    seen: list[set[bytes]] = field(default_factory=list)

    async def write(self, key: str, data: ByteBuffer, *, ex: int) -> None:
        pattern = f"{key.split(':model:')[0]}:model:*"
        existing = {k async for k in self.client.scan_iter(match=pattern)}
        self.seen.append({k for k in existing if b":tmp:" not in k})
        await super().write(key, data, ex=ex)


async def test_a_big_commit_prunes_before_it_writes_the_new_model(
    client: aioredis.Redis, job_id: str
) -> None:
    # Arrange: two versions kept, models of five chunks, a writer that looks before writing
    values = _KeysAtWrite(client, chunk_bytes=CHUNK)
    store = RedisModelStore(client, job_id, values=values)
    models = [bytearray(os.urandom(5 * CHUNK)) for _ in range(4)]
    config = _two_versions_kept(job_id)
    keys = JobKeys(job_id)
    try:
        await store.create_job(config, models[0], _meta(0, models[0]))
        values.seen.clear()
        # Act
        for version in range(1, 4):
            await store.commit(version - 1, models[version], _meta(version, models[version]))
        # Assert: the version a commit prunes was gone before its new model was written, so
        # Redis never held more than two models (one of them partial); the current one
        # was always there
        model = [keys.model(v).encode() for v in range(4)]
        assert values.seen == [{model[0]}, {model[1]}, {model[2]}]
        assert await store.latest() == (3, models[3])
        assert await store.get_model(2) == models[2]
    finally:
        await store.delete_job()


async def test_a_transfer_over_its_deadline_is_unavailable_and_leaves_no_value(
    client: aioredis.Redis, job_id: str
) -> None:
    # Arrange: 8 MiB at an assumed 1 TB/s with no fixed allowance: an 8 us deadline, over
    # once the first command has gone, however fast the machine
    io = ValueIO(client, chunk_bytes=CHUNK, base_seconds=0.0, bytes_per_second=1e12)
    key = JobKeys(job_id).blob("dev-0", "late")
    # Act / Assert
    with pytest.raises(RedisTimeoutError, match="deadline"):
        await io.write(key, bytearray(8 * 2**20), ex=60)
    assert not await client.exists(key)
    # What the cut-off writer left is a partial key that expires by itself.
    leftovers = [k async for k in client.scan_iter(match=f"{key}:partial:*")]
    for leftover in leftovers:
        assert 0 < await client.ttl(leftover) <= 3600
    if leftovers:
        await client.unlink(*leftovers)


async def test_the_store_reports_a_late_transfer_as_unavailable(
    client: aioredis.Redis, job_id: str
) -> None:
    # Arrange: a 64 us deadline for 64 MiB (32 commands)
    late = ValueIO(client, base_seconds=0.0, bytes_per_second=1e12)
    store = RedisModelStore(client, job_id, values=late)
    try:
        # Act / Assert
        with pytest.raises(BackendUnavailable, match="deadline"):
            await store.put_blob("dev-0", "late", bytearray(64 * 2**20), ttl_seconds=60)
    finally:
        await store.delete_job()
