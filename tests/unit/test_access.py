"""A device's least-privilege users: permissions, ACL rules and the user_id check, offline."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time
import uuid
from fnmatch import fnmatchcase
from typing import ClassVar

import pytest

from aggregator.validation import check_user
from fedq.access_cli import with_user
from infra.access import (
    DEVICE_CONFIGURE,
    DEVICE_READ,
    DEVICE_WRITE,
    DeviceCredentials,
    new_password,
    rabbitmq_definitions,
    rabbitmq_password_hash,
    redis_acl_line,
    redis_device_rules,
)
from infra.amqp_broker import broker_user
from infra.keys import JobKeys
from infra.provision import ProvisionError, apply_rabbitmq_user_http
from schemas import JobConfig, Rejection, RejectReason, TensorSpec, UpdateHeader

pytestmark = pytest.mark.unit
JOB = "job-a"


def _patterns(rules: list[str], mode: str) -> list[str]:
    """The key patterns of ACL rules that grant `mode` ("R" or "W")."""
    found = []
    for rule in rules:
        if rule.startswith("~"):
            found.append(rule[1:])
        elif rule.startswith("%") and "~" in rule:
            modes, pattern = rule[1:].split("~", 1)
            if mode in modes:
                found.append(pattern)
    return found


def _allowed(rules: list[str], mode: str, key: str) -> bool:
    # Redis globs and fnmatch agree on `*`; ids hold none of the other glob characters.
    return any(fnmatchcase(key, pattern) for pattern in _patterns(rules, mode))


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("fedq.updates", True),
        ("fedq.dead", False),
        ("fedq.versions", False),
        ("fedq.updatesX", False),
        ("xfedq.updates", False),
        ("fedqXupdates", False),
        ("", False),
    ],
)
def test_a_device_may_write_only_the_updates_exchange(name: str, allowed: bool) -> None:
    # RabbitMQ matches permissions as regular expressions against the resource name.
    assert bool(re.search(DEVICE_WRITE, name)) is allowed
    assert not re.search(DEVICE_CONFIGURE, name or "x")
    assert not re.search(DEVICE_READ, name or "x")


def test_the_password_hash_is_rabbitmqs_sha256_scheme() -> None:
    # The worked example of RabbitMQ's "Computing Password Hash" documentation.
    assert (
        rabbitmq_password_hash("test12", bytes.fromhex("908DC60A"))
        == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    )


def test_definitions_hold_the_device_user_and_its_permissions() -> None:
    creds = DeviceCredentials(JOB, "dev-a", "pw", vhost="/fl")
    document = rabbitmq_definitions([creds])
    assert [u["name"] for u in document["users"]] == ["dev-a"]
    assert document["users"][0]["tags"] == []
    assert "pw" not in str(document)
    assert document["permissions"] == [
        {"user": "dev-a", "vhost": "/fl", "configure": "^$", "write": DEVICE_WRITE, "read": "^$"}
    ]


@pytest.mark.parametrize(
    ("key", "mode", "allowed"),
    [
        (JobKeys(JOB).config, "R", True),
        (JobKeys(JOB).config, "W", False),
        (JobKeys(JOB).version, "R", True),
        (JobKeys(JOB).model(7), "R", True),
        (JobKeys(JOB).model(7), "W", False),
        (JobKeys(JOB).meta(7), "R", True),
        (JobKeys(JOB).versions_stream, "R", True),
        (JobKeys(JOB).devices, "W", True),
        (JobKeys(JOB).device_keys, "R", True),
        (JobKeys(JOB).device_keys, "W", False),
        (JobKeys(JOB).revoked_devices, "W", False),
        (JobKeys(JOB).applied, "R", False),
        (JobKeys(JOB).applied, "W", False),
        (JobKeys(JOB).rejections, "W", False),
        (JobKeys(JOB).blob("dev-a", str(uuid.UUID(int=1))), "W", True),
        (JobKeys(JOB).blob("dev-b", str(uuid.UUID(int=1))), "W", False),
        (JobKeys(JOB).blob("dev-b", str(uuid.UUID(int=1))), "R", False),
        # A device whose id extends dev-a's is not dev-a: "/" ends the prefix.
        (JobKeys(JOB).blob("dev-a:x", str(uuid.UUID(int=1))), "W", False),
        (JobKeys(JOB).blob("dev-a.b", str(uuid.UUID(int=1))), "W", False),
        (JobKeys("job-b").config, "R", False),
        (JobKeys("job-b").blob("dev-a", str(uuid.UUID(int=1))), "W", False),
    ],
)
def test_a_device_redis_user_reads_the_model_side_and_writes_only_its_blobs(
    key: str, mode: str, allowed: bool
) -> None:
    rules = redis_device_rules(JOB, "dev-a")
    assert _allowed(rules, mode, key) is allowed


def test_the_acl_line_holds_a_hash_not_the_password() -> None:
    line = redis_acl_line(DeviceCredentials(JOB, "dev-a", "s3cret"))
    assert line.startswith("user dev-a on #")
    assert "s3cret" not in line
    assert "-@all" in line.split()


def test_generated_passwords_need_no_url_escaping_and_differ() -> None:
    first, second = new_password(), new_password()
    assert first != second
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", first)


def test_urls_get_the_device_user() -> None:
    assert with_user("amqps://admin:x@broker:5671/fl", "dev-a", "pw") == (
        "amqps://dev-a:pw@broker:5671/fl"
    )
    assert (
        with_user("redis://127.0.0.1:6379/0", "dev-a", "pw") == "redis://dev-a:pw@127.0.0.1:6379/0"
    )
    assert broker_user("amqp://dev%40home:pw@h/") == "dev@home"
    assert broker_user("amqp://h:5672/") == "guest"


def _config(bind: bool) -> JobConfig:
    schema = {"w": TensorSpec(shape=(1,), dtype="float32")}
    return JobConfig(
        job=JOB, task="t", model_schema=schema, created_at=time.time(), bind_device_users=bind
    )


def _header(device_id: str) -> UpdateHeader:
    return UpdateHeader(
        job=JOB,
        update_id=str(uuid.uuid4()),
        device_id=device_id,
        base_version=0,
        num_samples=1,
        payload_sha256="0" * 64,
        payload_bytes=1,
        sent_at=time.time(),
    )


@pytest.mark.parametrize("user_id", ["dev-b", None, "guest", "DEV-A"])
def test_a_bound_job_refuses_a_device_id_that_is_not_the_publishing_user(
    user_id: str | None,
) -> None:
    with pytest.raises(Rejection) as refused:
        check_user(_header("dev-a"), user_id, _config(bind=True))
    assert refused.value.reason is RejectReason.USER_MISMATCH


def test_the_user_check_passes_the_device_itself_and_unbound_jobs() -> None:
    check_user(_header("dev-a"), "dev-a", _config(bind=True))
    check_user(_header("dev-a"), "someone", _config(bind=False))
    check_user(_header("dev-a"), None, _config(bind=False))


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every PUT with 204 and remembers it, like the management API would."""

    seen: ClassVar[list[tuple[str, str | None, dict[str, str]]]] = []

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers["Authorization"], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


async def test_the_management_api_gets_the_user_then_its_permissions() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://admin:pw@127.0.0.1:{server.server_address[1]}"
        await apply_rabbitmq_user_http(url, DeviceCredentials(JOB, "dev-a", "s3cret"))
    finally:
        server.shutdown()
        server.server_close()
    auth = "Basic " + base64.b64encode(b"admin:pw").decode()
    assert _Recorder.seen == [
        ("/api/users/dev-a", auth, {"password": "s3cret", "tags": ""}),
        (
            "/api/permissions/%2F/dev-a",
            auth,
            {"configure": "^$", "write": DEVICE_WRITE, "read": "^$"},
        ),
    ]


async def test_a_management_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ProvisionError, match="not an http"):
        await apply_rabbitmq_user_http("amqp://h:5672", DeviceCredentials(JOB, "dev-a", "x"))
