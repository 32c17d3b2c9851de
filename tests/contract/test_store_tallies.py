"""The ModelStore's running tallies for `fedq status`, over the in-memory store and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.protocols import DeviceTally, ModelStore, tallies_from_fields
from infra.redis_store import RedisModelStore
from schemas import VersionMeta
from schemas.codec import sha256_hex
from tests.conftest import REDIS_URL
from tests.contract.test_store_contract import create, make_model

pytestmark = pytest.mark.contract


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, job_id: str) -> AsyncIterator[ModelStore]:
    """A store of one fresh job on each backend; its keys are deleted afterwards."""
    opened: ModelStore = (
        MemoryModelStore(MemoryStoreHub(), job_id)
        if request.param == "memory"
        else RedisModelStore.from_url(REDIS_URL, job_id, timeout=10.0)
    )
    yield opened
    await opened.delete_job()
    await opened.close()


async def _commit(store: ModelStore, devices: list[str], staleness: list[int]) -> None:
    current = await store.current_version()
    model = make_model(float(current + 1))
    meta = VersionMeta(
        version=current + 1,
        created_at=time.time(),
        sha256=sha256_hex(model),
        model_bytes=len(model),
        contributors=[str(uuid.uuid4()) for _ in devices],
        devices=devices,
        staleness=staleness,
        num_samples=10 * len(devices),
    )
    await store.commit(current, model, meta)


async def test_each_commit_adds_to_its_devices_tallies(store: ModelStore) -> None:
    # Arrange
    await create(store)
    assert await store.device_tallies() == []
    # Act: dev:a twice in one version, then once more; dev-b once
    await _commit(store, ["dev:a", "dev-b", "dev:a"], [0, 2, 1])
    await _commit(store, ["dev:a"], [5])
    # Assert
    assert await store.device_tallies() == [
        DeviceTally("dev-b", applied=1, staleness_sum=2, staleness_max=2),
        DeviceTally("dev:a", applied=3, staleness_sum=6, staleness_max=5),
    ]


async def test_a_losing_commit_adds_nothing_to_the_tallies(store: ModelStore) -> None:
    # Arrange
    await create(store)
    await _commit(store, ["dev-a"], [0])
    model = make_model(9.0)
    stale = VersionMeta(
        version=1,
        created_at=time.time(),
        sha256=sha256_hex(model),
        model_bytes=len(model),
        contributors=[str(uuid.uuid4())],
        devices=["dev-a"],
        staleness=[7],
    )
    # Act
    with pytest.raises(Exception, match="no longer 0"):
        await store.commit(0, model, stale)
    # Assert
    [tally] = await store.device_tallies()
    assert (tally.applied, tally.staleness_max) == (1, 0)


async def test_recent_versions_counts_commits_in_the_window(store: ModelStore) -> None:
    # Arrange
    await create(store)
    assert await store.recent_versions(60) == 0
    # Act
    for _ in range(3):
        await _commit(store, ["dev-a"], [0])
    # Assert: version 0 is not a commit; a window that ended before the commits is empty
    assert await store.recent_versions(60) == 3
    await asyncio.sleep(0.05)
    assert await store.recent_versions(0.01) == 0


def test_tallies_parse_device_ids_holding_colons() -> None:
    fields = {"applied:a:b": 2, "staleness_sum:a:b": 3, "staleness_max:a:b": 2}
    assert tallies_from_fields(fields) == [DeviceTally("a:b", 2, 3, 2)]
    assert tallies_from_fields(fields)[0].staleness_mean == 1.5
