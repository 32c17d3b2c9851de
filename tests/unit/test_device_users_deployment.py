"""docker-compose.devices.yml: every device its own broker and Redis user, no admin secret.

Rendered with `docker compose config` over docker-compose.yml, as `up` would merge them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.unit.test_deployment import COMPOSE_FILE, ROOT, _compose_command

pytestmark = pytest.mark.unit

DEVICES_FILE = ROOT / "docker-compose.devices.yml"
ADMIN_SERVICES = ("job-init", "aggregator", "evaluator", "device-users")


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    cmd = [*_compose_command(), "--project-directory", str(ROOT)]
    files = ["-f", str(COMPOSE_FILE), "-f", str(DEVICES_FILE)]
    done = subprocess.run(
        [*cmd, *files, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        # The files' own defaults, not whatever FEDQ_* the caller's shell sets.
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert done.returncode == 0, done.stderr
    services: dict[str, Any] = json.loads(done.stdout)["services"]
    return services


def _devices(services: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        name: service["environment"]
        for name, service in services.items()
        if name.startswith("device-") and name != "device-users"
    }


def test_each_device_logs_in_to_both_backends_as_itself(merged: dict[str, Any]) -> None:
    devices = _devices(merged)
    assert sorted(devices) == ["device-0", "device-1", "device-2", "device-3"]
    passwords = set()
    for name, env in devices.items():
        amqp, redis = urlsplit(env["FEDQ_AMQP_URL"]), urlsplit(env["FEDQ_REDIS_URL"])
        assert env["FEDQ_DEVICE_ID"] == name == amqp.username == redis.username
        assert amqp.password == redis.password
        passwords.add(amqp.password)
        assert env["FEDQ_ROLE"] == "agent"
    assert len(passwords) == len(devices)


def test_no_device_holds_an_admin_secret(merged: dict[str, Any]) -> None:
    admin_redis = urlsplit(merged["aggregator"]["environment"]["FEDQ_REDIS_URL"]).password
    admin_amqp = urlsplit(merged["aggregator"]["environment"]["FEDQ_AMQP_URL"]).password
    assert admin_redis and admin_amqp
    for env in _devices(merged).values():
        values = " ".join(env.values())
        assert admin_redis not in values and f":{admin_amqp}@" not in values


def test_redis_needs_a_password_and_the_admin_services_have_it(merged: dict[str, Any]) -> None:
    command = merged["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert merged["redis"]["environment"]["REDISCLI_AUTH"] == password
    for name in ADMIN_SERVICES:
        url = merged[name]["environment"]["FEDQ_REDIS_URL"]
        assert urlsplit(url).password == password, name


def test_the_job_binds_device_users_and_every_device_gets_its_users_first(
    merged: dict[str, Any],
) -> None:
    assert "--device-users" in merged["job-init"]["command"]
    provisioned = merged["device-users"]["environment"]["DEVICES"].split()
    assert [f"device-{n}" for n in provisioned] == sorted(_devices(merged))
    for name in _devices(merged):
        service = merged[name]
        env = merged["device-users"]["environment"]
        number = name.removeprefix("device-")
        assert (
            env[f"DEVICE_{number}_PASS"]
            == urlsplit(service["environment"]["FEDQ_AMQP_URL"]).password
        )
        assert service["depends_on"]["device-users"]["condition"] == (
            "service_completed_successfully"
        )
        assert service["command"] == merged["agent"]["command"]
        assert service["image"] == merged["agent"]["image"]
    assert merged["agent"]["deploy"]["replicas"] == 0
