"""The aggregator's scratch buffers on the real services: a version is encoded into the last
committed version's bytes and a chunked claim-check payload is read into the last one's,
without ever changing a committed version or a payload whose tensors are still in use."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import pytest
import redis.asyncio as aioredis
import torch

from aggregator.strategies import Contribution
from device_agent.sender import send_update
from infra.protocols import Delivery, ModelStore
from infra.redis_store import RedisModelStore
from infra.redis_values import ValueIO
from schemas import StalenessConfig, StrategyConfig, UpdateHeader, VersionMeta
from schemas.codec import decode, encode
from schemas.digests import RunningHash, blake3_hex
from schemas.safetensors_format import ByteBuffer
from tests.integration.helpers import INITIAL, Backends, delta, drain, job_backends

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Small enough that the tiny model (about 130 bytes encoded) is written in chunks.
CHUNK = 64
# Constant staleness weight: each version is the last plus the delta, whatever its base.
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=10, staleness=StalenessConfig(name="constant")
)


@dataclass
class SpyStore:
    """A real store with small chunks that records which buffers went in and came out."""

    store: RedisModelStore
    # (the `into` given, the buffer returned) of every get_blob.
    reads: list[tuple[bytearray | None, ByteBuffer | None]] = field(default_factory=list)
    # The model buffer of every commit.
    commits: list[ByteBuffer] = field(default_factory=list)

    async def get_blob(
        self,
        device_id: str,
        update_id: str,
        into: bytearray | None = None,
        digest: RunningHash | None = None,
    ) -> ByteBuffer | None:
        """Read the blob, noting the scratch buffer and the result."""
        blob = await self.store.get_blob(device_id, update_id, into, digest)
        self.reads.append((into, blob))
        return blob

    async def commit(self, expected_version: int, model: ByteBuffer, meta: VersionMeta) -> None:
        """Commit, noting the model buffer."""
        self.commits.append(model)
        await self.store.commit(expected_version, model, meta)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


async def _send_blobs(backends: Backends, store: ModelStore, values: Sequence[float]) -> None:
    """Send one claim-check update per value, each from version 0 (staleness allows it)."""
    for index, value in enumerate(values):
        payload = encode(delta(value))
        header = UpdateHeader(
            job=backends.config.job,
            update_id=str(uuid.uuid4()),
            device_id=f"dev-{index}",
            base_version=0,
            num_samples=1,
            payload="blob",
            payload_blake3=blake3_hex(payload),
            payload_bytes=len(payload),
            sent_at=time.time(),
        )
        await send_update(backends.broker, store, backends.config, header, payload)


async def test_versions_reuse_the_buffers_and_every_committed_version_stays_intact(
    client: aioredis.Redis, job_id: str
) -> None:
    async with job_backends("real", job_id, FEDBUFF_1) as backends:
        # Arrange: three chunked blobs, each a version of its own (K=1)
        spy = SpyStore(RedisModelStore(client, job_id, values=ValueIO(client, chunk_bytes=CHUNK)))
        await _send_blobs(backends, spy.store, [1.0, 2.0, 4.0])
        # Act
        aggregator = await drain(replace(backends, store=cast(ModelStore, spy)))
        # Assert: each version encoded into the bytes of the one before, each payload read
        # into the one before...
        assert aggregator.stats.versions == 3
        first = spy.commits[0]
        assert isinstance(first, bytearray)
        assert all(model is first for model in spy.commits)
        [(none, blob0), (into1, blob1), (into2, blob2)] = spy.reads
        assert none is None and isinstance(blob0, bytearray)
        assert into1 is blob0 and blob1 is blob0
        assert into2 is blob0 and blob2 is blob0
        # ...and every version in Redis is still its own: x0 + 1, + 1 + 2, + 1 + 2 + 4
        for version, total in [(1, 1.0), (2, 3.0), (3, 7.0)]:
            data = await backends.store.get_model(version)
            assert data is not None
            model = decode(data)
            torch.testing.assert_close(model["w"], INITIAL["w"] + total)
            torch.testing.assert_close(model["b"], INITIAL["b"])


async def test_a_payload_whose_tensors_are_still_held_is_never_read_over(
    client: aioredis.Redis, job_id: str
) -> None:
    async with job_backends("real", job_id, FEDBUFF_1) as backends:
        # Arrange: a sink that keeps every contribution (as the edge forwarder does)
        spy = SpyStore(RedisModelStore(client, job_id, values=ValueIO(client, chunk_bytes=CHUNK)))
        kept: list[Contribution] = []

        async def keep(_: UpdateHeader, delivery: Delivery, contribution: Contribution) -> None:
            kept.append(contribution)
            await delivery.ack()

        await _send_blobs(backends, spy.store, [1.0, 2.0, 4.0])
        # Act
        await drain(replace(backends, store=cast(ModelStore, spy)), sink=keep)
        # Assert: each kept delta still has its own values, since no read was given a buffer
        # whose views the sink holds
        assert [float(c.delta["w"][0]) for c in kept] == [1.0, 2.0, 4.0]
        assert [into for into, _ in spy.reads] == [None, None, None]


async def test_a_chunked_blob_hashed_as_it_arrives_is_still_checked_against_its_header(
    client: aioredis.Redis, job_id: str
) -> None:
    async with job_backends("real", job_id, FEDBUFF_1) as backends:
        # Arrange: two chunked blobs; one byte of the first one's middle chunk is changed in
        # Redis after it was sent, so only its hash tells
        store = RedisModelStore(client, job_id, values=ValueIO(client, chunk_bytes=CHUNK))
        await _send_blobs(backends, store, [1.0, 2.0])
        [tampered, _] = sorted(
            [k async for k in client.scan_iter(match=f"fedq:{{{job_id}}}:blob:*")],
            key=lambda key: b"dev-0" not in key,
        )
        chunk = bytearray(await client.hget(tampered, "1"))
        chunk[0] ^= 0xFF
        await client.hset(tampered, "1", bytes(chunk))
        # Act
        aggregator = await drain(replace(backends, store=store))
        # Assert: the tampered one is dead-lettered for its hash, the other one folded
        assert aggregator.stats.rejected == {"hash_mismatch": 1}
        assert aggregator.stats.versions == 1
        data = await backends.store.get_model(1)
        assert data is not None
        torch.testing.assert_close(decode(data)["w"], INITIAL["w"] + 2.0)
