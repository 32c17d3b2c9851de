"""The `fedq device` commands: register, list and revoke device signing keys (docs/security.md)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from fedq import access_cli
from fedq import options as opt
from fedq.console import Explanations, fail, run_command
from infra.connect import open_store
from infra.errors import BackendUnavailable, DeviceExists, JobNotFound
from infra.protocols import ModelStore
from infra.settings import DEFAULT_REDIS_URL, ConnectionSettings
from schemas.messages import DeviceId
from schemas.signing import generate_key_pair

T = TypeVar("T")

device_app = typer.Typer(
    help="Register, list and revoke the signing keys of a job's devices; make their users.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
_DEVICE_ID = TypeAdapter(DeviceId)

DeviceOption = Annotated[str, typer.Option("--device-id", help="Device id (as the agent uses).")]


_EXPLANATIONS: Explanations = {
    JobNotFound: lambda e: f"job not found ({e}); create it with `fedq job create`",
    DeviceExists: lambda e: f"{e}; pass --replace to give it the new key",
    BackendUnavailable: lambda e: f"cannot reach Redis: {e}",
}


def register(app: typer.Typer) -> None:
    """Add the `device` command group to the `fedq` app."""
    access_cli.register(device_app)
    app.add_typer(device_app, name="device")


def _with_store(job: str, redis_url: str, action: Callable[[ModelStore], Awaitable[T]]) -> T:
    """Run `action` on the job's store (which must hold the job), with one-line errors."""
    settings = ConnectionSettings(redis_url=redis_url)

    async def run() -> T:
        store = open_store(settings, job)
        try:
            await store.get_config()  # JobNotFound before touching the registry
            return await action(store)
        finally:
            await store.close()

    return run_command(run(), _EXPLANATIONS)


def _device_id(value: str) -> str:
    try:
        return _DEVICE_ID.validate_python(value)
    except ValidationError:
        raise fail(f"--device-id {value!r} is not a valid device id") from None


def _write_private_key(path: Path, private_key: str) -> None:
    """Create the key file readable by its owner only; never overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise fail(f"{path} exists already: choose another --out") from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        # The umask can only remove bits, but be explicit: a private key is owner-only.
        os.fchmod(file.fileno(), 0o600)
        file.write(private_key + "\n")


@device_app.command("add")
def device_add(
    job: opt.Job,
    device_id: DeviceOption,
    out: Annotated[
        Path, typer.Option("--out", dir_okay=False, help="Where to write the private key (0600).")
    ],
    replace: Annotated[
        bool, typer.Option(help="Replace the device's existing (or revoked) key.")
    ] = False,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Generate a device key pair, register its public key and write the private key file."""
    device = _device_id(device_id)
    private_key, public_key = generate_key_pair()
    _write_private_key(out, private_key)
    try:
        _with_store(
            job, redis_url, lambda store: store.register_device(device, public_key, replace=replace)
        )
    except BaseException:
        # A key that was never registered is useless; do not leave it lying around.
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise
    typer.echo(f"device {device} of job {job}: registered public key {public_key}")
    typer.echo(f"private key written to {out}: pass it to `fedq agent --key-file {out}`")


@device_app.command("list")
def device_list(
    job: opt.Job,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """List the job's registered devices, their public keys and whether they are revoked."""
    records = _with_store(job, redis_url, lambda store: store.list_devices())
    if as_json:
        rows = [
            {"device_id": r.device_id, "public_key": r.public_key, "revoked": r.revoked}
            for r in records
        ]
        typer.echo(json.dumps(rows))
        return
    table = Table("device", "public key", "status", title=f"devices of job {job}")
    for record in records:
        table.add_row(
            record.device_id, record.public_key, "revoked" if record.revoked else "active"
        )
    Console(width=140).print(table)


@device_app.command("revoke")
def device_revoke(
    job: opt.Job,
    device_id: DeviceOption,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Revoke a device: the aggregator refuses its updates from the next one on."""
    device = _device_id(device_id)
    if not _with_store(job, redis_url, lambda store: store.revoke_device(device)):
        raise fail(f"device {device} is not registered for job {job}")
    typer.echo(f"device {device} of job {job}: revoked")
