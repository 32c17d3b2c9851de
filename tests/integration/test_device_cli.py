"""`fedq device add/list/revoke` and signed agents through the CLI, on the real services."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedq.cli import app
from infra.redis_store import RedisModelStore
from schemas.signing import generate_key_pair, public_key_of
from tests.conftest import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.integration
URLS = ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
REDIS = ["--redis-url", REDIS_URL]


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def signed_job(cli: CliRunner, job_id: str) -> Iterator[str]:
    create = [
        *["job", "create", "--job", job_id, "--task", "digits-mlp", "--strategy", "fedbuff"],
        *["--buffer-size", "1", "--local-epochs", "1", "--require-signatures", "--no-record"],
    ]
    result = cli.invoke(app, [*create, *URLS])
    assert result.exit_code == 0, result.output
    yield job_id
    cli.invoke(app, ["job", "delete", "--job", job_id, *URLS])


def _devices(cli: CliRunner, job: str) -> list[dict[str, object]]:
    result = cli.invoke(app, ["device", "list", "--job", job, "--json", *REDIS])
    assert result.exit_code == 0, result.output
    devices: list[dict[str, object]] = json.loads(result.output)
    return devices


async def _config_requires_signatures(job: str) -> bool:
    store = RedisModelStore.from_url(REDIS_URL, job)
    try:
        return (await store.get_config()).require_signatures
    finally:
        await store.close()


def test_add_list_revoke(cli: CliRunner, signed_job: str, tmp_path: Path) -> None:
    # Arrange
    key_file = tmp_path / "dev-a.key"
    assert asyncio.run(_config_requires_signatures(signed_job))
    # Act
    added = cli.invoke(
        app,
        ["device", "add", "--job", signed_job, "--device-id", "dev-a", "--out", key_file, *REDIS],
    )
    # Assert: an owner-only key file whose public half is the registered one
    assert added.exit_code == 0, added.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public_key = public_key_of(key_file.read_text())
    assert public_key in added.output
    assert _devices(cli, signed_job) == [
        {"device_id": "dev-a", "public_key": public_key, "revoked": False}
    ]
    # Act: revoke it, then an unknown device
    revoked = cli.invoke(
        app, ["device", "revoke", "--job", signed_job, "--device-id", "dev-a", *REDIS]
    )
    unknown = cli.invoke(
        app, ["device", "revoke", "--job", signed_job, "--device-id", "dev-z", *REDIS]
    )
    # Assert
    assert revoked.exit_code == 0, revoked.output
    assert _devices(cli, signed_job)[0]["revoked"] is True
    assert unknown.exit_code == 1
    assert "not registered" in unknown.output
    table = cli.invoke(app, ["device", "list", "--job", signed_job, *REDIS])
    assert "revoked" in table.output


def test_add_refuses_to_overwrite_a_key_or_a_file(
    cli: CliRunner, signed_job: str, tmp_path: Path
) -> None:
    add = ["device", "add", "--job", signed_job, "--device-id", "dev-a", *REDIS]
    first = cli.invoke(app, [*add, "--out", tmp_path / "one.key"])
    assert first.exit_code == 0, first.output
    # Same --out: the existing private key is never overwritten.
    same_file = cli.invoke(app, [*add, "--out", tmp_path / "one.key"])
    assert same_file.exit_code == 1
    assert "exists already" in same_file.output
    # Another key for a registered device needs --replace; the unused key file is removed.
    again = cli.invoke(app, [*add, "--out", tmp_path / "two.key"])
    assert again.exit_code == 1
    assert "--replace" in again.output
    assert not (tmp_path / "two.key").exists()
    replaced = cli.invoke(app, [*add, "--out", tmp_path / "two.key", "--replace"])
    assert replaced.exit_code == 0, replaced.output
    new_key = public_key_of((tmp_path / "two.key").read_text())
    assert [d["public_key"] for d in _devices(cli, signed_job)] == [new_key]


def test_add_to_a_missing_job_fails_and_leaves_no_key(
    cli: CliRunner, job_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "dev.key"
    result = cli.invoke(
        app, ["device", "add", "--job", job_id, "--device-id", "dev-a", "--out", out, *REDIS]
    )
    assert result.exit_code == 1
    assert "job not found" in result.output
    assert not out.exists()


def test_a_bad_key_file_is_a_one_line_error(cli: CliRunner, job_id: str, tmp_path: Path) -> None:
    key_file = tmp_path / "bad.key"
    key_file.write_text("not a key\n")
    result = cli.invoke(
        app, ["agent", "--job", job_id, "--device-id", "dev-a", "--key-file", key_file, *URLS]
    )
    assert result.exit_code == 1
    assert "not a valid key" in result.output
    assert "Traceback" not in result.output


def test_a_registered_agent_is_applied_and_a_foreign_key_is_not(
    cli: CliRunner, signed_job: str, tmp_path: Path
) -> None:
    # Arrange: dev-a registered through the CLI; a key file nobody registered
    key_file = tmp_path / "dev-a.key"
    add = ["device", "add", "--job", signed_job, "--device-id", "dev-a", "--out", key_file]
    assert cli.invoke(app, [*add, *REDIS]).exit_code == 0
    stranger = tmp_path / "stranger.key"
    stranger.write_text(generate_key_pair()[0])
    stranger.chmod(0o600)
    agent = ["agent", "--job", signed_job, "--updates", "1", "--log-level", "WARNING", *URLS]
    # Act
    for device, key in (("dev-a", key_file), ("dev-a", stranger)):
        sent = cli.invoke(app, [*agent, "--device-id", device, "--key-file", key])
        assert sent.exit_code == 0, sent.output
    drained = cli.invoke(
        app, ["aggregator", "--job", signed_job, "--idle-exit", "1", "--log-level", "ERROR", *URLS]
    )
    # Assert: one version, from the registered key; the impostor counted as a bad signature
    assert drained.exit_code == 0, drained.output
    status = json.loads(cli.invoke(app, ["status", "--job", signed_job, "--json", *URLS]).output)
    assert status["version"] == 1
    assert status["dead_lettered_by_reason"] == {"bad_signature": 1}
