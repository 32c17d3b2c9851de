"""`fedq device credentials`: a device's own RabbitMQ and Redis users (docs/security.md)."""

from __future__ import annotations

import json
import shlex
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import TypeAdapter, ValidationError

from fedq import options as opt
from fedq.console import Explanations, fail, run_command
from infra.access import (
    DeviceCredentials,
    new_password,
    rabbitmq_definitions,
    rabbitmqctl_commands,
    redis_acl_line,
    redis_setuser_args,
)
from infra.errors import BackendUnavailable
from infra.provision import (
    ProvisionError,
    apply_rabbitmq_user,
    apply_rabbitmq_user_http,
    apply_redis_user,
)
from infra.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from schemas.messages import DeviceId, JobId

_EXPLANATIONS: Explanations = {
    ProvisionError: str,
    BackendUnavailable: lambda e: f"cannot reach Redis: {e}",
}
_DEVICE_ID = TypeAdapter(DeviceId)
_JOB_ID = TypeAdapter(JobId)


def register(app: typer.Typer) -> None:
    """Add `credentials` to the `fedq device` command group."""
    app.command("credentials")(device_credentials)


def with_user(url: str, user: str, password: str) -> str:
    """Return `url` with its user and password replaced (both are URL-safe here)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _credentials(job: str, device_id: str, password: str | None, vhost: str) -> DeviceCredentials:
    try:
        _JOB_ID.validate_python(job)
        _DEVICE_ID.validate_python(device_id)
    except ValidationError:
        raise fail(f"{job!r} / {device_id!r} is not a valid job id / device id") from None
    if password is not None and (not password or any(c in password for c in " :@/\n")):
        raise fail("--password must be non-empty, without spaces, ':', '@' or '/'")
    return DeviceCredentials(job, device_id, password or new_password(), vhost)


def _report(creds: DeviceCredentials, amqp_url: str, redis_url: str) -> list[str]:
    """The lines an operator runs (or keeps) to give the device its users."""
    setuser = ["redis-cli", *redis_setuser_args(creds)]
    return [
        f"# RabbitMQ user {creds.user}: configures and reads nothing, writes only fedq.updates",
        *(shlex.join(argv) for argv in rabbitmqctl_commands(creds)),
        "# Redis ACL user: a line for the aclfile, or the same user at runtime",
        redis_acl_line(creds),
        shlex.join(setuser),
        "# the device's settings (keep the password secret)",
        f"FEDQ_DEVICE_ID={creds.device_id}",
        f"FEDQ_AMQP_URL={with_user(amqp_url, creds.user, creds.password)}",
        f"FEDQ_REDIS_URL={with_user(redis_url, creds.user, creds.password)}",
    ]


def device_credentials(
    job: opt.Job,
    device_id: Annotated[str, typer.Option("--device-id", help="Device id (as the agent uses).")],
    password: Annotated[
        str | None,
        typer.Option(
            envvar="FEDQ_DEVICE_PASSWORD", help="The device's password (default: a random one)."
        ),
    ] = None,
    vhost: Annotated[str, typer.Option(help="RabbitMQ virtual host.")] = "/",
    apply: Annotated[
        bool,
        typer.Option(
            help="Also create the users: ACL SETUSER on --redis-url, rabbitmqctl on this host."
        ),
    ] = False,
    rabbitmq_api: Annotated[
        str | None,
        typer.Option(
            envvar="FEDQ_RABBITMQ_API",
            help="With --apply: use this management API (http://admin:pw@host:15672), "
            "not rabbitmqctl.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print RabbitMQ definitions and the ACL line as JSON.")
    ] = False,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Print (and with --apply create) a device's least-privilege RabbitMQ and Redis users."""
    creds = _credentials(job, device_id, password, vhost)
    if apply:

        async def provision() -> None:
            await apply_redis_user(redis_url, creds)
            if rabbitmq_api is None:
                await apply_rabbitmq_user(creds)
            else:
                await apply_rabbitmq_user_http(rabbitmq_api, creds)

        run_command(provision(), _EXPLANATIONS)
    if as_json:
        document = {
            "rabbitmq_definitions": rabbitmq_definitions([creds]),
            "redis_acl": redis_acl_line(creds),
            "amqp_url": with_user(amqp_url, creds.user, creds.password),
            "redis_url": with_user(redis_url, creds.user, creds.password),
        }
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo("\n".join(_report(creds, amqp_url, redis_url)))
    if apply:
        typer.echo(f"# applied: Redis user and RabbitMQ user {creds.user} exist now")
