"""The ModelStore contract: one suite, run over the in-memory store and a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch

from infra import redis_store
from infra.errors import (
    BackendUnavailable,
    DeviceExists,
    JobExists,
    JobNotFound,
    VersionConflict,
)
from infra.keys import JobKeys
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.protocols import DeviceRecord, ModelStore
from infra.redis_store import INLINE_MODEL_BYTES, RedisModelStore
from schemas import JobConfig, StrategyConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.contract

StoreFactory = Callable[[], ModelStore]


# -- helpers (kept in this module: tests/contract/conftest.py belongs to another suite) ----


def make_config(job: str, *, keep_versions: int = 4, max_staleness: int = 2) -> JobConfig:
    """Build a small job config; versions_kept = max(keep_versions, max_staleness + 1)."""
    return JobConfig(
        job=job,
        task="test",
        strategy=StrategyConfig(max_staleness=max_staleness),
        model_schema=schema_of({"w": torch.zeros(2, 2)}),
        keep_versions=keep_versions,
        created_at=time.time(),
    )


def make_model(value: float, elements: int = 4) -> bytes:
    """Encode a model filled with `value` (2x2 unless told), so every version's bytes differ."""
    return encode({"w": torch.full((2, 2) if elements == 4 else (elements,), value)})


def make_meta(version: int, model: bytes, contributors: int = 0) -> VersionMeta:
    """Describe `model` as `version`, with that many fresh contributing update ids."""
    ids = [str(uuid.uuid4()) for _ in range(contributors)]
    return VersionMeta(
        version=version,
        created_at=time.time(),
        sha256=sha256_hex(model),
        model_bytes=len(model),
        contributors=ids,
        devices=[f"dev-{i}" for i in range(contributors)],
        staleness=[0] * contributors,
        num_samples=10 * contributors,
    )


async def create(store: ModelStore, **config: int) -> JobConfig:
    """Create the store's job at version 0 and return its config."""
    cfg = make_config(store.job, **config)
    model = make_model(0.0)
    await store.create_job(cfg, model, make_meta(0, model))
    return cfg


async def commit_next(store: ModelStore, value: float, contributors: int = 1) -> VersionMeta:
    """Commit the version after the current one and return its meta."""
    current = await store.current_version()
    model = make_model(value)
    meta = make_meta(current + 1, model, contributors)
    await store.commit(current, model, meta)
    return meta


async def redis_keys(job: str) -> set[str]:
    """Every key of a job on the real Redis, found with SCAN."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return {k.decode() async for k in client.scan_iter(match=JobKeys(job).pattern)}
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def new_store(backend: str, job_id: str) -> AsyncIterator[StoreFactory]:
    """A factory of stores on one job (several act as rival aggregators); cleaned up after."""
    hub = MemoryStoreHub()
    stores: list[ModelStore] = []

    def factory() -> ModelStore:
        store: ModelStore
        if backend == "memory":
            store = MemoryModelStore(hub, job_id)
        else:
            store = RedisModelStore.from_url(REDIS_URL, job_id, timeout=10.0)
        stores.append(store)
        return store

    yield factory
    if stores:
        await stores[0].delete_job()
    for store in stores:
        await store.close()


@pytest.fixture
def store(new_store: StoreFactory) -> ModelStore:
    return new_store()


# -- job lifecycle ---------------------------------------------------------------------


async def test_create_job_then_read_back(store: ModelStore) -> None:
    # arrange
    config = make_config(store.job)
    model = make_model(0.0)
    meta = make_meta(0, model)
    # act
    await store.create_job(config, model, meta)
    # assert
    assert await store.get_config() == config
    assert await store.current_version() == 0
    assert await store.latest() == (0, model)
    assert await store.get_model(0) == model
    assert await store.get_meta(0) == meta
    assert await store.get_meta(1) is None
    assert await store.get_model(1) is None


async def test_second_create_raises_job_exists(store: ModelStore) -> None:
    config = await create(store)
    other = make_model(9.0)
    with pytest.raises(JobExists):
        await store.create_job(config, other, make_meta(0, other))
    assert await store.get_model(0) == make_model(0.0)


async def test_missing_job_raises_job_not_found(store: ModelStore) -> None:
    model = make_model(1.0)
    with pytest.raises(JobNotFound):
        await store.get_config()
    with pytest.raises(JobNotFound):
        await store.current_version()
    with pytest.raises(JobNotFound):
        await store.latest()
    with pytest.raises(JobNotFound):
        await store.commit(0, model, make_meta(1, model))
    with pytest.raises(JobNotFound):
        await store.wait_for_version(0, timeout=0.1)


async def test_delete_job_removes_every_key(store: ModelStore, backend: str) -> None:
    # arrange: touch every kind of key the job has
    await create(store)
    await commit_next(store, 1.0, contributors=2)
    await store.put_blob("dev-a", str(uuid.uuid4()), b"payload", ttl_seconds=60)
    await store.record_eval(1, {"accuracy": 0.5})
    await store.count_rejection("wrong_shape")
    await store.claim_device_index("dev-a")
    if backend == "redis":
        assert len(await redis_keys(store.job)) >= 9
    # act
    await store.delete_job()
    # assert
    with pytest.raises(JobNotFound):
        await store.current_version()
    assert await store.get_meta(1) is None
    assert await store.get_model(0) is None
    assert await store.applied_count() == 0
    assert await store.latest_eval() is None
    assert await store.rejection_counts() == {}
    assert await store.claim_device_index("dev-b") == 0
    await store.delete_job()
    if backend == "redis":
        assert await redis_keys(store.job) == set()


# -- commits ---------------------------------------------------------------------------


async def test_commit_advances_version_and_records_applied(store: ModelStore) -> None:
    # arrange
    await create(store)
    model = make_model(1.0)
    meta = make_meta(1, model, contributors=3)
    # act
    await store.commit(0, model, meta)
    # assert
    assert await store.current_version() == 1
    assert await store.latest() == (1, model)
    assert await store.get_meta(1) == meta
    assert await store.applied([*meta.contributors, str(uuid.uuid4())]) == [
        True,
        True,
        True,
        False,
    ]
    assert await store.applied([]) == []
    assert await store.applied_count() == 3


async def test_commit_records_thousands_of_contributors(store: ModelStore) -> None:
    # More ids than one Lua unpack() can take, so the script must add them in chunks.
    await create(store)
    meta = await commit_next(store, 1.0, contributors=2500)
    assert await store.applied_count() == 2500
    assert all(await store.applied(meta.contributors))


async def test_commit_rejects_meta_of_the_wrong_version(store: ModelStore) -> None:
    await create(store)
    model = make_model(1.0)
    with pytest.raises(ValueError):
        await store.commit(0, model, make_meta(2, model))
    assert await store.current_version() == 0


# Small models go in the commit script's own call, big ones by a temporary key first.
@pytest.mark.parametrize("elements", [4, INLINE_MODEL_BYTES // 4 + 1], ids=["small", "big"])
async def test_losing_commit_changes_nothing(
    new_store: StoreFactory, backend: str, elements: int
) -> None:
    # arrange: two aggregators both start from version 0
    winner, loser = new_store(), new_store()
    await create(winner)
    winner_model, loser_model = make_model(1.0, elements), make_model(-1.0, elements)
    winner_meta = make_meta(1, winner_model, contributors=2)
    loser_meta = make_meta(1, loser_model, contributors=2)
    # act
    await winner.commit(0, winner_model, winner_meta)
    with pytest.raises(VersionConflict):
        await loser.commit(0, loser_model, loser_meta)
    # assert: the winner's version 1 is intact and the loser left no trace
    for store in (winner, loser):
        assert await store.current_version() == 1
        assert await store.get_model(1) == winner_model
        assert await store.get_meta(1) == winner_meta
        assert await store.applied(loser_meta.contributors) == [False, False]
    assert await winner.applied_count() == 2
    if backend == "redis":
        assert not [k for k in await redis_keys(winner.job) if ":tmp:" in k]


async def test_concurrent_commits_from_one_version_have_one_winner(
    new_store: StoreFactory,
) -> None:
    # arrange
    stores = [new_store() for _ in range(10)]
    await create(stores[0])
    models = [make_model(float(i + 1)) for i in range(10)]
    metas = [make_meta(1, m, contributors=1) for m in models]
    # act
    results = await asyncio.gather(
        *(s.commit(0, m, meta) for s, m, meta in zip(stores, models, metas, strict=True)),
        return_exceptions=True,
    )
    # assert
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r is not None)
    (won,) = winners
    assert await stores[0].current_version() == 1
    assert await stores[0].get_model(1) == models[won]
    assert await stores[0].get_meta(1) == metas[won]
    assert await stores[0].applied_count() == 1


async def test_pruning_keeps_exactly_versions_kept_models(store: ModelStore) -> None:
    # arrange: versions_kept = max(keep_versions=2, max_staleness + 1 = 3) = 3
    config = await create(store, keep_versions=2, max_staleness=2)
    assert config.versions_kept == 3
    # act
    for v in range(1, 7):
        await commit_next(store, float(v))
    # assert: models 4..6 are left; every meta is kept
    kept = [v for v in range(7) if await store.get_model(v) is not None]
    assert kept == [4, 5, 6]
    assert await store.get_model(6) == make_model(6.0)
    assert all([await store.get_meta(v) is not None for v in range(7)])


async def test_latest_is_consistent_while_commits_race(store: ModelStore) -> None:
    await create(store, keep_versions=2, max_staleness=0)

    async def committer() -> None:
        for v in range(1, 31):
            await commit_next(store, float(v))
            await asyncio.sleep(0)

    task = asyncio.create_task(committer())
    while not task.done():
        version, model = await store.latest()
        meta = await store.get_meta(version)
        assert meta is not None
        assert sha256_hex(model) == meta.sha256
    await task
    assert (await store.latest())[0] == 30


# -- blobs -----------------------------------------------------------------------------


async def test_blobs_put_get_delete(store: ModelStore) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    payload = bytearray(b"update bytes")
    await store.put_blob("dev-a", a, bytes(payload), ttl_seconds=60)
    await store.put_blob("dev-a", b, b"other", ttl_seconds=60)
    assert await store.get_blob("dev-a", a) == b"update bytes"
    # A blob is its device's: the same update id under another device is not it.
    assert await store.get_blob("dev-b", a) is None
    await store.delete_blobs([("dev-b", b), ("dev-a", a), ("dev-a", str(uuid.uuid4()))])
    await store.delete_blobs([])
    assert await store.get_blob("dev-a", a) is None
    assert await store.get_blob("dev-a", b) == b"other"


async def test_blob_expires_after_its_ttl(store: ModelStore) -> None:
    update_id = str(uuid.uuid4())
    await store.put_blob("dev-a", update_id, b"short-lived", ttl_seconds=1)
    assert await store.get_blob("dev-a", update_id) == b"short-lived"
    await asyncio.sleep(1.2)
    assert await store.get_blob("dev-a", update_id) is None


# -- evaluations, counters and devices -------------------------------------------------


async def test_record_eval_writes_meta_and_latest_eval(store: ModelStore) -> None:
    # arrange
    await create(store)
    meta1 = await commit_next(store, 1.0, contributors=2)
    await commit_next(store, 2.0)
    assert await store.latest_eval() is None
    # act: version 2 is evaluated before version 1
    await store.record_eval(2, {"accuracy": 0.9, "loss": 0.1})
    await store.record_eval(1, {"accuracy": 0.5})
    # assert: each meta has its metrics, and the older one did not replace latest_eval
    stored1 = await store.get_meta(1)
    stored2 = await store.get_meta(2)
    assert stored1 == meta1.model_copy(update={"eval": {"accuracy": 0.5}})
    assert stored2 is not None and stored2.eval == {"accuracy": 0.9, "loss": 0.1}
    assert await store.latest_eval() == (2, {"accuracy": 0.9, "loss": 0.1})


async def test_record_eval_rejects_bad_input(store: ModelStore) -> None:
    await create(store)
    with pytest.raises(ValueError):
        await store.record_eval(0, {"accuracy": float("nan")})
    with pytest.raises(LookupError):
        await store.record_eval(5, {"accuracy": 0.5})
    meta0 = await store.get_meta(0)
    assert meta0 is not None and meta0.eval is None
    assert await store.latest_eval() is None


async def test_rejection_counts(store: ModelStore) -> None:
    assert await store.rejection_counts() == {}
    for reason in ("wrong_shape", "too_stale", "wrong_shape"):
        await store.count_rejection(reason)
    assert await store.rejection_counts() == {"wrong_shape": 2, "too_stale": 1}


async def test_claim_device_index_is_stable(store: ModelStore) -> None:
    assert [await store.claim_device_index(d) for d in ("a", "b", "c")] == [0, 1, 2]
    assert await store.claim_device_index("b") == 1
    assert await store.claim_device_index("a") == 0


async def test_concurrent_device_claims_get_distinct_indices(store: ModelStore) -> None:
    ids = [f"dev-{i}" for i in range(20)]
    indices = await asyncio.gather(*(store.claim_device_index(d) for d in ids))
    assert sorted(indices) == list(range(20))
    assert [await store.claim_device_index(d) for d in ids] == indices


# -- waiting for versions --------------------------------------------------------------


async def test_wait_for_version_returns_at_once_when_already_newer(store: ModelStore) -> None:
    await create(store)
    await commit_next(store, 1.0)
    started = time.monotonic()
    assert await store.wait_for_version(0, timeout=5.0) == 1
    assert time.monotonic() - started < 0.5


async def test_wait_for_version_wakes_on_commit(new_store: StoreFactory) -> None:
    # arrange: the waiter and the committer use separate stores (separate connections)
    waiter, committer = new_store(), new_store()
    await create(committer)

    async def commit_soon() -> None:
        await asyncio.sleep(0.2)
        await commit_next(committer, 1.0)

    # act
    started = time.monotonic()
    task = asyncio.create_task(commit_soon())
    version = await waiter.wait_for_version(0, timeout=10.0)
    elapsed = time.monotonic() - started
    await task
    # assert
    assert version == 1
    assert elapsed < 2.0


async def test_wait_for_version_times_out_with_current_version(store: ModelStore) -> None:
    await create(store)
    started = time.monotonic()
    assert await store.wait_for_version(0, timeout=0.3) == 0
    assert 0.25 <= time.monotonic() - started < 2.0


# -- backend-specific ------------------------------------------------------------------


async def test_unreachable_redis_raises_backend_unavailable(job_id: str) -> None:
    # Port 1 refuses connections at once, so only the retry backoff takes time.
    store = RedisModelStore.from_url("redis://127.0.0.1:1/0", job_id, timeout=1.0)
    try:
        with pytest.raises(BackendUnavailable):
            await store.current_version()
    finally:
        await store.close()


# -- device registry -------------------------------------------------------------------


async def test_device_registry_register_revoke_and_list(store: ModelStore) -> None:
    # arrange
    await store.create_job(make_config(store.job), make_model(0.0), make_meta(0, make_model(0.0)))
    # act
    await store.register_device("dev-b", "key-b")
    await store.register_device("dev-a", "key-a")
    await store.register_device("dev-a", "key-a")  # the same active key again: a no-op
    revoked = await store.revoke_device("dev-b")
    # assert
    assert revoked is True
    assert await store.revoke_device("dev-unknown") is False
    assert await store.device_key("dev-a") == "key-a"
    assert await store.device_key("dev-b") is None
    assert await store.device_key("dev-unknown") is None
    assert await store.list_devices() == [
        DeviceRecord("dev-a", "key-a", revoked=False),
        DeviceRecord("dev-b", "key-b", revoked=True),
    ]


async def test_a_device_key_is_replaced_only_when_asked(store: ModelStore) -> None:
    # arrange
    await store.create_job(make_config(store.job), make_model(0.0), make_meta(0, make_model(0.0)))
    await store.register_device("dev-a", "key-1")
    await store.revoke_device("dev-a")
    # act / assert: neither another key nor the revoked one comes back silently
    with pytest.raises(DeviceExists):
        await store.register_device("dev-a", "key-2")
    with pytest.raises(DeviceExists):
        await store.register_device("dev-a", "key-1")
    await store.register_device("dev-a", "key-2", replace=True)
    assert await store.device_key("dev-a") == "key-2"
    assert await store.list_devices() == [DeviceRecord("dev-a", "key-2", revoked=False)]


async def test_deleting_the_job_forgets_its_devices(store: ModelStore) -> None:
    await store.create_job(make_config(store.job), make_model(0.0), make_meta(0, make_model(0.0)))
    await store.register_device("dev-a", "key-a")
    await store.revoke_device("dev-a")
    await store.delete_job()
    assert await store.list_devices() == []
    assert await store.device_key("dev-a") is None


@pytest.mark.parametrize("elements", [4, INLINE_MODEL_BYTES // 4 + 1], ids=["small", "big"])
async def test_a_retried_commit_whose_reply_was_lost_is_not_a_conflict(
    job_id: str, elements: int
) -> None:
    # Arrange: the commit runs twice with the same token, as when the client retries after
    # losing the reply to a commit that did apply (Redis-only: the memory store has no
    # replies to lose). A small model is SET in the script's pipeline, so the retry writes
    # its temporary key again; a big one is written before, once.
    store = RedisModelStore.from_url(REDIS_URL, job_id)
    try:
        await create(store)
        if elements == 4:
            set_and_commit = store._set_and_commit

            async def applied_then_retried_pipeline(*call: Any) -> object:
                await set_and_commit(*call)  # applied, but its reply never reaches the client
                return await set_and_commit(*call)

            store._set_and_commit = applied_then_retried_pipeline  # type: ignore[method-assign, assignment]
        else:
            script = store._commit_script

            async def applied_then_retried(**call: object) -> object:
                await script(**call)
                return await script(**call)

            store._commit_script = applied_then_retried  # type: ignore[assignment]
        model = make_model(1.0, elements)
        meta = make_meta(1, model, contributors=2)
        # Act: must see its own success, not another aggregator's
        await store.commit(0, model, meta)
        # Assert: committed once, and the retry's temporary model is not left behind
        assert await store.current_version() == 1
        assert await store.applied(meta.contributors) == [True, True]
        assert await store.get_model(1) == model
        assert [key for key in await redis_keys(job_id) if ":tmp:" in key] == []
    finally:
        await store.delete_job()
        await store.close()


async def test_a_commit_loads_its_script_when_redis_has_lost_it(job_id: str) -> None:
    # Arrange: a commit script Redis has never seen, as after a restart or SCRIPT FLUSH (not
    # flushed for real: other jobs share this Redis)
    store = RedisModelStore.from_url(REDIS_URL, job_id)
    try:
        await create(store)
        unseen = redis_store._COMMIT_LUA + f"\n-- {uuid.uuid4().hex}"
        store._commit_script = store._client.register_script(unseen)
        assert await store._client.script_exists(store._commit_script.sha) == [False]
        model = make_model(1.0)
        meta = make_meta(1, model, contributors=1)
        # Act
        await store.commit(0, model, meta)
        # Assert
        assert await store.current_version() == 1
        assert await store.get_model(1) == model
        assert await store._client.script_exists(store._commit_script.sha) == [True]
    finally:
        await store.delete_job()
        await store.close()
