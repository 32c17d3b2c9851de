"""The `fedq` CLI against the real services: job create, status, errors and help."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from fedq.cli import app
from tests.conftest import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.integration
URLS = ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def created_job(cli: CliRunner, job_id: str) -> Iterator[str]:
    result = cli.invoke(
        app,
        ["job", "create", "--job", job_id, "--task", "digits-mlp", "--strategy", "fedasync", *URLS],
    )
    assert result.exit_code == 0, result.output
    yield job_id
    cli.invoke(app, ["job", "delete", "--job", job_id, *URLS])


def test_status_json_of_a_new_job(cli: CliRunner, created_job: str) -> None:
    # Act
    result = cli.invoke(app, ["status", "--job", created_job, "--json", *URLS])
    # Assert
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["job"] == created_job
    assert status["version"] == 0
    assert status["accuracy"] is None
    assert status["applied_updates"] == 0
    assert status["dead_lettered"] == 0
    assert status["strategy"] == "fedasync"
    assert status["queue"] == {"ready": 0, "consumers": 0}


def test_creating_a_job_twice_fails_unless_asked_to_accept_it(
    cli: CliRunner, created_job: str
) -> None:
    again = ["job", "create", "--job", created_job, "--task", "digits-mlp", *URLS]
    refused = cli.invoke(app, again)
    assert refused.exit_code == 1
    assert "already exists" in refused.output
    accepted = cli.invoke(app, [*again, "--if-not-exists"])
    assert accepted.exit_code == 0, accepted.output
    assert "exists already" in accepted.output


def test_status_of_a_missing_job_is_a_one_line_error(cli: CliRunner, job_id: str) -> None:
    result = cli.invoke(app, ["status", "--job", job_id, *URLS])
    assert result.exit_code == 1
    assert "job not found" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--task", "imagenet"], "--task"),
        (["--strategy", "fedmagic"], "--strategy"),
        (["--num-devices", "0"], "--num-devices"),
        (["--buffer-size", "0"], "--buffer-size"),
    ],
)
def test_bad_options_name_the_option(
    cli: CliRunner, job_id: str, args: list[str], named: str
) -> None:
    result = cli.invoke(app, ["job", "create", "--job", job_id, *args, *URLS])
    assert result.exit_code == 2
    assert named in result.output


def test_unreachable_broker_is_a_clear_error(cli: CliRunner, job_id: str) -> None:
    result = cli.invoke(
        app,
        [
            "status",
            "--job",
            job_id,
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/",
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
    )
    assert result.exit_code == 1
    assert "cannot reach" in result.output


@pytest.mark.parametrize(
    "command",
    [["job", "create"], ["job", "delete"], ["aggregator"], ["agent"], ["evaluator"], ["status"]],
)
def test_every_command_explains_itself(cli: CliRunner, command: list[str]) -> None:
    result = cli.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "--job" in result.output
    assert "--redis-url" in result.output
