"""`fedq status` against the real services while a real aggregator consumes the job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aggregator.service import Aggregator
from fedq.cli import app
from schemas import StalenessConfig, StrategyConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import Backends, delta, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
URLS = ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
FEDBUFF_2 = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=10, staleness=StalenessConfig(name="constant")
)


@pytest.fixture
async def backends(job_id: str) -> AsyncIterator[Backends]:
    async with job_backends("real", job_id, FEDBUFF_2) as real:
        yield real


async def _status(*args: str) -> Result:
    # The CLI runs its own event loop: give it a thread of its own.
    return await asyncio.to_thread(CliRunner().invoke, app, ["status", *args, *URLS])


async def _publish(backends: Backends, built: tuple[dict[str, Any], bytes, str]) -> None:
    headers, body, update_id = built
    await backends.broker.publish_raw(
        backends.config.job, body, headers=headers, message_id=update_id
    )


async def _until_settled(backends: Backends, version: int, rejected: int) -> None:
    for _ in range(200):
        counts = await backends.store.rejection_counts()
        done = await backends.store.current_version() >= version
        if done and sum(counts.values()) >= rejected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the aggregator did not get through the updates")


async def test_status_shows_rate_consumers_dead_letters_and_devices(
    backends: Backends, job_id: str
) -> None:
    # Arrange: v1 from dev-a and dev-b (staleness 0); v2 from two more of dev-a based on
    # version 0 (staleness 1); one update with a lying hash
    for device in ("dev-a", "dev-b", "dev-a"):
        await _publish(backends, update(job_id, delta(0.1), device_id=device))
    await _publish(backends, update(job_id, delta(0.1), payload_blake3="0" * 64))
    await _publish(backends, update(job_id, delta(0.1), device_id="dev-a"))
    async with Aggregator(job=job_id, broker=backends.broker, store=backends.store) as agg:
        running = asyncio.create_task(agg.run())
        try:
            await _until_settled(backends, version=2, rejected=1)
            # Act
            as_json = await _status("--job", job_id, "--json")
            as_tables = await _status("--job", job_id)
            watched = await _status("--job", job_id, "--watch", "0.5", "--duration", "0.4")
        finally:
            agg.stop()
            await asyncio.wait_for(running, timeout=10)
    # Assert: the JSON
    assert as_json.exit_code == 0, as_json.output
    status = json.loads(as_json.output)
    assert status["version"] == 2
    assert status["versions_per_minute"] == 2
    assert 0 <= status["last_version_age_seconds"] < 30
    assert status["queue"] == {"ready": 0, "consumers": 1}
    assert status["dead_lettered_by_reason"] == {"hash_mismatch": 1}
    assert (status["staleness_mean"], status["staleness_max"]) == (0.5, 1)
    assert status["devices"] == [
        {"device_id": "dev-a", "applied": 3, "staleness_mean": 0.667, "staleness_max": 1},
        {"device_id": "dev-b", "applied": 1, "staleness_mean": 0.0, "staleness_max": 0},
    ]
    # ... the tables
    assert as_tables.exit_code == 0, as_tables.output
    for text in ("versions per minute", "contributions by device", "dev-a", "hash_mismatch"):
        assert text in as_tables.output
    assert "0 / 1" in as_tables.output  # queue ready / consumers
    # ... and the watch line
    assert watched.exit_code == 0, watched.output
    assert "version    2 (2/min)" in watched.output
    assert "queue 0 (1 consumers)" in watched.output


def test_a_bad_sentinel_url_is_a_one_line_error(job_id: str) -> None:
    # Act
    result = CliRunner().invoke(
        app,
        ["status", "--job", job_id, "--amqp-url", AMQP_URL, "--redis-url", "redis+sentinel://s1"],
    )
    # Assert
    assert result.exit_code == 1
    assert "bad Redis URL: a Sentinel URL needs /master-name[/db]" in result.output
    assert "Traceback" not in result.output
