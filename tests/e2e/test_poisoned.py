"""One poisoned device out of five: robust aggregation keeps the clean accuracy, the mean does not.

The same experiment as `bench/poisoned.py`, cut to the cases that tell the defences apart:
five devices train digits-mlp for real in FedAvg rounds (each round holds every device once,
so a run repeats), device 0 publishes a corrupted delta. The real Aggregator and
DeviceAgents run in this process over the in-memory broker and store: what is tested is the
strategies' arithmetic under attack, and the contract suite already proves the memory
backends behave as RabbitMQ and Redis do.
"""

from __future__ import annotations

import pytest
import torch

from bench.poisoned import Case, run_case
from schemas import StrategyConfig, TrainingConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VERSIONS = 15
TRAINING = TrainingConfig(num_devices=5, dirichlet_alpha=1.0, seed=0)


def _strategy(**robust: object) -> StrategyConfig:
    return StrategyConfig.model_validate(
        {"name": "fedavg", "buffer_size": 5, "max_staleness": 100, **robust}
    )


async def _accuracy(attack: str | None, versions: int = VERSIONS, **robust: object) -> float:
    case = Case(attack, "test", _strategy(**robust))
    return await run_case(case, "digits-mlp", TRAINING, versions, max_seconds=60.0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


async def test_robust_aggregation_survives_a_scaled_attack_that_breaks_the_mean() -> None:
    # Arrange / act: a clean run, then the x-10 attack under each aggregation
    clean = await _accuracy(None)
    mean = await _accuracy("scaled")
    median = await _accuracy("scaled", aggregation="median")
    trimmed = await _accuracy("scaled", aggregation="trimmed_mean")
    clipped = await _accuracy("scaled", clip_norm=1.0)
    print(
        f"clean {clean:.3f}; scaled x-10 under mean {mean:.3f}, median {median:.3f}, "
        f"trimmed mean {trimmed:.3f}, clip 1.0 {clipped:.3f}"
    )
    # Assert: the run learns; the plain mean collapses; every defence stays near clean
    assert clean > 0.9
    assert mean < clean - 0.3
    for defended in (median, trimmed, clipped):
        assert defended > clean - 0.08


async def test_robust_aggregation_beats_the_mean_against_sign_flips() -> None:
    # Arrange / act: one flipped delta in five only slows the mean down (the round's mean
    # step is 3/5 of the honest one, and non-IID shards make it worse), so it takes a
    # longer run than the scaled attack for the gap to show
    clean = await _accuracy(None, versions=30, aggregation="median")
    mean = await _accuracy("sign", versions=30)
    median = await _accuracy("sign", versions=30, aggregation="median")
    print(f"clean (median) {clean:.3f}; sign flip under mean {mean:.3f}, median {median:.3f}")
    # Assert: robustness costs little when nobody attacks and the median holds under attack
    assert clean > 0.9
    assert median > clean - 0.08
    assert median > mean + 0.05
