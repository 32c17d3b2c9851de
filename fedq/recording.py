"""The `.fedqlog` file format: one job's config, initial model and update messages.

A recording is a magic line naming the format version, then length-prefixed records, each
a small JSON header, raw body bytes and a CRC32 over both (see docs/fedqlog.md). It is
append-only, so a recorder can add to it, and a reader that meets a corrupt or truncated
record still returns everything before it. Nothing here executes what it reads: bodies are
safetensors bytes or JSON, never pickle.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Self

from infra.protocols import DeviceRecord
from schemas import JobConfig, VersionMeta

MAGIC = b"FEDQLOG"
FORMAT_VERSION = 1
MAGIC_LINE = MAGIC + b" %d\n" % FORMAT_VERSION
# "devices" (a signed job's registry) comes last, so a reader that predates it still gets
# every update and version before stopping there.
KINDS = ("job", "initial_model", "update", "version", "devices")
# A header is a few hundred bytes; a bigger length prefix means a corrupt file, and
# refusing it early avoids allocating whatever a flipped bit asks for.
MAX_HEADER_BYTES = 1 << 20
_U32 = struct.Struct(">I")


class RecordingError(Exception):
    """A recording cannot be read from record `index` on (at byte `offset`)."""

    def __init__(self, index: int, offset: int, message: str) -> None:
        super().__init__(f"record {index} (byte {offset}): {message}")
        self.index = index
        self.offset = offset


@dataclass(frozen=True)
class Record:
    """One record as stored: its position, JSON header and body bytes."""

    index: int
    offset: int
    header: dict[str, Any]
    body: bytes

    @property
    def kind(self) -> str:
        return str(self.header["kind"])


@dataclass(frozen=True)
class RecordedUpdate:
    """One update message as the broker held it."""

    index: int
    message_id: str | None
    headers: dict[str, Any]
    body: bytes
    timestamp: float | None
    stream_offset: int | None


@dataclass
class Recording:
    """Everything readable from one file; `error` says where reading stopped early."""

    config: JobConfig
    initial_model: bytes
    source: dict[str, Any]
    updates: list[RecordedUpdate] = field(default_factory=list)
    versions: list[VersionMeta] = field(default_factory=list)
    devices: list[DeviceRecord] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    error: RecordingError | None = None


def encode_value(value: Any) -> Any:
    """Turn an AMQP header value into JSON; bytes and times become tagged objects."""
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {"$time": value.timestamp()}
    if isinstance(value, Mapping):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise ValueError(f"header value {value!r} has no JSON form in a recording")


def decode_value(value: Any) -> Any:
    """Undo `encode_value`."""
    if isinstance(value, dict):
        if value.keys() == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        if value.keys() == {"$time"}:
            return datetime.fromtimestamp(value["$time"], UTC)
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def _frame(header: Mapping[str, Any], body: bytes) -> bytes:
    encoded = json.dumps(
        {**header, "body_bytes": len(body)}, sort_keys=True, allow_nan=False
    ).encode("utf-8")
    crc = zlib.crc32(body, zlib.crc32(encoded))
    return _U32.pack(len(encoded)) + encoded + body + _U32.pack(crc)


class RecordingWriter:
    """Append records to a `.fedqlog` file; use `create` or `append_to`, then `close`."""

    def __init__(self, file: BinaryIO, next_index: int) -> None:
        self._file = file
        self.next_index = next_index

    @classmethod
    def create(
        cls, path: Path, config: JobConfig, initial_model: bytes, source: Mapping[str, Any]
    ) -> Self:
        """Start a new file with the job and initial model records (refuse to overwrite)."""
        file = path.open("xb")
        writer = cls(file, 0)
        file.write(MAGIC_LINE)
        writer._write(
            {"kind": "job", "format_version": FORMAT_VERSION, "source": dict(source)},
            config.model_dump_json().encode("utf-8"),
        )
        writer._write({"kind": "initial_model", "encoding": "safetensors"}, initial_model)
        return writer

    @classmethod
    def append_to(cls, path: Path) -> Self:
        """Open an intact file to add records at its end (RecordingError if it is damaged)."""
        count = 0
        for _ in iter_records(path):
            count += 1
        return cls(path.open("ab"), count)

    def add_update(
        self,
        message_id: str | None,
        headers: Mapping[str, Any],
        body: bytes,
        *,
        timestamp: float | None,
        stream_offset: int | None,
    ) -> None:
        """Append one update message."""
        header = {
            "kind": "update",
            "message_id": message_id,
            "headers": encode_value(headers),
            "timestamp": timestamp,
            "stream_offset": stream_offset,
        }
        self._write(header, body)

    def add_version(self, meta: VersionMeta) -> None:
        """Append the metadata of a version the original run committed (for checks)."""
        self._write({"kind": "version", "version": meta.version}, meta.model_dump_json().encode())

    def add_devices(self, devices: Sequence[DeviceRecord]) -> None:
        """Append the job's device registry: public keys and revocations, nothing secret."""
        entries = [
            {"device_id": d.device_id, "public_key": d.public_key, "revoked": d.revoked}
            for d in devices
        ]
        self._write({"kind": "devices", "count": len(entries)}, json.dumps(entries).encode())

    def _write(self, header: Mapping[str, Any], body: bytes) -> None:
        self._file.write(_frame(header, body))
        self.next_index += 1

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_exact(file: BinaryIO, size: int, index: int, offset: int, what: str) -> bytes:
    data = file.read(size)
    if len(data) < size:
        raise RecordingError(
            index, offset, f"truncated: the file ends {len(data)} of {size} bytes into its {what}"
        )
    return data


def _read_record(file: BinaryIO, index: int, offset: int) -> Record | None:
    prefix = file.read(_U32.size)
    if not prefix:
        return None
    if len(prefix) < _U32.size:
        raise RecordingError(index, offset, "truncated: the file ends inside its length prefix")
    (header_size,) = _U32.unpack(prefix)
    if header_size > MAX_HEADER_BYTES:
        raise RecordingError(index, offset, f"corrupt: header length {header_size} is implausible")
    raw = _read_exact(file, header_size, index, offset, "header")
    try:
        header = json.loads(raw)
        body_size = header["body_bytes"]
        kind = header["kind"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordingError(
            index, offset, f"corrupt: header is not a record header ({exc})"
        ) from None
    if not isinstance(body_size, int) or body_size < 0 or kind not in KINDS:
        raise RecordingError(index, offset, f"corrupt: bad body length or kind {kind!r}")
    body = _read_exact(file, body_size, index, offset, "body")
    (stored,) = _U32.unpack(_read_exact(file, _U32.size, index, offset, "checksum"))
    if zlib.crc32(body, zlib.crc32(raw)) != stored:
        raise RecordingError(index, offset, "corrupt: CRC32 checksum mismatch")
    return Record(index, offset, header, body)


def iter_records(path: Path) -> Iterator[Record]:
    """Yield a file's records in order; raise RecordingError at the first damaged one."""
    with path.open("rb") as file:
        magic = file.readline(64)
        name, _, version = magic.rstrip(b"\n").partition(b" ")
        if name != MAGIC or not magic.endswith(b"\n"):
            raise RecordingError(0, 0, f"{path} is not a fedq recording (no {MAGIC!r} line)")
        if version != b"%d" % FORMAT_VERSION:
            raise RecordingError(0, 0, f"format version {version!r} is not supported (1 is)")
        index, offset = 0, file.tell()
        while (record := _read_record(file, index, offset)) is not None:
            yield record
            index, offset = index + 1, file.tell()


def _update_of(record: Record) -> RecordedUpdate:
    header = record.header
    headers = decode_value(header.get("headers") or {})
    if not isinstance(headers, dict):
        raise RecordingError(record.index, record.offset, "corrupt: headers are not an object")
    return RecordedUpdate(
        index=record.index,
        message_id=header.get("message_id"),
        headers=headers,
        body=record.body,
        timestamp=header.get("timestamp"),
        stream_offset=header.get("stream_offset"),
    )


def _devices_of(record: Record) -> list[DeviceRecord]:
    entries = json.loads(record.body)
    try:
        return [
            DeviceRecord(str(e["device_id"]), str(e["public_key"]), e["revoked"] is True)
            for e in entries
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a device entry is not an object with its fields ({exc})") from None


def _apply(recording: Recording, record: Record) -> None:
    if record.kind == "update":
        recording.updates.append(_update_of(record))
    elif record.kind == "version":
        recording.versions.append(VersionMeta.model_validate_json(record.body))
    elif record.kind == "devices" and not recording.devices:
        recording.devices = _devices_of(record)
    else:
        raise RecordingError(record.index, record.offset, f"a second {record.kind} record")


def read_recording(path: Path) -> Recording:
    """Read a whole file; stop at the first damaged record and say so in `error`.

    Raise RecordingError only if not even the job and initial model records are readable.
    """
    records = iter_records(path)
    first = next(records, None)
    second = next(records, None)
    if first is None or first.kind != "job" or second is None or second.kind != "initial_model":
        raise RecordingError(0, 0, "the file does not start with job and initial_model records")
    try:
        config = JobConfig.model_validate_json(first.body)
    except ValueError as exc:
        raise RecordingError(0, first.offset, f"the job config is invalid: {exc}") from None
    recording = Recording(config, second.body, dict(first.header.get("source") or {}))
    recording.records.extend([first, second])
    try:
        for record in records:
            try:
                _apply(recording, record)
            except ValueError as exc:
                # A version record whose JSON does not validate: the file is damaged there.
                reason = str(exc).splitlines()[0]
                raise RecordingError(record.index, record.offset, f"corrupt: {reason}") from None
            recording.records.append(record)
    except RecordingError as exc:
        recording.error = exc
    return recording
