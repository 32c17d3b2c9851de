"""Edge aggregation math: the partial update, its id, and that the root then equals flat."""

from __future__ import annotations

import uuid

import pytest
import torch
from torch.testing import assert_close

from aggregator.strategies import Contribution, FedBuff, Receipt
from aggregator.strategies.hierarchical import combine_partial, partial_update_id
from aggregator.strategies.server_optimizers import PlainStep
from aggregator.strategies.staleness import constant

pytestmark = pytest.mark.unit


def t(*values: float) -> torch.Tensor:
    """Build a float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    ("parts", "expected_w", "expected_n"),
    [
        # one update passes through unchanged
        ([(t(1.0, 2.0), 7)], t(1.0, 2.0), 7),
        # equal counts: the plain mean
        ([(t(1.0, 0.0), 5), (t(3.0, 4.0), 5)], t(2.0, 2.0), 10),
        # 10 and 30 samples: weights 1/4 and 3/4
        ([(t(1.0, 2.0), 10), (t(-1.0, 6.0), 30)], t(-0.5, 5.0), 40),
        # three updates: (1*1 + 2*4 + 1*-2) / 4
        ([(t(1.0, 0.0), 1), (t(4.0, 0.0), 2), (t(-2.0, 8.0), 1)], t(1.75, 2.0), 4),
    ],
)
def test_combine_partial_is_the_sample_weighted_mean_with_the_summed_count(
    parts: list[tuple[torch.Tensor, int]], expected_w: torch.Tensor, expected_n: int
) -> None:
    # Arrange
    deltas = [({"w": w}, n) for w, n in parts]

    # Act
    delta, num_samples = combine_partial(deltas)

    # Assert
    assert_close(delta["w"], expected_w)
    assert num_samples == expected_n


def test_combine_partial_keeps_dtypes_and_passes_non_floating_entries_on() -> None:
    # Arrange: a half-precision weight and an integer counter
    parts = [
        ({"w": t(1.0).half(), "n": torch.tensor(3)}, 1),
        ({"w": t(2.0).half(), "n": torch.tensor(9)}, 3),
    ]

    # Act
    delta, _ = combine_partial(parts)

    # Assert: the mean is computed in float32 and returned as float16; the counter is the first
    assert delta["w"].dtype == torch.float16
    assert_close(delta["w"], t(1.75).half())
    assert delta["n"].item() == 3


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([], ValueError),
        ([({"w": t(1.0)}, 1), ({"v": t(1.0)}, 1)], KeyError),
        ([({"w": t(1.0)}, 1), ({"w": t(1.0, 2.0)}, 1)], ValueError),
        ([({"w": t(1.0)}, 0)], ValueError),
    ],
)
def test_combine_partial_refuses_bad_parts(
    parts: list[tuple[dict[str, torch.Tensor], int]], error: type[Exception]
) -> None:
    with pytest.raises(error):
        combine_partial(parts)


def test_partial_update_id_depends_on_the_set_of_ids_only() -> None:
    # Arrange
    ids = [str(uuid.uuid4()) for _ in range(4)]

    # Act
    forward, backward = partial_update_id(ids), partial_update_id(reversed(ids))

    # Assert: order-free, a valid uuid, and another set gives another id
    assert forward == backward
    assert str(uuid.UUID(forward)) == forward
    assert partial_update_id(ids[:3]) != forward
    with pytest.raises(ValueError):
        partial_update_id([])


def _fedbuff(k: int) -> FedBuff:
    return FedBuff(k, constant, 100, PlainStep(1.0), "samples")


def _contribution(update_id: str, delta: dict[str, torch.Tensor], n: int) -> Contribution:
    receipt = Receipt(update_id=update_id, device_id="d", staleness=0, num_samples=n)
    return Contribution(receipt=receipt, base_version=0, delta=delta)


@pytest.mark.parametrize("groups", [[3, 3], [2, 4], [1, 1, 4], [6]])
def test_fedbuff_over_partials_equals_fedbuff_over_the_device_updates(groups: list[int]) -> None:
    # Arrange: six device updates with distinct deltas and sample counts, split into groups
    generator = torch.Generator().manual_seed(0)
    updates = [({"w": torch.randn(5, generator=generator)}, n) for n in (3, 10, 1, 7, 20, 4)]
    x0 = {"w": torch.randn(5, generator=generator)}
    flat, hierarchical = {"w": x0["w"].clone()}, {"w": x0["w"].clone()}
    flat_strategy, root = _fedbuff(len(updates)), _fedbuff(len(groups))

    # Act: the flat aggregation, then one partial per group folded by the root
    for i, (delta, n) in enumerate(updates):
        flat_strategy.add(flat, _contribution(f"u{i}", delta, n))
    start = 0
    for g, size in enumerate(groups):
        delta, n = combine_partial(updates[start : start + size])
        root.add(hierarchical, _contribution(f"p{g}", delta, n))
        start += size

    # Assert
    assert_close(hierarchical["w"], flat["w"])
