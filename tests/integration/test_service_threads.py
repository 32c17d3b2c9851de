"""The aggregator service applies its process-wide settings (FEDQ_TORCH_THREADS)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aggregator.runner import serve
from infra.settings import AggregatorSettings
from schemas import StalenessConfig, StrategyConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import job_backends

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=0, staleness=StalenessConfig(name="constant")
)


async def test_the_service_sets_torch_threads_from_its_settings(job_id: str) -> None:
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    async with job_backends("real", job_id, FEDBUFF_1):
        settings = AggregatorSettings(
            job=job_id,
            amqp_url=AMQP_URL,
            redis_url=REDIS_URL,
            idle_exit_seconds=0.5,
            torch_threads=wanted,
        )
        try:
            # Act: serve until idle (nothing to consume)
            await asyncio.wait_for(serve(settings), timeout=30)
            # Assert: the process's torch now uses the configured thread count
            assert torch.get_num_threads() == wanted
        finally:
            torch.set_num_threads(before)
