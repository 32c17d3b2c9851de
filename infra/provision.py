"""Apply a device's credentials: its Redis ACL user (over an admin connection) and broker user.

RabbitMQ users are made with `rabbitmqctl` on a broker node, or through the management HTTP
API where it runs (compose); Redis users with `ACL SETUSER`. Every call is idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.access import (
    DEVICE_CONFIGURE,
    DEVICE_READ,
    DEVICE_WRITE,
    DeviceCredentials,
    rabbitmqctl_commands,
    redis_setuser_args,
)
from infra.errors import BackendUnavailable
from infra.redis_client import redis_client

RABBITMQCTL_TIMEOUT = 60.0


class ProvisionError(Exception):
    """A backend refused to create or delete a device's user."""


async def apply_redis_user(admin_url: str, creds: DeviceCredentials) -> None:
    """Create or redefine the device's Redis ACL user through an admin connection."""
    await _redis_admin(admin_url, redis_setuser_args(creds))


async def delete_redis_user(admin_url: str, user: str) -> None:
    """Remove a Redis ACL user (missing is fine)."""
    await _redis_admin(admin_url, ["ACL", "DELUSER", user])


async def _redis_admin(admin_url: str, args: list[str]) -> None:
    client = redis_client(admin_url, socket_timeout=10.0)
    try:
        await client.execute_command(*args)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        raise ProvisionError(f"redis refused {args[0]} {args[1]}: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise BackendUnavailable(f"redis: {exc}") from exc
    finally:
        await client.aclose()


async def apply_rabbitmq_user(creds: DeviceCredentials) -> None:
    """Create the device's broker user with `rabbitmqctl` (replacing its password if it exists)."""
    add_user, set_permissions = rabbitmqctl_commands(creds)
    code, output = await _rabbitmqctl(add_user)
    if code != 0:
        if "user_already_exists" not in output and "already exists" not in output:
            raise ProvisionError(f"rabbitmqctl add_user failed: {output.strip()}")
        change = ["rabbitmqctl", "change_password", "--", creds.user, creds.password]
        await _checked(change)
    await _checked(set_permissions)


async def apply_rabbitmq_user_http(api_url: str, creds: DeviceCredentials) -> None:
    """Create the device's broker user through the management HTTP API at `api_url`.

    `api_url` is like http://admin:password@rabbitmq:15672 (an administrator's login).
    """
    base = urlsplit(api_url)
    if base.scheme not in ("http", "https") or not base.hostname:
        raise ProvisionError(f"--rabbitmq-api {_safe(api_url)} is not an http(s) URL")
    login = f"{unquote(base.username or 'guest')}:{unquote(base.password or 'guest')}"
    auth = "Basic " + base64.b64encode(login.encode()).decode()
    root = f"{base.scheme}://{base.netloc.rpartition('@')[2]}/api"
    vhost, user = quote(creds.vhost, safe=""), quote(creds.user, safe="")
    permissions = {"configure": DEVICE_CONFIGURE, "write": DEVICE_WRITE, "read": DEVICE_READ}
    for path, body in (
        (f"/users/{user}", {"password": creds.password, "tags": ""}),
        (f"/permissions/{vhost}/{user}", permissions),
    ):
        request = urllib.request.Request(
            root + path,
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Authorization": auth, "Content-Type": "application/json"},
        )
        await asyncio.to_thread(_send, request)


def _send(request: urllib.request.Request) -> None:
    try:
        # Only http(s): the scheme was checked when the URL was parsed.
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise ProvisionError(f"RabbitMQ API refused {request.full_url}: {exc}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise BackendUnavailable(f"RabbitMQ API {request.full_url}: {exc}") from exc


def _safe(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


async def delete_rabbitmq_user(user: str) -> None:
    """Remove a broker user (missing is fine)."""
    code, output = await _rabbitmqctl(["rabbitmqctl", "delete_user", user])
    if code != 0 and "no_such_user" not in output and "does not exist" not in output:
        raise ProvisionError(f"rabbitmqctl delete_user failed: {output.strip()}")


async def _checked(argv: list[str]) -> None:
    code, output = await _rabbitmqctl(argv)
    if code != 0:
        raise ProvisionError(f"{argv[0]} {argv[1]} failed: {output.strip()}")


async def _rabbitmqctl(argv: list[str]) -> tuple[int, str]:
    """Run one rabbitmqctl command off the event loop; return its exit code and output."""
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ProvisionError("rabbitmqctl is not installed here: run on a broker node") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"{argv[0]} {argv[1]} took over {RABBITMQCTL_TIMEOUT}s") from exc
    return done.returncode, done.stdout + done.stderr
