"""`fedq dead list/requeue/purge` against the real RabbitMQ: nothing is lost on the way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from fedq.cli import app
from infra.amqp_broker import AmqpBroker
from infra.dead_letters import requeue_headers
from tests.conftest import AMQP_URL

pytestmark = pytest.mark.integration
URL = ["--amqp-url", AMQP_URL]
WAIT = 10.0
# message id -> reason the "aggregator" gives it.
REASONS = {"u-stale-1": "too_stale", "u-hash-1": "hash_mismatch", "u-hash-2": "hash_mismatch"}


async def _with_broker(job: str, work: Any) -> Any:
    broker = await AmqpBroker.connect(AMQP_URL, publish_timeout=10.0)
    try:
        return await work(broker)
    finally:
        await broker.close()


async def _dead_letter_three(broker: AmqpBroker, job: str) -> None:
    for message_id in REASONS:
        headers = {"job": job, "device_id": f"dev-{message_id}", "base_version": 0}
        await broker.publish_raw(job, message_id.encode(), headers=headers, message_id=message_id)
    deliveries = broker.consume(job, prefetch=10, idle_timeout=2.0)
    async with asyncio.timeout(WAIT):
        for _ in REASONS:
            delivery = await anext(deliveries)
            await delivery.dead_letter(REASONS[delivery.message_id or ""], "seen in a test")
    await deliveries.aclose()


async def _take_updates(broker: AmqpBroker, job: str) -> list[tuple[str | None, dict[str, Any]]]:
    """Ack and return (id, headers) of every update now in the job's update queue."""
    taken = []
    async for delivery in broker.consume(job, prefetch=10, idle_timeout=1.0):
        taken.append((delivery.message_id, dict(delivery.headers)))
        await delivery.ack()
    return taken


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def dead_job(job_id: str) -> Iterator[str]:
    async def setup(broker: AmqpBroker) -> None:
        await broker.declare_job(job_id)
        await _dead_letter_three(broker, job_id)

    asyncio.run(_with_broker(job_id, setup))
    yield job_id

    async def teardown(broker: AmqpBroker) -> None:
        await broker.delete_job(job_id)

    asyncio.run(_with_broker(job_id, teardown))


def _listed(cli: CliRunner, job: str) -> list[dict[str, Any]]:
    # The aggregator's dead-letter copies are confirmed before its ack: they are all there.
    result = cli.invoke(app, ["dead", "list", "--job", job, "--json", *URL])
    assert result.exit_code == 0, result.output
    letters: list[dict[str, Any]] = json.loads(result.output)
    return letters


def test_list_is_not_destructive_and_keeps_the_order(cli: CliRunner, dead_job: str) -> None:
    first = _listed(cli, dead_job)
    again = _listed(cli, dead_job)

    assert [(d["message_id"], d["reason"]) for d in first] == list(REASONS.items())
    assert again == first
    assert first[0]["detail"] == "seen in a test"
    assert first[0]["headers"]["device_id"] == "dev-u-stale-1"
    assert first[0]["bytes"] == len(b"u-stale-1")
    text = cli.invoke(app, ["dead", "list", "--job", dead_job, *URL])
    assert text.exit_code == 0, text.output
    assert "3 dead letters" in text.output
    assert "hash_mismatch: 2, too_stale: 1" in text.output


def test_requeue_one_reason_then_purge_the_rest(cli: CliRunner, dead_job: str) -> None:
    # Act: requeue the stale one
    requeued = cli.invoke(
        app, ["dead", "requeue", "--job", dead_job, "--reason", "too_stale", *URL]
    )

    # Assert: it is an update again, with the original headers and without the dead-letter ones
    assert requeued.exit_code == 0, requeued.output
    assert "requeued 1 of 3" in requeued.output
    updates = asyncio.run(_with_broker(dead_job, lambda b: _take_updates(b, dead_job)))
    assert [message_id for message_id, _ in updates] == ["u-stale-1"]
    headers = updates[0][1]
    assert headers["device_id"] == "dev-u-stale-1"
    assert headers["base_version"] == 0
    assert not [key for key in headers if key.startswith("x-fedq-")]
    assert [d["message_id"] for d in _listed(cli, dead_job)] == ["u-hash-1", "u-hash-2"]

    # Act: purge the rest
    purged = cli.invoke(app, ["dead", "purge", "--job", dead_job, *URL])

    # Assert
    assert purged.exit_code == 0, purged.output
    assert "purged 2 of 2" in purged.output
    assert _listed(cli, dead_job) == []


def test_purge_of_another_reason_leaves_these(cli: CliRunner, dead_job: str) -> None:
    purged = cli.invoke(app, ["dead", "purge", "--job", dead_job, "--reason", "nope", *URL])

    assert purged.exit_code == 0, purged.output
    assert "purged 0 of 3" in purged.output
    assert len(_listed(cli, dead_job)) == 3


def test_missing_job_is_a_one_line_error(cli: CliRunner, job_id: str) -> None:
    result = cli.invoke(app, ["dead", "list", "--job", job_id, *URL])

    assert result.exit_code == 1
    assert "job not found" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_requeue_headers_drop_dead_letter_and_broker_marks() -> None:
    headers = {
        "device_id": "d",
        "x-fedq-reason": "too_stale",
        "x-death": [],
        "x-first-death-reason": "delivery_limit",
        "x-delivery-count": 3,
    }

    assert requeue_headers(headers) == {"device_id": "d"}


async def test_a_drain_past_its_deadline_loses_nothing_and_keeps_the_connection(
    dead_job: str,
) -> None:
    # Arrange: one connection for everything, as a test or a tool holds it
    broker = await AmqpBroker.connect(AMQP_URL, publish_timeout=10.0)
    try:
        # Act: a drain whose deadline has passed before its first get, then at once more
        # calls on the same connection (test_node_restart's kill case is the one that caught
        # a drain cutting off a slow get, which could bring the connection down)
        cut_short = await broker.drain_dead_letters(dead_job, timeout=0.0)
        depth = await broker.queue_depth(dead_job)
        everything = await broker.drain_dead_letters(dead_job)
    finally:
        await broker.close()
    # Assert: the first drain took nothing away; the second has all three
    assert cut_short == []
    assert depth == (0, 0)
    assert sorted(letter.message_id or "" for letter in everything) == sorted(REASONS)
