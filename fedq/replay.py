"""Record a job's log stream into a `.fedqlog` file, and replay one into a fresh job.

Replay republishes the recorded update messages, same ids and order, only the `job` header
rewritten, and folds them with a drain-mode Aggregator: on the real broker and store, or
directly on the in-process ones. Same order, same strategy and same initial model give the
same model bytes version after version, which `check_versions` verifies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from aggregator.service import Aggregator, AggregatorStats
from device_agent.tasks import TASKS
from fedq.jobs import initial_job
from fedq.recording import RecordedUpdate, Recording, RecordingWriter
from fedq.replay_auth import admitted_updates, copy_registry, replayable
from infra.amqp_broker import LoggedMessage, StreamStart
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.protocols import Broker, ModelStore
from schemas import JobConfig, StrategyConfig, VersionMeta
from schemas.codec import sha256_hex
from schemas.wire import update_fields, with_fields

log = logging.getLogger(__name__)
# How often replay checks whether the aggregator has received everything published.
_POLL_SECONDS = 0.02


class LogReader(Protocol):
    """A broker that can read a job's log stream back (both AmqpBroker and MemoryBroker)."""

    def read_log(
        self, job: str, *, start: StreamStart = "first", idle_timeout: float = 2.0
    ) -> AsyncIterator[LoggedMessage]: ...


class ReplayError(Exception):
    """A recording cannot be recorded or replayed as asked."""


@dataclass(frozen=True)
class Until:
    """Where recording stops: after a stream offset, or after a publish time."""

    offset: int | None = None
    timestamp: float | None = None

    def passed(self, message: LoggedMessage) -> bool:
        if self.offset is not None and message.offset > self.offset:
            return True
        stamp = message.timestamp
        return self.timestamp is not None and stamp is not None and stamp > self.timestamp


def parse_position(value: str) -> StreamStart:
    """Parse `first`, `last`, `next`, a stream offset, or an ISO-8601 / epoch timestamp."""
    if value in ("first", "last", "next"):
        return value
    if value.isdigit():
        return int(value)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(float(value)).astimezone()
    except ValueError:
        raise ReplayError(f"{value!r} is not first, last, next, an offset or a time") from None


def until_of(value: str | None) -> Until:
    """Turn an --until value into a stop condition."""
    if value is None:
        return Until()
    position = parse_position(value)
    if isinstance(position, int):
        return Until(offset=position)
    if isinstance(position, datetime):
        return Until(timestamp=position.timestamp())
    raise ReplayError(f"--until takes an offset or a time, not {value!r}")


@dataclass
class RecordSummary:
    """What `record_job` wrote."""

    updates: int = 0
    versions: int = 0
    bytes: int = 0
    blob_updates: int = 0


async def _initial_model(store: ModelStore, config: JobConfig) -> bytes:
    """Return version 0's bytes; rebuild them from the task's seed once Redis has pruned them."""
    meta = await store.get_meta(0)
    model = await store.get_model(0)
    if model is not None:
        # A big model arrives as a bytearray; bytes() of bytes is the same object, no copy.
        return bytes(model)
    if meta is not None and config.task in TASKS:
        _, rebuilt, _ = initial_job(config.job, config.task, config.strategy, config.training)
        if sha256_hex(rebuilt) == meta.sha256:
            return rebuilt
    raise ReplayError(f"version 0 of job {config.job} is no longer stored and cannot be rebuilt")


async def _record_versions(store: ModelStore, writer: RecordingWriter, recorded: set[str]) -> int:
    """Append the original run's versions made only of recorded updates, in order."""
    count = 0
    current = await store.current_version()
    for version in range(1, current + 1):
        meta = await store.get_meta(version)
        if meta is None or not set(meta.contributors) <= recorded:
            break
        writer.add_version(meta)
        count += 1
    return count


async def record_job(
    broker: LogReader,
    store: ModelStore,
    out: Path,
    *,
    start: StreamStart = "first",
    until: Until | None = None,
    idle_timeout: float = 2.0,
) -> RecordSummary:
    """Write the job's config, initial model and log stream (from `start`) to a new file."""
    config = await store.get_config()
    model = await _initial_model(store, config)
    source = {"job": config.job, "start": str(start), "recorded_at": time.time()}
    summary = RecordSummary()
    writer = RecordingWriter.create(out, config, model, source)
    try:
        with writer:
            await _copy_stream(
                broker, store, writer, summary, start, until or Until(), idle_timeout
            )
            devices = await store.list_devices()
            if devices:
                # A signed job's replay checks the signatures against this registry.
                writer.add_devices(devices)
    except BaseException:
        # A half-written recording would look like a short run: leave no file instead.
        out.unlink(missing_ok=True)  # noqa: ASYNC240 - one small local call, on failure only
        raise
    return summary


async def _copy_stream(
    broker: LogReader,
    store: ModelStore,
    writer: RecordingWriter,
    summary: RecordSummary,
    start: StreamStart,
    stop: Until,
    idle_timeout: float,
) -> None:
    """Append the stream's updates from `start`, then the versions they made."""
    recorded: set[str] = set()
    async for message in broker.read_log(store.job, start=start, idle_timeout=idle_timeout):
        if stop.passed(message):
            break
        if update_fields(message.headers).get("payload") == "blob":
            # The claim-check bytes live in Redis only until their version commits.
            summary.blob_updates += 1
        writer.add_update(
            message.message_id,
            message.headers,
            message.body,
            timestamp=_sent_at(message),
            stream_offset=message.offset,
        )
        summary.updates += 1
        summary.bytes += len(message.body)
        if message.message_id is not None:
            recorded.add(message.message_id)
    # Versions only reproduce from version 0 when the log is read from its start.
    if start == "first":
        summary.versions = await _record_versions(store, writer, recorded)


def _sent_at(message: LoggedMessage) -> float | None:
    """When the device sent the update: its `sent_at` header, finer than AMQP's seconds."""
    sent_at = update_fields(message.headers).get("sent_at")
    return float(sent_at) if isinstance(sent_at, int | float) else message.timestamp


def replay_config(
    recording: Recording, job: str, strategy: StrategyConfig | None = None
) -> JobConfig:
    """Return the recorded config for a fresh job, with the strategy overridden if given."""
    data: dict[str, Any] = json.loads(recording.config.model_dump_json())
    # The replayer republishes every update as its own broker user: the devices' users were
    # checked when the updates were first folded, and cannot be checked again here.
    data.update(job=job, created_at=time.time(), bind_device_users=False)
    if strategy is not None:
        data["strategy"] = json.loads(strategy.model_dump_json())
    return JobConfig.model_validate_json(json.dumps(data))


@dataclass
class ReplayResult:
    """What a replay produced, and what the recording says the original run produced."""

    job: str
    counterfactual: bool
    published: int
    versions: list[VersionMeta]
    expected: list[VersionMeta]
    stats: AggregatorStats = field(default_factory=AggregatorStats)
    # Updates not republished because the original job refused their signature, by reason.
    refused: dict[str, int] = field(default_factory=dict)

    def mismatch(self) -> str | None:
        """Say where the versions differ from the recorded ones (None when they agree)."""
        for meta, original in zip(self.versions, self.expected, strict=False):
            if meta.sha256 != original.sha256:
                return (
                    f"version {meta.version} has sha256 {meta.sha256[:12]}, "
                    f"the recording {original.sha256[:12]}"
                )
        if len(self.versions) < len(self.expected):
            return f"{len(self.versions)} versions, the recording has {len(self.expected)}"
        return None


async def _publish_all(
    updates: Sequence[RecordedUpdate], broker: Broker, job: str, speed: float | None
) -> int:
    """Republish the recorded updates to `job`, paced by `speed` x original timing if given."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    first: float | None = None
    for update in updates:
        if speed is not None and update.timestamp is not None:
            first = update.timestamp if first is None else first
            delay = (update.timestamp - first) / speed - (loop.time() - began)
            if delay > 0:
                await asyncio.sleep(delay)
        headers = with_fields(update.headers, job=job)
        await broker.publish_raw(job, update.body, headers=headers, message_id=update.message_id)
    return len(updates)


async def _until_received(aggregator: Aggregator, task: asyncio.Task[Any], count: int) -> None:
    """Wait until the aggregator has handled `count` deliveries (or has ended)."""
    # Polling: the aggregator exposes counters, not an event per delivery.
    while not task.done() and aggregator.stats.received < count:  # noqa: ASYNC110
        await asyncio.sleep(_POLL_SECONDS)


async def replay_recording(
    recording: Recording,
    broker: Broker,
    store: ModelStore,
    *,
    strategy: StrategyConfig | None = None,
    speed: float | None = None,
    timeout: float = 300.0,
) -> ReplayResult:
    """Create `store.job` from the recording, republish its updates and aggregate them."""
    job = store.job
    admitted = admitted_updates(recording)
    config = replayable(replay_config(recording, job, strategy))
    model = recording.initial_model
    meta = VersionMeta(
        version=0, created_at=time.time(), sha256=sha256_hex(model), model_bytes=len(model)
    )
    # With its own log stream, a replay can be recorded in turn.
    await broker.declare_job(job, log_stream=True)
    await store.create_job(config, model, meta)
    await copy_registry(recording.devices, store)
    async with Aggregator(job=job, broker=broker, store=store, retry_seconds=0.2) as aggregator:
        task = asyncio.create_task(aggregator.run())
        try:
            async with asyncio.timeout(timeout):
                published = await _publish_all(admitted.updates, broker, job, speed)
                await _until_received(aggregator, task, published)
        finally:
            aggregator.stop()
            stats = await task
    versions = await _versions(store)
    counterfactual = strategy is not None and strategy != recording.config.strategy
    expected = [] if counterfactual else recording.versions
    return ReplayResult(job, counterfactual, published, versions, expected, stats, admitted.refused)


async def _versions(store: ModelStore) -> list[VersionMeta]:
    metas = []
    for version in range(1, await store.current_version() + 1):
        meta = await store.get_meta(version)
        if meta is not None:
            metas.append(meta)
    return metas


async def replay_direct(
    recording: Recording,
    *,
    job: str = "replay",
    strategy: StrategyConfig | None = None,
    speed: float | None = None,
) -> ReplayResult:
    """Replay into the in-process broker and store: no RabbitMQ, no Redis."""
    broker = MemoryBroker()
    store = MemoryModelStore(MemoryStoreHub(), job)
    return await replay_recording(recording, broker, store, strategy=strategy, speed=speed)


def sha256_sequence(versions: Sequence[VersionMeta]) -> list[str]:
    """The model hashes of a list of versions, in order."""
    return [meta.sha256 for meta in versions]
