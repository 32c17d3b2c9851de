"""The lockstep federation: the real agents and aggregator, reproducible bit for bit."""

from __future__ import annotations

import pytest

from fedq.lockstep import LockstepSpec, run_lockstep
from schemas import StrategyConfig, TrainingConfig
from schemas.messages import Codec

pytestmark = pytest.mark.unit


def _spec(codec: Codec = "none", seed: int = 0) -> LockstepSpec:
    return LockstepSpec(
        task="digits-mlp",
        devices=3,
        training=TrainingConfig(local_epochs=1, seed=seed),
        strategy=StrategyConfig(name="fedbuff", buffer_size=2),
        versions=4,
        codec=codec,
        eval_every=2,
    )


async def test_the_same_spec_gives_the_same_model_bit_for_bit() -> None:
    # Arrange / act
    first = await run_lockstep(_spec())
    second = await run_lockstep(_spec())

    # Assert
    assert first.model_sha256 == second.model_sha256
    assert first.curve == second.curve
    assert (first.versions, first.updates_applied, first.updates_rejected) == (4, 8, 0)


async def test_the_seed_and_the_codec_change_the_result() -> None:
    # Arrange / act
    base = await run_lockstep(_spec())
    other_seed = await run_lockstep(_spec(seed=1))
    sparse = await run_lockstep(_spec(codec="topk:0.1"))

    # Assert: a different run, and top-k really travels smaller
    assert len({base.model_sha256, other_seed.model_sha256, sparse.model_sha256}) == 3
    assert sparse.bytes_per_update < base.bytes_per_update / 3


async def test_staleness_follows_the_round_robin_schedule() -> None:
    # Arrange: 3 devices, K=2: two other updates land between a fetch and the next update
    result = await run_lockstep(_spec())

    # Assert: the first round starts from version 0, later ones are 1 version behind
    assert 0 < result.mean_staleness <= (3 - 1) / 2
    assert [version for version, _ in result.curve] == [2, 4]
