"""The aggregator service sets its process's torch threads: FEDQ_TORCH_THREADS, or by model size."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aggregator.runner import SMALL_MODEL_BYTES, serve, torch_threads_for
from infra.settings import AggregatorSettings
from schemas import StalenessConfig, StrategyConfig, TensorSpec
from schemas.codec import schema_nbytes
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


async def test_a_small_models_service_folds_on_one_thread(job_id: str) -> None:
    # Without FEDQ_TORCH_THREADS: the tiny model's parallel regions would cost more than
    # they save, so the service runs torch on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    async with job_backends("real", job_id, FEDBUFF_1):
        settings = AggregatorSettings(
            job=job_id, amqp_url=AMQP_URL, redis_url=REDIS_URL, idle_exit_seconds=0.5
        )
        try:
            await asyncio.wait_for(serve(settings), timeout=30)
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("model_bytes", "configured", "threads"),
    [
        (1_000_000, None, 1),
        (SMALL_MODEL_BYTES - 1, None, 1),
        (SMALL_MODEL_BYTES, None, None),
        (500_000_000, None, None),
        (1_000_000, 3, 3),
        (500_000_000, 1, 1),
    ],
)
def test_threads_follow_the_setting_else_the_model_size(
    model_bytes: int, configured: int | None, threads: int | None
) -> None:
    assert torch_threads_for(model_bytes, configured) == threads


def test_a_schemas_bytes_count_every_element_at_its_dtypes_size() -> None:
    schema = {
        "w": TensorSpec(shape=(3, 4), dtype="float32"),
        "h": TensorSpec(shape=(5,), dtype="bfloat16"),
        "n": TensorSpec(shape=(), dtype="int64"),
        "e": TensorSpec(shape=(0, 7), dtype="float64"),
    }
    assert schema_nbytes(schema) == 12 * 4 + 5 * 2 + 8 + 0
