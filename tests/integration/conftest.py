"""Fixtures for the integration tests: a raw client of the shared Redis, and a private
RabbitMQ node for the fault tests."""

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from tests.integration.private_rabbitmq import _private_rabbitmq_node, private_rabbitmq

__all__ = ["_private_rabbitmq_node", "client", "private_rabbitmq"]


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    """A bytes-returning client of the shared Redis, closed after the test."""
    redis_client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    yield redis_client
    await redis_client.aclose()
