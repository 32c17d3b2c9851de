"""The `fedq record`, `fedq replay` and `fedq inspect` commands (see docs/fedqlog.md)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from fedq import options as opt
from fedq.console import Explanations, fail, run_command
from fedq.recording import Recording, RecordingError, read_recording
from fedq.replay import (
    ReplayError,
    ReplayResult,
    parse_position,
    record_job,
    replay_direct,
    replay_recording,
    until_of,
)
from infra.amqp_broker import AmqpBroker
from infra.errors import BackendUnavailable, JobExists, JobNotFound, PublishError
from infra.redis_store import RedisModelStore
from infra.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from schemas import StrategyConfig
from schemas.wire import update_fields

T = TypeVar("T")

Recording_ = Annotated[
    Path, typer.Argument(help="A .fedqlog recording.", exists=True, dir_okay=False)
]


_EXPLANATIONS: Explanations = {
    JobNotFound: lambda e: f"job not found ({e})",
    JobExists: lambda e: f"job {e} exists already: replay into a fresh job id",
    ReplayError: str,
    RecordingError: str,
    PublishError: str,
    BackendUnavailable: lambda e: f"cannot reach RabbitMQ or Redis: {e}",
    FileExistsError: lambda e: f"{e.filename} exists already: choose another --out",
}


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return run_command(coroutine, _EXPLANATIONS)


def _read(path: Path, partial: bool) -> Recording:
    try:
        recording = read_recording(path)
    except (RecordingError, OSError) as exc:
        raise fail(f"{path}: {exc}") from None
    if recording.error is not None and not partial:
        raise fail(f"{path}: {recording.error} (pass --partial to use the records before it)")
    return recording


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        factor = float(value.removesuffix("x"))
    except ValueError:
        raise typer.BadParameter("use max, 1x, 2x, 0.5x, ...") from None
    if factor <= 0:
        raise typer.BadParameter("the speed must be above 0x")
    return factor


def record(
    job: opt.Job,
    out: Annotated[Path, typer.Option(help="The .fedqlog file to write (must not exist).")],
    start: Annotated[
        str,
        typer.Option("--from", help="first, last, next, a stream offset, or an ISO-8601 time."),
    ] = "first",
    until: Annotated[
        str | None, typer.Option(help="Stop after this stream offset or ISO-8601 time.")
    ] = None,
    idle: Annotated[
        float, typer.Option(min=0.1, help="Seconds without a message that mean caught up.")
    ] = 2.0,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Record a job's log stream, config and initial model into one portable file."""
    try:
        position, stop = parse_position(start), until_of(until)
    except ReplayError as exc:
        raise fail(str(exc)) from None

    async def go() -> Any:
        broker = await AmqpBroker.connect(amqp_url)
        store = RedisModelStore.from_url(redis_url, job)
        try:
            return await record_job(
                broker, store, out, start=position, until=stop, idle_timeout=idle
            )
        finally:
            await store.close()
            await broker.close()

    summary = _run(go())
    typer.echo(
        f"recorded {summary.updates} updates ({summary.bytes} bytes) and {summary.versions} "
        f"versions of job {job} to {out}"
    )
    if summary.blob_updates:
        typer.echo(f"warning: {summary.blob_updates} updates carry claim-check payloads, not kept")


def _print_result(result: ReplayResult) -> None:
    label = "counterfactual replay" if result.counterfactual else "replay"
    typer.echo(f"{label} into job {result.job}: {result.published} updates published")
    if result.refused:
        held = ", ".join(f"{count} {reason}" for reason, count in sorted(result.refused.items()))
        typer.echo(f"  held back, as the original job refused their signature: {held}")
    expected = {meta.version: meta.sha256 for meta in result.expected}
    for meta in result.versions:
        original = expected.get(meta.version)
        verdict = (
            ""
            if original is None
            else ("  = original" if original == meta.sha256 else "  != original")
        )
        typer.echo(
            f"  v{meta.version} sha256 {meta.sha256[:16]} from {len(meta.contributors)} updates "
            f"staleness {meta.staleness}{verdict}"
        )


def replay(
    path: Recording_,
    job: opt.Job,
    strategy: Annotated[
        opt.StrategyName | None,
        typer.Option(help="Fold with another strategy (a counterfactual replay)."),
    ] = None,
    buffer_size: Annotated[
        int | None, typer.Option(min=1, help="With --strategy: its buffer size.")
    ] = None,
    speed: Annotated[
        str, typer.Option(help="max (as fast as possible) or 1x, 2x, ... the original timing.")
    ] = "max",
    direct: Annotated[
        bool, typer.Option(help="Replay in process, on the in-memory broker and store.")
    ] = False,
    partial: Annotated[
        bool, typer.Option(help="Replay the records before a damaged one instead of failing.")
    ] = False,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Replay a recording into a fresh job and check the versions against the original run."""
    recording = _read(path, partial)
    pace = _speed(speed)
    override = None
    if strategy is not None:
        # Everything but the name (and buffer size, if given) stays as recorded.
        fields = json.loads(recording.config.strategy.model_dump_json())
        fields.update(name=strategy, buffer_size=buffer_size or fields["buffer_size"])
        try:
            override = StrategyConfig.model_validate_json(json.dumps(fields))
        except ValidationError as exc:
            raise fail(str(exc).splitlines()[-1].strip()) from None

    async def go() -> ReplayResult:
        if direct:
            return await replay_direct(recording, job=job, strategy=override, speed=pace)
        broker = await AmqpBroker.connect(amqp_url)
        store = RedisModelStore.from_url(redis_url, job)
        try:
            return await replay_recording(recording, broker, store, strategy=override, speed=pace)
        finally:
            await store.close()
            await broker.close()

    result = _run(go())
    _print_result(result)
    problem = result.mismatch()
    if problem is not None:
        raise fail(f"the replay differs from the recorded run: {problem}")


def _when(stamp: float | None) -> str:
    return (
        "?"
        if stamp is None
        else datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
    )


def _summary(recording: Recording) -> list[str]:
    updates = recording.updates
    config = recording.config
    devices = Counter(str(update_fields(u.headers).get("device_id", "?")) for u in updates)
    sizes = [len(u.body) for u in updates]
    stamps = [u.timestamp for u in updates if u.timestamp is not None]
    staleness = [tau for meta in recording.versions for tau in meta.staleness]
    lines = [
        f"job {config.job}: task {config.task}, strategy {config.strategy.name} "
        f"(buffer {config.strategy.buffer_size}), recorded from {recording.source.get('start')}",
        f"initial model: {len(recording.initial_model)} bytes",
        f"updates: {len(updates)} from {len(devices)} devices ("
        + ", ".join(f"{d}: {n}" for d, n in sorted(devices.items()))
        + ")",
    ]
    if sizes:
        lines.append(
            f"sizes: {sum(sizes)} bytes in all, min {min(sizes)}, "
            f"mean {statistics.fmean(sizes):.0f}, max {max(sizes)}"
        )
    if stamps:
        lines.append(
            f"time span: {_when(min(stamps))} .. {_when(max(stamps))} "
            f"({max(stamps) - min(stamps):.2f} s)"
        )
    if staleness:
        histogram = ", ".join(f"{tau}: {n}" for tau, n in sorted(Counter(staleness).items()))
        lines.append(f"staleness of applied updates (tau: count): {histogram}")
    else:
        bases = Counter(update_fields(u.headers).get("base_version") for u in updates)
        lines.append(f"base versions (no versions recorded): {dict(sorted(bases.items()))}")
    lines.append(f"versions recorded: {len(recording.versions)}")
    return lines


def _record_line(recording: Recording, index: int) -> str:
    record = recording.records[index]
    if record.kind != "update":
        return f"{index:5d} {record.kind:13s} {len(record.body):8d} bytes"
    header = record.header
    headers = update_fields(header.get("headers") or {})
    return (
        f"{index:5d} update {len(record.body):15d} bytes  offset {header.get('stream_offset')}"
        f"  {header.get('message_id')}  device {headers.get('device_id')}"
        f"  base v{headers.get('base_version')}  {_when(header.get('timestamp'))}"
    )


def inspect(
    path: Recording_,
    records: Annotated[bool, typer.Option(help="Also print one line per record.")] = False,
) -> None:
    """Summarize a recording: devices, updates, staleness, sizes and time span."""
    recording = _read(path, partial=True)
    for line in _summary(recording):
        typer.echo(line)
    if records:
        for index in range(len(recording.records)):
            typer.echo(_record_line(recording, index))
    if recording.error is not None:
        raise fail(
            f"{path}: {recording.error}; the {len(recording.records)} records before it are intact"
        )


def register(app: typer.Typer) -> None:
    """Add the record, replay and inspect commands to the `fedq` app."""
    app.command()(record)
    app.command()(replay)
    app.command()(inspect)
