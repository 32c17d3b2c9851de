"""WeightedBuffer starts each sum as w * delta and reuses the last mean's storage."""

from __future__ import annotations

import pytest
import torch

from aggregator.strategies import Contribution, Receipt
from aggregator.strategies.base import WeightedBuffer

pytestmark = pytest.mark.unit


def _contribution(update_id: str, delta: dict[str, torch.Tensor]) -> Contribution:
    receipt = Receipt(update_id=update_id, device_id="d", staleness=0, num_samples=1)
    return Contribution(receipt=receipt, base_version=0, delta=delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_consecutive_buffers_give_their_own_weighted_means(dtype: torch.dtype) -> None:
    # Arrange
    model = {"w": torch.zeros(3, dtype=dtype), "b": torch.zeros(1, dtype=dtype)}
    buffer = WeightedBuffer()
    rounds = [
        [(1.0, 2.0, torch.tensor([1.0, 2.0, 3.0])), (3.0, 1.0, torch.tensor([-1.0, 0.0, 1.0]))],
        [(2.0, 0.5, torch.tensor([4.0, 4.0, 4.0])), (2.0, 1.0, torch.tensor([0.0, 2.0, -2.0]))],
    ]
    storage: list[int] = []
    for index, updates in enumerate(rounds):
        for n, (weight, factor, w) in enumerate(updates):
            delta = {"w": w.to(dtype), "b": torch.ones(1, dtype=dtype)}
            # Act
            buffer.add(model, _contribution(f"u{index}-{n}", delta), weight, factor)
        mean, receipts = buffer.take_mean()
        # Assert: sum(w_i f_i delta_i) / sum(w_i), in the accumulation dtype
        total = torch.zeros(3, dtype=torch.float64)
        for weight, factor, w in updates:
            total += weight * factor * w.double()
        expected = total / sum(u[0] for u in updates)
        accumulation = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean["w"].dtype == accumulation
        torch.testing.assert_close(mean["w"], expected.to(accumulation))
        assert [r.update_id for r in receipts] == [f"u{index}-0", f"u{index}-1"]
        storage.append(mean["w"].data_ptr())
    # The second buffer's sum lives in the first mean's storage: no fresh allocation.
    assert storage[0] == storage[1]


def test_a_key_first_seen_later_gets_its_own_sum() -> None:
    # Arrange: a partial update carrying only "b", then a full one
    model = {"w": torch.zeros(2), "b": torch.zeros(1)}
    buffer = WeightedBuffer()
    partial = Contribution(
        receipt=Receipt(update_id="p", device_id="d", staleness=0, num_samples=1),
        base_version=0,
        delta={"b": torch.tensor([2.0])},
        partial=True,
    )
    # Act
    buffer.add(model, partial, 1.0)
    buffer.add(model, _contribution("f", {"w": torch.tensor([1.0, 3.0]), "b": torch.ones(1)}), 1.0)
    mean, _ = buffer.take_mean()
    # Assert: "w" averaged over the one update that carried it, "b" over both
    torch.testing.assert_close(mean["w"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(mean["b"], torch.tensor([1.5]))
