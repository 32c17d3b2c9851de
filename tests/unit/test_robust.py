"""Norm clipping, coordinate median, trimmed mean and the strategies that use them."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from aggregator.strategies import Contribution, FedAsync, FedAvg, FedBuff, Receipt, build_strategy
from aggregator.strategies.robust import (
    StackedBuffer,
    clip_by_norm_,
    coordinate_median,
    global_norm,
    trim_count,
    trimmed_mean,
)
from aggregator.strategies.server_optimizers import server_optimizer
from aggregator.strategies.staleness import staleness_function
from schemas.messages import StalenessConfig, StrategyConfig

pytestmark = pytest.mark.unit

CONSTANT = staleness_function(StalenessConfig(name="constant"))


def t(*values: float) -> torch.Tensor:
    """Build a float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


def contrib(update_id: str, delta: torch.Tensor, *, n: int = 1) -> Contribution:
    """Build a one-key ("w") contribution from a fresh base (tau = 0)."""
    return Contribution(Receipt(update_id, f"dev-{update_id}", 0, n), 0, {"w": delta})


def fedbuff(k: int, **robust: object) -> FedBuff:
    """Build FedBuff with constant staleness and no server optimizer."""
    cfg = StrategyConfig(name="fedbuff", buffer_size=k, **robust)  # type: ignore[arg-type]
    return FedBuff.from_config(cfg)


# --- clipping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "max_norm", "factor", "a_out", "b_out"),
    [
        # |(3, 4)| = 5 over two keys (global, not per key): to 2.5 halves every entry
        ((3.0,), (4.0,), 2.5, 0.5, (1.5,), (2.0,)),
        # exactly at the bound: untouched
        ((3.0,), (4.0,), 5.0, 1.0, (3.0,), (4.0,)),
        # within: untouched
        ((3.0,), (4.0,), 10.0, 1.0, (3.0,), (4.0,)),
        # |(6, -8, 0)| = 10 to 1: x 0.1
        ((6.0, -8.0), (0.0,), 1.0, 0.1, (0.6, -0.8), (0.0,)),
        # zero delta: nothing to scale
        ((0.0, 0.0), (0.0,), 1.0, 1.0, (0.0, 0.0), (0.0,)),
    ],
    ids=["halve", "at-bound", "within", "tenth", "zero"],
)
def test_clip_by_norm(
    a: tuple[float, ...],
    b: tuple[float, ...],
    max_norm: float,
    factor: float,
    a_out: tuple[float, ...],
    b_out: tuple[float, ...],
) -> None:
    # Arrange: an int entry must neither count towards the norm nor be scaled
    tensors = {"a": t(*a), "b": t(*b), "n": torch.tensor([100])}

    # Act
    applied = clip_by_norm_(tensors, max_norm)

    # Assert
    assert applied == pytest.approx(factor)
    assert_close(tensors["a"], t(*a_out))
    assert_close(tensors["b"], t(*b_out))
    assert tensors["n"].item() == 100


def test_global_norm_does_not_overflow_float32() -> None:
    # Arrange: each square (1e40) overflows float32
    tensors = {"w": t(1e20, 1e20)}

    # Act / Assert
    assert global_norm(tensors) == pytest.approx(1e20 * 2**0.5)


# --- reducers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        # odd count: the middle value per coordinate
        ([(1.0, 5.0), (2.0, -1.0), (100.0, 0.0)], (2.0, 0.0)),
        # even count: mean of the two middle values, (2 + 3) / 2 and (0 + 1) / 2
        ([(1.0, 1.0), (2.0, 0.0), (3.0, -9.0), (1e6, 5.0)], (2.5, 0.5)),
        # a single delta is its own median
        ([(7.0, -7.0)], (7.0, -7.0)),
    ],
    ids=["odd", "even", "one"],
)
def test_coordinate_median(
    columns: list[tuple[float, float]], expected: tuple[float, float]
) -> None:
    # Arrange
    deltas = [{"w": t(*c), "n": torch.tensor(3)} for c in columns]

    # Act
    out = coordinate_median(deltas)

    # Assert: integer entries are structure, not parameters, and stay out
    assert set(out) == {"w"}
    assert_close(out["w"], t(*expected))


@pytest.mark.parametrize(
    ("columns", "fraction", "expected"),
    [
        # n=5, 0.2 -> drop 1 each end: mean(2, 3, 4) = 3 and mean(0, 0, 1) = 1/3
        ([(1.0, 0.0), (2.0, 1.0), (3.0, -50.0), (4.0, 0.0), (100.0, 9.0)], 0.2, (3.0, 1 / 3)),
        # n=4, 0.2 -> floor(0.8) = 0: the plain mean
        ([(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (10.0, 4.0)], 0.2, (4.0, 1.0)),
        # n=4, 0.25 -> drop 1 each end: mean(2, 3) and mean(0, 0)
        ([(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (10.0, 4.0)], 0.25, (2.5, 0.0)),
        # n=3, 0 -> the plain mean
        ([(1.0, 3.0), (2.0, 3.0), (6.0, 6.0)], 0.0, (3.0, 4.0)),
    ],
    ids=["n5-0.2", "n4-0.2-floor", "n4-0.25", "n3-none"],
)
def test_trimmed_mean(
    columns: list[tuple[float, float]], fraction: float, expected: tuple[float, float]
) -> None:
    # Arrange
    deltas = [{"w": t(*c)} for c in columns]

    # Act
    out = trimmed_mean(deltas, fraction)

    # Assert
    assert_close(out["w"], t(*expected))


@pytest.mark.parametrize(
    ("n", "fraction", "k"), [(5, 0.2, 1), (10, 0.2, 2), (4, 0.2, 0), (9, 0.49, 4)]
)
def test_trim_count(n: int, fraction: float, k: int) -> None:
    assert trim_count(n, fraction) == k


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7])
def test_trim_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean([{"w": t(1.0)}], fraction)


def test_reducers_refuse_mismatched_shapes_and_empty() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        coordinate_median([{"w": t(1.0, 2.0)}, {"w": t(1.0)}])
    with pytest.raises(KeyError):
        coordinate_median([{"w": t(1.0)}, {"v": t(1.0)}])
    with pytest.raises(ValueError, match="empty"):
        coordinate_median([])


def test_half_precision_deltas_reduce_in_float32() -> None:
    # Arrange
    deltas = [{"w": torch.tensor([v], dtype=torch.float16)} for v in (1.0, 2.0, 4.0)]

    # Act
    out = coordinate_median(deltas)

    # Assert
    assert out["w"].dtype == torch.float32
    assert_close(out["w"], t(2.0))


# --- the stacking buffer ------------------------------------------------------------------


def test_stacked_buffer_keeps_a_scaled_copy_and_refuses_a_duplicate() -> None:
    # Arrange
    buffer = StackedBuffer(coordinate_median)
    model = {"w": t(0.0)}
    delta = t(4.0)

    # Act
    buffer.add(model, contrib("a", delta), weight=100.0, factor=0.5)
    with pytest.raises(ValueError, match="already in the buffer"):
        buffer.add(model, contrib("a", delta), weight=1.0)
    reduced, receipts = buffer.take()

    # Assert: the factor applies, the weight does not, the caller's delta is untouched
    assert_close(reduced["w"], t(2.0))
    assert_close(delta, t(4.0))
    assert [r.update_id for r in receipts] == ["a"]
    assert len(buffer) == 0


# --- strategies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("robust", "expected"),
    [
        # mean of 1, 2, 3, -1000 = -248.5: one outlier drags the model far away
        ({}, -248.5),
        # median: (1 + 2) / 2 ... sorted -1000, 1, 2, 3 -> middles 1 and 2
        ({"aggregation": "median"}, 1.5),
        # trimmed mean, K=4, 0.25: drop -1000 and 3 -> mean(1, 2)
        ({"aggregation": "trimmed_mean", "trim_fraction": 0.25}, 1.5),
        # clipping to 3 bounds the outlier at -3: (1 + 2 + 3 - 3) / 4
        ({"clip_norm": 3.0}, 0.75),
    ],
    ids=["mean", "median", "trimmed", "clip"],
)
def test_fedbuff_with_one_outlier(robust: dict[str, object], expected: float) -> None:
    # Arrange
    strategy = fedbuff(4, **robust)
    model = {"w": t(0.0)}

    # Act
    results = [
        strategy.add(model, contrib(uid, t(v)))
        for uid, v in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("x", -1000.0)]
    ]

    # Assert
    assert results[:3] == [None, None, None]
    assert [r.update_id for r in results[3] or []] == ["a", "b", "c", "x"]
    assert_close(model["w"], t(expected))


def test_fedbuff_median_ignores_sample_weights_but_not_staleness() -> None:
    # Arrange: s(tau) = 1 / (tau + 1); the stale update's 6 counts as 3
    strategy = FedBuff(
        3,
        staleness_function(StalenessConfig(name="polynomial", a=1.0)),
        10,
        server_optimizer(StrategyConfig()),
        aggregation="median",
    )
    model = {"w": t(0.0)}
    stale = Contribution(Receipt("s", "dev-s", 1, 1), 0, {"w": t(6.0)})

    # Act
    strategy.add(model, contrib("a", t(1.0), n=1000))
    strategy.add(model, contrib("b", t(5.0), n=1))
    strategy.add(model, stale)

    # Assert: median(1, 5, 3) = 3 whatever the sample counts
    assert_close(model["w"], t(3.0))


def test_fedbuff_reset_drops_the_stacked_deltas() -> None:
    # Arrange
    strategy = fedbuff(2, aggregation="median")
    model = {"w": t(0.0)}
    strategy.add(model, contrib("a", t(100.0)))

    # Act
    strategy.reset()
    strategy.add(model, contrib("b", t(1.0)))
    strategy.add(model, contrib("c", t(3.0)))

    # Assert
    assert strategy.pending() == []
    assert_close(model["w"], t(2.0))


def test_fedavg_round_with_median_and_clip() -> None:
    # Arrange: clip to 4 turns 40 into 4 before the median; median(1, 2, 4) = 2
    strategy = FedAvg(3, server_optimizer(StrategyConfig()), aggregation="median", clip_norm=4.0)
    model = {"w": t(0.0)}

    # Act
    for uid, v in [("a", 1.0), ("b", 2.0), ("x", 40.0)]:
        strategy.add(model, contrib(uid, t(v)))

    # Assert
    assert_close(model["w"], t(2.0))


def test_fedasync_clip_bounds_the_step_and_leaves_the_delta() -> None:
    # Arrange: alpha 0.5, tau 0; delta (30, 40) has norm 50, clipped to norm 5 -> (3, 4)
    strategy = FedAsync(0.5, CONSTANT, 10, clip_norm=5.0)
    model = {"w": t(0.0, 0.0)}
    delta = t(30.0, 40.0)
    contribution = Contribution(Receipt("a", "dev-a", 0, 1), 0, {"w": delta}, {"w": t(0.0, 0.0)})

    # Act
    strategy.add(model, contribution)

    # Assert: x = 0.5 x 0 + 0.5 (0 + (3, 4))
    assert_close(model["w"], t(1.5, 2.0))
    assert_close(delta, t(30.0, 40.0))


def test_build_strategy_passes_the_robust_fields() -> None:
    # Arrange
    cfg = StrategyConfig(
        name="fedbuff", aggregation="trimmed_mean", trim_fraction=0.1, clip_norm=2.0
    )

    # Act
    strategy = build_strategy(cfg)

    # Assert
    assert isinstance(strategy, FedBuff)
    assert strategy.aggregation == "trimmed_mean"
    assert strategy.clip_norm == 2.0


def test_default_config_keeps_todays_behaviour() -> None:
    cfg = StrategyConfig()
    assert (cfg.clip_norm, cfg.aggregation, cfg.trim_fraction) == (None, "mean", 0.2)
