"""Shared fixtures: service URLs and a unique job id per test, cleaned up afterwards."""

from __future__ import annotations

import os
import uuid

import pytest

AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def job_id(request: pytest.FixtureRequest) -> str:
    """A job id no other test (or earlier run) uses, so tests can share the real services."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:32].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"
