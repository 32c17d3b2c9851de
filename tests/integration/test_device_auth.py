"""Signed updates against real RabbitMQ and Redis (and in memory): who gets in, who does not."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch

from device_agent.agent import DeviceAgent
from fedq.jobs import create_job, initial_job
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from schemas import StalenessConfig, StrategyConfig, TrainingConfig, UpdateHeader
from schemas.codec import decode, encode
from schemas.digests import blake3_hex
from schemas.signing import generate_key_pair, sign
from schemas.wire import UPDATE_HEADER, update_fields
from tests.integration.helpers import (
    INITIAL,
    Backends,
    delta,
    drain,
    edit_fields,
    job_backends,
    update,
)

pytestmark = pytest.mark.integration
BACKENDS = ["real", "memory"]
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=5, staleness=StalenessConfig(name="constant")
)
KEY_A, PUBLIC_A = generate_key_pair()
KEY_B, PUBLIC_B = generate_key_pair()
KEY_R, PUBLIC_R = generate_key_pair()

Built = tuple[dict[str, Any], bytes, str]


def signed(built: Built, private_key: str, **after_signing: Any) -> Built:
    """Sign a built update's header, as an agent sends it; `after_signing` fields are changed
    afterwards (tampering)."""
    headers, body, update_id = built
    header = sign(UpdateHeader.model_validate(update_fields(headers)), private_key)
    wire = header.model_dump(mode="json", exclude_none=True)
    return {UPDATE_HEADER: json.dumps({**wire, **after_signing})}, body, update_id


async def _registered(backends: Backends) -> None:
    await backends.store.register_device("dev-a", PUBLIC_A)
    await backends.store.register_device("dev-b", PUBLIC_B)
    await backends.store.register_device("dev-r", PUBLIC_R)
    assert await backends.store.revoke_device("dev-r")


async def _publish(backends: Backends, built: Built) -> str:
    headers, body, update_id = built
    await backends.broker.publish_raw(
        backends.config.job, body, headers=headers, message_id=update_id
    )
    return update_id


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_signed_update_from_a_registered_device_is_applied(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1, require_signatures=True) as backends:
        # Arrange
        await _registered(backends)
        update_id = await _publish(
            backends, signed(update(job_id, delta(1.0), device_id="dev-a"), KEY_A)
        )
        # Act
        aggregator = await drain(backends)
        # Assert
        assert await backends.store.current_version() == 1
        meta = await backends.store.get_meta(1)
        assert meta is not None
        assert meta.contributors == [update_id]
        assert meta.devices == ["dev-a"]
        model = decode((await backends.store.get_model(1)) or b"")
        torch.testing.assert_close(model["w"], INITIAL["w"] + 1.0)
        assert aggregator.stats.rejected == {}
        assert await backends.broker.drain_dead_letters(job_id) == []


def _refused(job: str) -> dict[str, tuple[Built, str]]:
    """Every update a job that requires signatures must refuse, with its reason."""
    good = delta(5.0)
    body = encode(delta(-5.0))
    return {
        "unsigned": (update(job, good, device_id="dev-a"), "unsigned"),
        "unknown": (signed(update(job, good, device_id="dev-x"), KEY_A), "unknown_device"),
        "revoked": (signed(update(job, good, device_id="dev-r"), KEY_R), "unknown_device"),
        # Device B's own valid key, but the header claims to be device A.
        "impersonation": (signed(update(job, good, device_id="dev-a"), KEY_B), "bad_signature"),
        "garbage_signature": (
            update(job, good, device_id="dev-a", signature="bm90IGEgc2lnbmF0dXJl"),
            "bad_signature",
        ),
        "tampered_samples": (
            signed(update(job, good, device_id="dev-a"), KEY_A, num_samples=10_000),
            "bad_signature",
        ),
        # The body swapped and the header's hash fixed up to match: the signature breaks.
        "swapped_body_and_hash": (
            _with_body(
                signed(update(job, good, device_id="dev-a"), KEY_A),
                body,
                payload_blake3=blake3_hex(body),
            ),
            "bad_signature",
        ),
        # The body swapped, the signed header untouched: the signed hash no longer matches.
        "swapped_body": (
            _with_body(signed(update(job, good, device_id="dev-a"), KEY_A), body),
            "hash_mismatch",
        ),
    }


def _with_body(built: Built, body: bytes, **headers: Any) -> Built:
    old_headers, _, update_id = built
    return edit_fields(old_headers, **headers), body, update_id


@pytest.mark.parametrize("kind", BACKENDS)
async def test_unauthenticated_updates_are_dead_lettered_and_change_nothing(
    kind: str, job_id: str
) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1, require_signatures=True) as backends:
        # Arrange
        await _registered(backends)
        cases = _refused(job_id)
        expected = {}
        for name, (built, reason) in cases.items():
            expected[await _publish(backends, built)] = (name, reason)
        # Act
        aggregator = await drain(backends)
        # Assert: each one dead-lettered with its reason; the model is still version 0
        dead = await backends.broker.drain_dead_letters(job_id)
        got = {
            letter.message_id: (expected[letter.message_id][0], letter.reason) for letter in dead
        }
        assert got == expected
        assert await backends.store.current_version() == 0
        assert await backends.store.applied_count() == 0
        model = decode((await backends.store.get_model(0)) or b"")
        torch.testing.assert_close(model["w"], INITIAL["w"])
        assert sum(aggregator.stats.rejected.values()) == len(cases)
        counts = await backends.store.rejection_counts()
        assert counts["bad_signature"] == 4
        assert counts["unknown_device"] == 2


@pytest.mark.parametrize("kind", BACKENDS)
async def test_revocation_applies_from_the_next_update(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1, require_signatures=True) as backends:
        # Arrange: one update applied, then the device is revoked and sends another
        await _registered(backends)
        await _publish(backends, signed(update(job_id, delta(1.0), device_id="dev-a"), KEY_A))
        await drain(backends)
        assert await backends.store.revoke_device("dev-a")
        late = await _publish(
            backends, signed(update(job_id, delta(1.0), device_id="dev-a", base_version=1), KEY_A)
        )
        # Act
        await drain(backends)
        # Assert
        assert await backends.store.current_version() == 1
        dead = await backends.broker.drain_dead_letters(job_id)
        assert [(d.message_id, d.reason) for d in dead] == [(late, "unknown_device")]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_old_updates_are_refused_as_replays_and_duplicates_still_skipped(
    kind: str, job_id: str
) -> None:
    options = {"require_signatures": True, "max_update_age_seconds": 60.0}
    async with job_backends(kind, job_id, FEDBUFF_1, **options) as backends:
        # Arrange: a fresh update (applied twice over), and a validly signed one 2 minutes old
        await _registered(backends)
        fresh = signed(update(job_id, delta(1.0), device_id="dev-a"), KEY_A)
        old = signed(
            update(job_id, delta(3.0), device_id="dev-a", sent_at=time.time() - 120), KEY_A
        )
        await _publish(backends, fresh)
        await _publish(backends, fresh)
        replayed = await _publish(backends, old)
        # Act
        aggregator = await drain(backends)
        # Assert
        assert await backends.store.current_version() == 1
        assert aggregator.stats.duplicates == 1
        dead = await backends.broker.drain_dead_letters(job_id)
        assert [(d.message_id, d.reason) for d in dead] == [(replayed, "replayed")]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_without_the_option_unsigned_updates_still_count(kind: str, job_id: str) -> None:
    async with job_backends(kind, job_id, FEDBUFF_1) as backends:
        await _publish(backends, update(job_id, delta(1.0), device_id="dev-nobody"))
        await drain(backends)
        assert await backends.store.current_version() == 1


async def test_an_agent_with_a_key_file_signs_what_it_sends() -> None:
    # Arrange: a job that requires signatures, device dev-a registered, dev-b not
    broker, store = MemoryBroker(), MemoryModelStore(MemoryStoreHub(), "signed-agents")
    config, model, meta = initial_job(
        "signed-agents",
        "digits-mlp",
        FEDBUFF_1,
        TrainingConfig(num_devices=4, local_epochs=1),
        require_signatures=True,
    )
    await create_job(store, broker, config, model, meta)
    await store.register_device("dev-a", PUBLIC_A)
    for device_id in ("dev-a", "dev-b"):
        agent = DeviceAgent(
            device_id=device_id, broker=broker, store=store, updates=1, signing_key=KEY_A
        )
        # Act
        async with agent:
            await agent.run()
    backends = Backends(broker=broker, store=store, config=config)
    await drain(backends)
    # Assert: dev-a's update is in version 1; dev-b signed with a key that is not its own
    assert await store.current_version() == 1
    meta_1 = await store.get_meta(1)
    assert meta_1 is not None
    assert meta_1.devices == ["dev-a"]
    assert [d.reason for d in await broker.drain_dead_letters("signed-agents")] == [
        "unknown_device"
    ]
