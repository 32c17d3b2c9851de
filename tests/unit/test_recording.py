"""The .fedqlog format: round trip, appending, and damaged files reported by record number."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from fedq.recording import (
    RecordingError,
    RecordingWriter,
    decode_value,
    encode_value,
    iter_records,
    read_recording,
)
from fedq.replay import ReplayError, Until, parse_position, until_of
from infra.amqp_broker import LoggedMessage
from schemas import JobConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex

pytestmark = pytest.mark.unit

MODEL = encode({"w": torch.tensor([1.0, 2.0])})
CONFIG = JobConfig(
    job="rec", task="tiny", model_schema=schema_of({"w": torch.zeros(2)}), created_at=1.0
)
HEADERS = {
    "job": "rec",
    "device_id": "dev-0",
    "base_version": 3,
    "sent_at": 1712345678.123456789,
    "train_metrics": {"loss": 0.25},
    "signature": b"\x00\xffraw",
    "list": [1, "two", 3.5],
}


def _write(path: Path, updates: int = 3) -> None:
    with RecordingWriter.create(path, CONFIG, MODEL, {"job": "rec"}) as writer:
        for i in range(updates):
            writer.add_update(
                f"id-{i}", HEADERS, bytes([i]) * (10 + i), timestamp=100.0 + i, stream_offset=i
            )
        writer.add_version(
            VersionMeta(version=1, created_at=2.0, sha256=sha256_hex(b"x"), model_bytes=1)
        )


def test_a_recording_reads_back_exactly_what_was_written(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "run.fedqlog"
    # Act
    _write(path)
    recording = read_recording(path)
    # Assert
    assert recording.error is None
    assert recording.config == CONFIG
    assert recording.initial_model == MODEL
    assert [u.message_id for u in recording.updates] == ["id-0", "id-1", "id-2"]
    assert recording.updates[1].headers == HEADERS
    assert recording.updates[2].body == bytes([2]) * 12
    assert (recording.updates[2].timestamp, recording.updates[2].stream_offset) == (102.0, 2)
    assert [v.version for v in recording.versions] == [1]
    assert path.read_bytes().startswith(b"FEDQLOG 1\n")


def test_header_values_keep_their_types() -> None:
    when = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    value = {"b": b"\x01", "t": when, "f": 0.1, "n": None, "nested": [b"x", {"i": 1}]}
    assert decode_value(encode_value(value)) == value


def test_records_append_to_an_existing_recording(tmp_path: Path) -> None:
    path = tmp_path / "run.fedqlog"
    _write(path, updates=1)
    with RecordingWriter.append_to(path) as writer:
        assert writer.next_index == 4  # job, initial model, one update, one version
        writer.add_update("id-late", HEADERS, b"late", timestamp=None, stream_offset=None)
    recording = read_recording(path)
    assert [u.message_id for u in recording.updates] == ["id-0", "id-late"]
    assert recording.updates[-1].index == 4


def test_creating_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "run.fedqlog"
    _write(path)
    with pytest.raises(FileExistsError):
        _write(path)


@pytest.mark.parametrize("cut_into_last", [1, 3, 6, 40, -2])
def test_a_truncated_recording_names_the_record_and_keeps_the_ones_before(
    tmp_path: Path, cut_into_last: int
) -> None:
    # Arrange: cut inside the last record (the version record, number 5)
    path = tmp_path / "run.fedqlog"
    _write(path)
    last = list(iter_records(path))[-1]
    data = path.read_bytes()
    end = len(data) + cut_into_last if cut_into_last < 0 else last.offset + cut_into_last
    path.write_bytes(data[:end])
    # Act
    recording = read_recording(path)
    # Assert
    assert recording.error is not None
    assert recording.error.index == 5
    assert "record 5" in str(recording.error) and "truncated" in str(recording.error)
    assert len(recording.updates) == 3
    assert recording.versions == []


def test_a_flipped_byte_is_caught_by_the_checksum_of_its_record(tmp_path: Path) -> None:
    path = tmp_path / "run.fedqlog"
    _write(path)
    records = list(iter_records(path))
    data = bytearray(path.read_bytes())
    data[records[5].offset - 5] ^= 0x01  # the last body byte of record 4, before its CRC
    path.write_bytes(bytes(data))
    recording = read_recording(path)
    assert recording.error is not None
    assert recording.error.index == 4
    assert "record 4" in str(recording.error)
    assert [u.message_id for u in recording.updates] == ["id-0", "id-1"]


def test_appending_to_a_damaged_recording_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.fedqlog"
    _write(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(RecordingError, match="record 5"):
        RecordingWriter.append_to(path)


def test_a_file_that_is_not_a_recording_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.fedqlog"
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(RecordingError, match="not a fedq recording"):
        read_recording(path)


def test_positions_parse_as_names_offsets_and_times() -> None:
    assert parse_position("first") == "first"
    assert parse_position("42") == 42
    assert parse_position("2024-05-01T12:00:00+00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert until_of("3") == Until(offset=3)
    with pytest.raises(ReplayError):
        parse_position("yesterday")


def test_until_stops_after_the_offset_or_the_time() -> None:
    message = LoggedMessage(offset=5, message_id="m", timestamp=time.time())
    assert Until(offset=4).passed(message)
    assert not Until(offset=5).passed(message)
    assert Until(timestamp=message.timestamp - 1).passed(message)  # type: ignore[operator]
    assert not Until().passed(message)
