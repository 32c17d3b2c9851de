"""The aggregator service against real RabbitMQ and Redis (and the same checks in memory)."""

from __future__ import annotations

import asyncio
import functools
import pickle
from typing import cast

import pytest
import torch

from aggregator.service import Aggregator, Fenced
from infra.protocols import ModelStore
from schemas import StalenessConfig, StrategyConfig, VersionMeta
from schemas.codec import decode, encode, sha256_hex
from schemas.digests import blake3_hex
from tests.integration.helpers import (
    INITIAL,
    Backends,
    delta,
    drain,
    edit_fields,
    job_backends,
    update,
)
from tests.integration.helpers import update as _update

pytestmark = pytest.mark.integration
BACKENDS = ["real", "memory"]
FEDBUFF_2 = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=0, staleness=StalenessConfig(name="constant")
)


async def _publish(backends: Backends, built: tuple[dict, bytes, str]) -> str:
    headers, body, update_id = built
    await backends.broker.publish_raw(
        backends.config.job, body, headers=headers, message_id=update_id
    )
    return update_id


async def _model(backends: Backends, version: int) -> dict[str, torch.Tensor]:
    data = await backends.store.get_model(version)
    assert data is not None
    return decode(data)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fedbuff_commits_the_weighted_mean_and_acks_after_commit(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: two updates with 10 and 30 samples -> weights 1/4 and 3/4
        ids = [
            await _publish(backends, update(job_id, delta(1.0, 2.0), num_samples=10)),
            await _publish(backends, update(job_id, delta(-1.0, 6.0), num_samples=30)),
        ]
        # Act
        aggregator = await drain(backends)
        # Assert: x1 = x0 + (10*d1 + 30*d2) / 40
        assert await backends.store.current_version() == 1
        model = await _model(backends, 1)
        torch.testing.assert_close(model["w"], INITIAL["w"] - 0.5)
        torch.testing.assert_close(model["b"], INITIAL["b"] + 5.0)
        meta = await backends.store.get_meta(1)
        assert meta is not None
        assert meta.contributors == ids
        assert meta.sha256 == sha256_hex((await backends.store.get_model(1)) or b"")
        assert await backends.store.applied(ids) == [True, True]
        assert aggregator.stats.applied == 2
        assert await backends.broker.queue_depth(job_id) == (0, 0)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_buffered_updates_stay_unacked_until_their_version_commits(
    kind: str, job_id: str
) -> None:
    strategy = FEDBUFF_2.model_copy(update={"buffer_size": 3})
    async with job_backends(kind, job_id, strategy) as backends:
        # Arrange: two updates, one short of a version
        for _ in range(2):
            await _publish(backends, update(job_id, delta(1.0)))
        # Act
        await drain(backends)
        # Assert: nothing committed, both back in the queue for the next aggregator
        assert await backends.store.current_version() == 0
        assert await backends.store.applied_count() == 0
        ready, _ = await backends.broker.queue_depth(job_id)
        assert ready == 2
        # Act again: a third update completes the buffer on the next run
        await _publish(backends, update(job_id, delta(1.0)))
        await drain(backends)
        assert await backends.store.current_version() == 1
        assert await backends.store.applied_count() == 3


@pytest.mark.parametrize("kind", BACKENDS)
async def test_duplicates_are_applied_once(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: A, A again while buffered, B (-> version 1), A once more after the commit
        first = update(job_id, delta(1.0))
        await _publish(backends, first)
        await _publish(backends, first)
        await _publish(backends, update(job_id, delta(3.0)))
        await _publish(backends, first)
        # Act
        aggregator = await drain(backends)
        # Assert: one version from A and B, the repeats acked and counted as duplicates
        assert await backends.store.current_version() == 1
        torch.testing.assert_close((await _model(backends, 1))["w"], INITIAL["w"] + 2.0)
        assert aggregator.stats.duplicates == 2
        assert await backends.store.applied_count() == 2
        assert await backends.broker.queue_depth(job_id) == (0, 0)
        assert await backends.broker.drain_dead_letters(job_id) == []


def _bad_inputs(job: str) -> dict[str, tuple[tuple[dict, bytes, str], str]]:
    """Every bad input of the core issue, each with the reason it must be dead-lettered for.

    They are checked at version 1, so all are based on it unless the case is about the base.
    """
    update = functools.partial(_update, base_version=1)
    good = delta(1.0)
    nan = {"w": torch.tensor([1.0, float("nan"), 0.0, 0.0]), "b": torch.tensor([0.0])}
    inf = {"w": torch.zeros(4), "b": torch.tensor([float("inf")])}
    pickled = pickle.dumps({"w": [0.0] * 4, "b": [0.0]})
    cases: dict[str, tuple[tuple[dict, bytes, str], str]] = {
        "not_safetensors": (
            _with_body(update(job, good), b"hello, aggregator"),
            "malformed_payload",
        ),
        "pickle": (_with_body(update(job, good), pickled), "malformed_payload"),
        "size_lie": (update(job, good, payload_bytes=3), "size_mismatch"),
        "hash_lie": (update(job, good, payload_blake3="0" * 64), "hash_mismatch"),
        "missing_key": (update(job, {"w": torch.zeros(4)}), "wrong_keys"),
        "extra_key": (update(job, {**good, "x": torch.zeros(1)}), "wrong_keys"),
        "renamed_key": (update(job, {"w": torch.zeros(4), "bias": torch.zeros(1)}), "wrong_keys"),
        "wrong_shape": (update(job, {"w": torch.zeros(2, 2), "b": torch.zeros(1)}), "wrong_shape"),
        "wrong_dtype": (
            update(job, {"w": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(1)}),
            "wrong_dtype",
        ),
        "nan": (update(job, nan), "non_finite"),
        "inf": (update(job, inf), "non_finite"),
        "unknown_job": (update(job, good, job="some-other-job"), "unknown_job"),
        "future_base": (update(job, good, base_version=7), "future_base_version"),
        "too_stale": (update(job, good, base_version=0), "too_stale"),
        "missing_field": (_without(update(job, good), "payload_blake3"), "malformed_header"),
        "bad_uuid": (update(job, good, update_id="1234"), "malformed_header"),
        "blob_missing": (_as_blob(update(job, good)), "blob_missing"),
        "blob_mismatch": (_as_blob(update(job, good)), "hash_mismatch"),
    }
    return cases


def _with_body(built: tuple[dict, bytes, str], body: bytes) -> tuple[dict, bytes, str]:
    headers, _, update_id = built
    return (
        edit_fields(headers, payload_bytes=len(body), payload_blake3=blake3_hex(body)),
        body,
        update_id,
    )


def _without(built: tuple[dict, bytes, str], field: str) -> tuple[dict, bytes, str]:
    headers, body, update_id = built
    return edit_fields(headers, drop=(field,)), body, update_id


def _as_blob(built: tuple[dict, bytes, str]) -> tuple[dict, bytes, str]:
    headers, body, update_id = built
    return edit_fields(headers, payload="blob"), body, update_id


@pytest.mark.parametrize("kind", BACKENDS)
async def test_every_bad_input_is_dead_lettered_with_its_reason(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: two good updates make version 1; then every bad input, checked at version 1
        for value in (1.0, 3.0):
            await _publish(backends, update(job_id, delta(value)))
        cases = _bad_inputs(job_id)
        expected = {}
        for name, ((headers, body, update_id), reason) in cases.items():
            if name.startswith("blob_"):
                stored = encode(delta(9.0)) if name == "blob_mismatch" else None
                if stored is not None:
                    await backends.store.put_blob("dev-0", update_id, stored, 60)
                body = b""
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
            expected[update_id] = reason
        # Act
        aggregator = await drain(backends)
        dead = await backends.broker.drain_dead_letters(job_id)
        # Assert: each one dead-lettered for its reason; the model is version 1, unchanged
        assert {d.message_id: d.reason for d in dead} == expected
        assert all(d.detail for d in dead)
        assert await backends.store.current_version() == 1
        torch.testing.assert_close((await _model(backends, 1))["w"], INITIAL["w"] + 2.0)
        assert sum((await backends.store.rejection_counts()).values()) == len(cases)
        assert sum(aggregator.stats.rejected.values()) == len(cases)
        assert await backends.broker.queue_depth(job_id) == (0, 0)


def _schema_1(built: tuple[dict, bytes, str]) -> tuple[dict, bytes, str]:
    """The update as an agent of the previous release sent it: its SHA-256, not BLAKE3."""
    headers, body, update_id = built
    legacy = edit_fields(
        headers, drop=("payload_blake3",), schema_version=1, payload_sha256=sha256_hex(body)
    )
    return legacy, body, update_id


@pytest.mark.parametrize("kind", BACKENDS)
async def test_schema_1_updates_are_checked_against_their_sha256(kind: str, job_id: str) -> None:
    # A rolling upgrade: until every agent runs this release, SHA-256 updates keep arriving,
    # inline and by claim-check (whose blob the aggregator hashes chunk by chunk as it reads).
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange
        inline = _schema_1(update(job_id, delta(1.0)))
        blob = _as_blob(_schema_1(update(job_id, delta(3.0))))
        forged = _as_blob(_schema_1(update(job_id, delta(5.0), base_version=1)))
        await _publish(backends, inline)
        await backends.store.put_blob("dev-0", blob[2], blob[1], 60)
        await _publish(backends, (blob[0], b"", blob[2]))
        await backends.store.put_blob("dev-0", forged[2], encode(delta(9.0)), 60)
        await _publish(backends, (forged[0], b"", forged[2]))
        # Act
        await drain(backends)
        # Assert: the two honest ones folded, the blob that is not what was hashed refused
        torch.testing.assert_close((await _model(backends, 1))["w"], INITIAL["w"] + 2.0)
        dead = await backends.broker.drain_dead_letters(job_id)
        assert [(d.message_id, d.reason, d.detail) for d in dead] == [
            (forged[2], "hash_mismatch", "payload sha256 differs from the header's")
        ]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_large_update_goes_by_claim_check_and_its_blob_is_removed(
    kind: str, job_id: str
) -> None:
    strategy = FEDBUFF_2.model_copy(update={"buffer_size": 1})
    async with job_backends(kind, job_id, strategy) as backends:
        # Arrange: the job's inline limit is 64 bytes, so any real update is a blob
        headers, body, update_id = _as_blob(update(job_id, delta(2.0)))
        await backends.store.put_blob("dev-0", update_id, body, 60)
        await backends.broker.publish_raw(job_id, b"", headers=headers, message_id=update_id)
        # Act
        await drain(backends)
        # Assert
        assert await backends.store.current_version() == 1
        torch.testing.assert_close((await _model(backends, 1))["w"], INITIAL["w"] + 2.0)
        assert await backends.store.get_blob("dev-0", update_id) is None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_version_deletes_the_blobs_of_its_claim_check_updates_only(
    kind: str, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: one version of a claim-check update and an inline one
        headers, body, blob_id = _as_blob(update(job_id, delta(2.0), device_id="dev-0"))
        await backends.store.put_blob("dev-0", blob_id, body, 60)
        await backends.broker.publish_raw(job_id, b"", headers=headers, message_id=blob_id)
        await _publish(backends, update(job_id, delta(4.0), device_id="dev-1"))
        deleted: list[list[tuple[str, str]]] = []
        delete_blobs = backends.store.delete_blobs

        async def spy(blobs: list[tuple[str, str]]) -> None:
            deleted.append(list(blobs))
            await delete_blobs(blobs)

        monkeypatch.setattr(backends.store, "delete_blobs", spy)
        # Act
        await drain(backends)
        # Assert: the blob is gone, and only it was asked for (an inline update has none)
        assert await backends.store.current_version() == 1
        assert await backends.store.get_blob("dev-0", blob_id) is None
        assert deleted == [[("dev-0", blob_id)]]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fedasync_mixes_with_the_base_version_of_a_stale_update(
    kind: str, job_id: str
) -> None:
    strategy = StrategyConfig(
        name="fedasync",
        alpha=0.5,
        max_staleness=4,
        staleness=StalenessConfig(name="polynomial", a=1.0),
    )
    async with job_backends(kind, job_id, strategy) as backends:
        # Arrange: update 1 from v0 (tau 0), update 2 also from v0 (tau 1 at v1)
        await _publish(backends, update(job_id, delta(2.0)))
        await _publish(backends, update(job_id, delta(4.0)))
        # Act
        await drain(backends)
        # Assert: v1 = x0 + 0.5*2 = x0+1; alpha_2 = 0.5/(1+1) = 0.25,
        # v2 = 0.75*(x0+1) + 0.25*(x0+4) = x0 + 1.75
        assert await backends.store.current_version() == 2
        torch.testing.assert_close((await _model(backends, 2))["w"], INITIAL["w"] + 1.75)


async def _commit_rival(store: ModelStore, expected_version: int) -> None:
    """Commit the initial model as the next version, as another aggregator would."""
    rival = encode(INITIAL)
    meta = VersionMeta(
        version=expected_version + 1,
        created_at=0.0,
        sha256=sha256_hex(rival),
        model_bytes=len(rival),
    )
    await store.commit(expected_version, rival, meta)


async def _assert_the_rival_won(backends: Backends, job_id: str) -> None:
    """The rival's version 1 stands, nothing was applied, and both updates are queued again."""
    assert await backends.store.current_version() == 1
    torch.testing.assert_close((await _model(backends, 1))["w"], INITIAL["w"])
    assert await backends.store.applied_count() == 0
    await asyncio.sleep(0.2)
    ready, _ = await backends.broker.queue_depth(job_id)
    assert ready == 2


class RivalStore:
    """The real store, except that a rival commits first whatever version is committed."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    async def commit(self, expected_version: int, model: bytes, meta: VersionMeta) -> None:
        """Commit the rival's version, then try ours."""
        await _commit_rival(self._store, expected_version)
        await self._store.commit(expected_version, model, meta)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_fenced_commit_stops_the_loop_with_no_update_left_to_handle(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        # Arrange: two updates fill the buffer; nothing comes after them
        for value in (1.0, 2.0):
            await _publish(backends, update(job_id, delta(value)))
        store = cast(ModelStore, RivalStore(backends.store))
        async with Aggregator(job=job_id, broker=backends.broker, store=store) as aggregator:
            # Act: the commit runs while the loop waits for a delivery that never comes
            running = asyncio.create_task(aggregator.run())
            done, _ = await asyncio.wait({running}, timeout=30)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        # Assert: its fencing ended the loop by itself (no idle timeout would have)
        assert running in done
        assert isinstance(running.exception(), Fenced)
        await _assert_the_rival_won(backends, job_id)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_fenced_aggregator_stops_and_acks_nothing(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        for value in (1.0, 2.0):
            await _publish(backends, update(job_id, delta(value)))
        aggregator = Aggregator(job=job_id, broker=backends.broker, store=backends.store)
        async with aggregator:
            deliveries = backends.broker.consume(job_id, prefetch=10)
            # Arrange: this aggregator buffers one update from version 0 ...
            await aggregator.handle(await anext(deliveries))
            # ... while another aggregator commits version 1
            await _commit_rival(backends.store, 0)
            # Act / assert: the second update completes the buffer, and the commit is fenced
            with pytest.raises(Fenced):
                await aggregator.handle(await anext(deliveries))
            await deliveries.aclose()
        await _assert_the_rival_won(backends, job_id)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_an_idle_aggregator_catches_up_with_versions_committed_elsewhere(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        async with Aggregator(
            job=job_id, broker=backends.broker, store=backends.store, idle_timeout=1.0
        ) as aggregator:
            # Arrange: a standby loaded version 0; the active aggregator then committed v1
            moved = {"w": INITIAL["w"] + 10.0, "b": INITIAL["b"]}
            data = encode(moved)
            meta = VersionMeta(
                version=1, created_at=0.0, sha256=sha256_hex(data), model_bytes=len(data)
            )
            await backends.store.commit(0, data, meta)
            for value in (1.0, 3.0):
                await _publish(backends, update(job_id, delta(value), base_version=1))
            # Act: the standby becomes active and gets the next updates
            await aggregator.run()
        # Assert: it folded them into version 1, not into its stale copy of version 0
        assert await backends.store.current_version() == 2
        torch.testing.assert_close((await _model(backends, 2))["w"], INITIAL["w"] + 12.0)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_stop_ends_a_waiting_aggregator(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_2) as backends:
        async with Aggregator(job=job_id, broker=backends.broker, store=backends.store) as agg:
            running = asyncio.create_task(agg.run())
            await asyncio.sleep(0.5)
            # Act
            agg.stop()
            # Assert: the loop ends promptly although no message ever came
            stats = await asyncio.wait_for(running, timeout=5)
        assert stats.received == 0
