"""Broker fixtures: every contract test runs once in memory and once on the real RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from infra.amqp_broker import AmqpBroker, broker_user
from infra.memory_broker import MemoryBroker
from infra.protocols import Broker
from tests.conftest import AMQP_URL


@pytest.fixture(params=["memory", "amqp"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A fresh broker of each kind (RabbitMQ must be running: scripts/services.sh starts it)."""
    backend: Broker
    if request.param == "memory":
        # Plays the same connection user as the real broker's URL.
        backend = MemoryBroker(user_id=broker_user(AMQP_URL))
    else:
        backend = await AmqpBroker.connect(AMQP_URL, publish_timeout=10.0)
    yield backend
    await backend.close()


@pytest.fixture
async def job(broker: Broker, job_id: str) -> AsyncIterator[str]:
    """A declared job whose queues are deleted after the test."""
    await broker.declare_job(job_id)
    yield job_id
    await broker.delete_job(job_id)
