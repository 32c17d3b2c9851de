"""Record a `--require-signatures` run and replay it into a fresh job: same versions come out.

The recording carries the job's device registry (public keys and revocations); replay copies
it into the new job and checks every update's signature against it, as the original job
did, before republishing; a forged update stays out of the replay as it stayed out of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aggregator.service import Aggregator
from fedq.cli import app
from fedq.recording import RecordingWriter, read_recording
from fedq.replay import record_job, replay_direct, replay_recording, sha256_sequence
from infra.amqp_broker import AmqpBroker
from infra.protocols import DeviceRecord
from infra.redis_store import RedisModelStore
from schemas import JobConfig, StalenessConfig, StrategyConfig, UpdateHeader
from schemas.codec import encode, schema_of
from schemas.signing import generate_key_pair, sign
from schemas.wire import UPDATE_HEADER, update_fields
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import INITIAL, delta, job_backends, update

pytestmark = pytest.mark.integration
FEDBUFF_2 = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=10, staleness=StalenessConfig(name="constant")
)
Built = tuple[dict[str, Any], bytes, str]
KEY_A, PUBLIC_A = generate_key_pair()
KEY_B, PUBLIC_B = generate_key_pair()
KEY_R, PUBLIC_R = generate_key_pair()


def _signed(job: str, device: str, key: str, value: float, **after: Any) -> Built:
    headers, body, update_id = update(job, delta(value, -value), device_id=device)
    wire = sign(UpdateHeader.model_validate(update_fields(headers)), key).model_dump(
        mode="json", exclude_none=True
    )
    return {UPDATE_HEADER: json.dumps({**wire, **after})}, body, update_id


async def test_a_signed_run_replays_with_its_device_registry(job_id: str, tmp_path: Path) -> None:
    # Arrange: a signed job, three devices (one revoked), good updates and refused ones
    out = tmp_path / "signed.fedqlog"
    async with job_backends(
        "real", job_id, FEDBUFF_2, require_signatures=True, max_update_age_seconds=600
    ) as backends:
        assert isinstance(backends.broker, AmqpBroker)
        await backends.broker.declare_job(job_id, log_stream=True)
        for device, public in (("dev-a", PUBLIC_A), ("dev-b", PUBLIC_B), ("dev-r", PUBLIC_R)):
            await backends.store.register_device(device, public)
        assert await backends.store.revoke_device("dev-r")
        messages = [
            _signed(job_id, "dev-a", KEY_A, 0.1),
            _signed(job_id, "dev-b", KEY_A, 9.0),  # impersonation: bad_signature
            _signed(job_id, "dev-b", KEY_B, 0.2),
            _signed(job_id, "dev-r", KEY_R, 9.0),  # revoked: unknown_device
            _signed(job_id, "dev-a", KEY_A, 0.3, num_samples=99),  # tampered: bad_signature
            _signed(job_id, "dev-a", KEY_A, 0.4),
            _signed(job_id, "dev-b", KEY_B, 0.5),
            update(job_id, delta(9.0), device_id="dev-a"),  # unsigned
        ]
        for headers, body, update_id in messages:
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        async with Aggregator(
            job=job_id, broker=backends.broker, store=backends.store, idle_timeout=0.5
        ) as aggregator:
            await aggregator.run()
        original = [await backends.store.get_meta(v) for v in range(1, aggregator.version + 1)]
        # Act: record the run, then replay the file into fresh jobs (real services, in memory)
        summary = await record_job(backends.broker, backends.store, out, idle_timeout=0.5)
    recording = read_recording(out)
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, f"{job_id}-r")
    try:
        result = await replay_recording(recording, broker, store)
        copied = await store.list_devices()
    finally:
        await store.delete_job()
        await broker.delete_job(store.job)
        await store.close()
        await broker.close()
    direct = await replay_direct(recording)
    # Assert: the original folded the four good updates into two versions, the replays too
    hashes = [meta.sha256 for meta in original if meta is not None]
    assert len(hashes) == 2 and summary.updates == len(messages)
    assert aggregator.stats.applied == 4 and sum(aggregator.stats.rejected.values()) == 4
    assert recording.error is None
    for replayed in (result, direct):
        assert replayed.mismatch() is None, replayed.mismatch()
        assert sha256_sequence(replayed.versions) == hashes
        assert replayed.refused == {"bad_signature": 2, "unknown_device": 1, "unsigned": 1}
    assert {(d.device_id, d.revoked) for d in recording.devices} == {
        ("dev-a", False),
        ("dev-b", False),
        ("dev-r", True),
    }
    assert sorted((d.device_id, d.public_key, d.revoked) for d in copied) == sorted(
        (d.device_id, d.public_key, d.revoked) for d in recording.devices
    )
    assert [m.contributors for m in result.versions] == [m.contributors for m in original if m]


def test_the_cli_says_what_a_signed_replay_held_back(tmp_path: Path) -> None:
    # Arrange: a hand-written recording of a signed job: one good update, one forged
    path = tmp_path / "signed.fedqlog"
    config = JobConfig(
        job="signed",
        task="tiny",
        strategy=FEDBUFF_2,
        model_schema=schema_of(INITIAL),
        created_at=1.0,
        require_signatures=True,
    )
    with RecordingWriter.create(path, config, encode(INITIAL), {"job": "signed"}) as writer:
        for headers, body, update_id in (
            _signed("signed", "dev-a", KEY_A, 0.1),
            _signed("signed", "dev-a", KEY_B, 0.2),
        ):
            writer.add_update(update_id, headers, body, timestamp=None, stream_offset=None)
        writer.add_devices([DeviceRecord("dev-a", PUBLIC_A, False)])
    # Act
    replayed = CliRunner().invoke(app, ["replay", str(path), "--job", "cli-signed", "--direct"])
    # Assert
    assert replayed.exit_code == 0, replayed.output
    assert "1 updates published" in replayed.output
    assert "held back, as the original job refused their signature: 1 bad_signature" in (
        replayed.output
    )
