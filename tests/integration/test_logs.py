"""Structured logs: the real aggregator with FEDQ_LOG_FORMAT=json, a good and a bad update."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from schemas import StalenessConfig, StrategyConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import Backends, delta, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=10, staleness=StalenessConfig(name="constant")
)


@pytest.fixture
async def backends(job_id: str) -> AsyncIterator[Backends]:
    async with job_backends("real", job_id, FEDBUFF_1) as real:
        yield real


async def _run_aggregator(job: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "FEDQ_LOG_FORMAT"}
    environment = {
        **inherited,
        "FEDQ_JOB": job,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_IDLE_EXIT_SECONDS": "2",
        **env,
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aggregator"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )


def _only(lines: list[dict[str, Any]], text: str) -> dict[str, Any]:
    [line] = [entry for entry in lines if text in entry["message"]]
    return line


async def test_json_logs_name_the_update_on_every_line_about_it(
    backends: Backends, job_id: str
) -> None:
    # Arrange: one good update and one whose header lies about its hash, queued up
    broker = backends.broker
    good_headers, good_body, good_id = update(job_id, delta(0.1), device_id="dev-good")
    bad_headers, bad_body, bad_id = update(
        job_id, delta(0.1), device_id="dev-bad", payload_blake3="0" * 64
    )
    await broker.publish_raw(job_id, good_body, headers=good_headers, message_id=good_id)
    await broker.publish_raw(job_id, bad_body, headers=bad_headers, message_id=bad_id)
    # Act
    finished = await _run_aggregator(job_id, FEDQ_LOG_FORMAT="json")
    # Assert: every line is one JSON object with the standard fields
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = [json.loads(line) for line in finished.stderr.splitlines() if line.strip()]
    assert lines, "the aggregator logged nothing"
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert entry["time"].endswith("Z")
    committed = _only(lines, "committed version 1")
    assert committed["level"] == "INFO"
    assert committed["logger"] == "aggregator.service"
    assert (committed["job"], committed["version"]) == (job_id, 1)
    assert (committed["update_id"], committed["device_id"]) == (good_id, "dev-good")
    assert committed["contributors"] == [good_id]
    rejected = _only(lines, "dead-lettering")
    assert rejected["level"] == "WARNING"
    assert (rejected["job"], rejected["version"]) == (job_id, 1)
    assert (rejected["update_id"], rejected["device_id"]) == (bad_id, "dev-bad")
    assert rejected["reason"] == "hash_mismatch"


async def test_text_logs_are_the_default(backends: Backends, job_id: str) -> None:
    # Act: no update, no FEDQ_LOG_FORMAT, just start and drain
    finished = await _run_aggregator(job_id)
    # Assert: readable lines, not JSON
    assert finished.returncode == 0, finished.stderr[-2000:]
    first = finished.stderr.splitlines()[0]
    assert " INFO aggregator.service: aggregator for job " in first
    assert not first.startswith("{")
