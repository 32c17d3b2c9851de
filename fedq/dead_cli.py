"""The `fedq dead` commands: list, requeue and purge a job's dead-lettered updates."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer

from fedq import options as opt
from fedq.console import Explanations, run_command
from infra.amqp_broker import AmqpBroker
from infra.dead_letters import Action, Decide, keep_all, matching, rework_dead_letters
from infra.errors import BackendUnavailable, JobNotFound, PublishError
from infra.protocols import DeadLetter
from infra.settings import DEFAULT_AMQP_URL
from schemas.wire import update_fields

T = TypeVar("T")

dead_app = typer.Typer(
    help=(
        "Inspect and handle a job's dead-lettered updates (queue fedq.dead.JOB).\n\n"
        "The aggregator dead-letters updates it cannot use, with a reason such as "
        "hash_mismatch or too_stale; RabbitMQ dead-letters those past the delivery limit "
        "(reason delivery_limit). Listing leaves them all in place."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

Reason = Annotated[
    str | None,
    typer.Option(help="Only the letters with this reason (e.g. too_stale); default: all."),
]


_EXPLANATIONS: Explanations = {
    JobNotFound: lambda e: f"job not found ({e})",
    PublishError: lambda e: f"{e}; the dead letters were left in place",
    BackendUnavailable: lambda e: f"cannot reach RabbitMQ: {e}",
}


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return run_command(coroutine, _EXPLANATIONS)


def _rework(amqp_url: str, job: str, decide: Decide) -> list[tuple[DeadLetter, Action]]:
    async def go() -> list[tuple[DeadLetter, Action]]:
        broker = await AmqpBroker.connect(amqp_url, publish_timeout=30.0)
        try:
            return await rework_dead_letters(broker, job, decide)
        finally:
            await broker.close()

    return _run(go())


def _jsonable(value: Any) -> Any:
    # AMQP headers may hold bytes, timestamps and nested tables; JSON has none of those.
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _as_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "reason": letter.reason,
        "detail": letter.detail,
        "bytes": len(letter.body),
        "headers": _jsonable(dict(letter.headers)),
    }


def _line(letter: DeadLetter) -> str:
    fields = update_fields(letter.headers)
    device = _jsonable(fields.get("device_id", "?"))
    base = _jsonable(fields.get("base_version", "?"))
    return (
        f"{letter.message_id}  {letter.reason}  device {device}  base v{base}  "
        f"{len(letter.body)} bytes  {letter.detail}"
    )


def _counts(letters: list[DeadLetter]) -> str:
    counts = Counter(letter.reason for letter in letters)
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) or "none"


@dead_app.command("list")
def list_(
    job: opt.Job,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array, one object per letter.")
    ] = False,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
) -> None:
    """List a job's dead letters with their reasons, leaving them in the queue."""
    letters = [letter for letter, _ in _rework(amqp_url, job, keep_all)]
    if as_json:
        typer.echo(json.dumps([_as_json(letter) for letter in letters], indent=2))
        return
    for letter in letters:
        typer.echo(_line(letter))
    typer.echo(f"{len(letters)} dead letters in job {job} ({_counts(letters)})")


@dead_app.command()
def requeue(job: opt.Job, reason: Reason = None, amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL) -> None:
    """Publish dead letters to the job's update queue again, without the dead-letter headers."""
    done = _rework(amqp_url, job, matching(reason, "requeue"))
    moved = [letter for letter, action in done if action == "requeue"]
    typer.echo(f"requeued {len(moved)} of {len(done)} dead letters of job {job} ({_counts(moved)})")


@dead_app.command()
def purge(job: opt.Job, reason: Reason = None, amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL) -> None:
    """Delete dead letters for good."""
    done = _rework(amqp_url, job, matching(reason, "drop"))
    dropped = [letter for letter, action in done if action == "drop"]
    typer.echo(
        f"purged {len(dropped)} of {len(done)} dead letters of job {job} ({_counts(dropped)})"
    )


def register(app: typer.Typer) -> None:
    """Add the `dead` command group to the `fedq` app."""
    app.add_typer(dead_app, name="dead")
