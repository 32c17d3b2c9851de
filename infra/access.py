"""Least-privilege credentials for one device: its RabbitMQ user and its Redis ACL user.

Pure: these functions only build the permissions, commands and ACL rules; `fedq device
credentials` prints them or applies them. A device's broker user is named like the device,
so the aggregator of a `bind_device_users` job can compare the broker-validated AMQP
user_id with the header's device id (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from infra import keys
from infra.keys import JobKeys

# What an agent does on RabbitMQ: publish to the updates exchange through a channel it opens,
# with `get_exchange(ensure=False)`, so it declares nothing and consumes nothing. Versions
# come from Redis (the versions stream), not from the fedq.versions fanout.
DEVICE_CONFIGURE = "^$"
DEVICE_WRITE = f"^{re.escape(keys.UPDATES_EXCHANGE)}$"
DEVICE_READ = "^$"

# Every Redis command an agent sends, including redis-py's own: PING (health checks), SELECT
# (a URL's database; CLIENT SETINFO is left out: Redis 7.0 lacks it and redis-py ignores its
# refusal), EVALSHA / SCRIPT LOAD (the device-index claim), MULTI / EXEC (the
# registration check), and HMGET / HGET, HSET / EXPIRE / RENAME for values stored in chunks
# (infra/redis_values.py). Commands inside a script are checked against the same rules.
DEVICE_REDIS_COMMANDS = (
    "ping",
    "select",
    "get",
    "set",
    "xread",
    "xrevrange",
    "evalsha",
    "script|load",
    "hget",
    "hmget",
    "hlen",
    "hset",
    "expire",
    "rename",
    "sismember",
    "multi",
    "exec",
)


@dataclass(frozen=True)
class DeviceCredentials:
    """One device's user name and password on both backends, for one job."""

    job: str
    device_id: str
    password: str
    vhost: str = "/"

    @property
    def user(self) -> str:
        return self.device_id


def new_password() -> str:
    """Return a random password that needs no escaping in an AMQP or Redis URL."""
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")


def rabbitmqctl_commands(creds: DeviceCredentials) -> list[list[str]]:
    """Return the `rabbitmqctl` command lines that create the device's broker user."""
    return [
        # `--` ends the options: a password may start with "-" (a generated one does, one
        # time in 64), which rabbitmqctl would otherwise read as flags and refuse.
        ["rabbitmqctl", "add_user", "--", creds.user, creds.password],
        [
            "rabbitmqctl",
            "set_permissions",
            "-p",
            creds.vhost,
            creds.user,
            DEVICE_CONFIGURE,
            DEVICE_WRITE,
            DEVICE_READ,
        ],
    ]


def rabbitmq_password_hash(password: str, salt: bytes | None = None) -> str:
    """Hash a password as RabbitMQ's rabbit_password_hashing_sha256 does, for definitions."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def rabbitmq_definitions(devices: list[DeviceCredentials]) -> dict[str, Any]:
    """Return the users and permissions part of a RabbitMQ definitions document."""
    return {
        "users": [
            {
                "name": creds.user,
                "password_hash": rabbitmq_password_hash(creds.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for creds in devices
        ],
        "permissions": [
            {
                "user": creds.user,
                "vhost": creds.vhost,
                "configure": DEVICE_CONFIGURE,
                "write": DEVICE_WRITE,
                "read": DEVICE_READ,
            }
            for creds in devices
        ],
    }


def redis_device_rules(job: str, device_id: str) -> list[str]:
    """Return the ACL rules of a device: read the job's model side, write its own blobs.

    Ids never hold glob characters (schemas.messages), so they are safe inside patterns.
    """
    job_keys = JobKeys(job)
    prefix = job_keys.prefix
    readable = (
        job_keys.config,
        job_keys.version,
        f"{prefix}:model:*",
        f"{prefix}:meta:*",
        job_keys.versions_stream,
        job_keys.device_keys,
        job_keys.revoked_devices,
    )
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in DEVICE_REDIS_COMMANDS),
        *(f"%R~{key}" for key in readable),
        # The shard-index claim (claim_device_index) writes the job's devices hash.
        f"~{job_keys.devices}",
        # Its own blobs, read too: a chunked blob is renamed into place from a temporary key
        # under the same prefix, and RENAME reads its source.
        f"~{job_keys.blob_prefix(device_id)}*",
    ]


def redis_acl_line(creds: DeviceCredentials) -> str:
    """Return the device's line for a Redis ACL file (`aclfile`), with a hashed password."""
    digest = hashlib.sha256(creds.password.encode("utf-8")).hexdigest()
    rules = redis_device_rules(creds.job, creds.device_id)
    return " ".join(["user", creds.user, "on", f"#{digest}", *rules])


def redis_setuser_args(creds: DeviceCredentials) -> list[str]:
    """Return the arguments of `ACL SETUSER` that (re)define the device's Redis user."""
    rules = redis_device_rules(creds.job, creds.device_id)
    return ["ACL", "SETUSER", creds.user, "reset", "on", f">{creds.password}", *rules]
