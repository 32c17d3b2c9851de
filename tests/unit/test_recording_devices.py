"""The optional `devices` record of a .fedqlog file: a signed job's registry, read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq.recording import RecordingWriter, read_recording
from fedq.replay_auth import admitted_updates, replayable
from infra.protocols import DeviceRecord
from schemas import JobConfig, UpdateHeader
from schemas.codec import encode, schema_of, sha256_hex
from schemas.signing import generate_key_pair, sign

pytestmark = pytest.mark.unit

MODEL = encode({"w": torch.tensor([1.0, 2.0])})
CONFIG = JobConfig(
    job="rec",
    task="tiny",
    model_schema=schema_of({"w": torch.zeros(2)}),
    created_at=1.0,
    require_signatures=True,
    max_update_age_seconds=60,
)
KEY, PUBLIC = generate_key_pair()
DEVICES = [DeviceRecord("dev-a", PUBLIC, False), DeviceRecord("dev-r", PUBLIC, True)]


def _header(device: str, key: str | None = KEY) -> dict[str, object]:
    body = encode({"w": torch.zeros(2)})
    header = UpdateHeader(
        job="rec",
        update_id="00000000-0000-4000-8000-000000000001",
        device_id=device,
        base_version=0,
        num_samples=1,
        payload_sha256=sha256_hex(body),
        payload_bytes=len(body),
        sent_at=1.0,
    )
    signed = sign(header, key) if key is not None else header
    return signed.model_dump(mode="json", exclude_none=True)


def test_the_registry_round_trips_and_gates_the_replayed_updates(tmp_path: Path) -> None:
    # Arrange: a good update, a revoked device's, an unsigned one, then the registry
    path = tmp_path / "signed.fedqlog"
    with RecordingWriter.create(path, CONFIG, MODEL, {}) as writer:
        for i, headers in enumerate([_header("dev-a"), _header("dev-r"), _header("dev-a", None)]):
            writer.add_update(f"id-{i}", headers, b"", timestamp=None, stream_offset=i)
        writer.add_devices(DEVICES)
    # Act
    recording = read_recording(path)
    admitted = admitted_updates(recording)
    # Assert
    assert recording.error is None and recording.devices == DEVICES
    assert [u.message_id for u in admitted.updates] == ["id-0"]
    assert admitted.refused == {"unknown_device": 1, "unsigned": 1}
    fresh = replayable(CONFIG)
    assert not fresh.require_signatures and fresh.max_update_age_seconds is None


def test_a_damaged_registry_is_reported_not_trusted(tmp_path: Path) -> None:
    # Arrange: a devices record whose entries lack their fields
    path = tmp_path / "bad.fedqlog"
    with RecordingWriter.create(path, CONFIG, MODEL, {}) as writer:
        writer._write({"kind": "devices", "count": 1}, b'[{"device_id": "dev-a"}]')
    # Act
    recording = read_recording(path)
    # Assert
    assert recording.devices == []
    assert recording.error is not None and "corrupt" in str(recording.error)
