"""The key-matched tensor arithmetic, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from aggregator.strategies.aggregate import (
    accumulate_,
    added,
    apply_delta_,
    check_keys,
    mix_,
    scale_,
    scaled,
    zeros_like,
)

pytestmark = pytest.mark.unit


def t(*values: float) -> torch.Tensor:
    """Build a float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


def test_accumulate_adds_weighted_deltas_in_place() -> None:
    # Arrange
    acc = {"w": t(0.0, 0.0)}
    original = acc["w"]

    # Act
    accumulate_(acc, {"w": t(1.0, 2.0)}, 3.0)  # [3, 6]
    accumulate_(acc, {"w": t(-1.0, 0.5)}, 2.0)  # [3 - 2, 6 + 1]

    # Assert
    assert_close(acc["w"], t(1.0, 7.0))
    assert acc["w"] is original


@pytest.mark.parametrize(
    ("model", "delta", "scale", "expected"),
    [
        ((1.0, 1.0), (2.0, -4.0), 0.5, (2.0, -1.0)),
        ((1.0, 1.0), (2.0, -4.0), 1.0, (3.0, -3.0)),
        ((0.0, 5.0), (1.0, 1.0), -2.0, (-2.0, 3.0)),
    ],
)
def test_apply_delta(
    model: tuple[float, ...], delta: tuple[float, ...], scale: float, expected: tuple[float, ...]
) -> None:
    # Arrange
    params = {"w": t(*model)}

    # Act
    apply_delta_(params, {"w": t(*delta)}, scale)

    # Assert
    assert_close(params["w"], t(*expected))


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(0.0, (0.0, 10.0)), (0.25, (2.5, 7.5)), (0.5, (5.0, 5.0)), (1.0, (10.0, 0.0))],
)
def test_mix(alpha: float, expected: tuple[float, ...]) -> None:
    # Arrange: model [0, 10], target [10, 0]
    params = {"w": t(0.0, 10.0)}

    # Act
    mix_(params, {"w": t(10.0, 0.0)}, alpha)

    # Assert: (1 - alpha) model + alpha target
    assert_close(params["w"], t(*expected))


def test_zeros_like_keeps_floats_in_accumulation_dtype() -> None:
    # Arrange
    model = {
        "half": torch.ones(2, dtype=torch.float16),
        "double": torch.ones(3, dtype=torch.float64),
        "count": torch.tensor(5, dtype=torch.int64),
    }

    # Act
    zeros = zeros_like(model)

    # Assert: half sums are kept in float32; the integer counter is not summed at all
    assert set(zeros) == {"half", "double"}
    assert_close(zeros["half"], torch.zeros(2, dtype=torch.float32))
    assert_close(zeros["double"], torch.zeros(3, dtype=torch.float64))


def test_scaled_and_scale() -> None:
    # Arrange
    tensors = {"w": t(2.0, -4.0), "n": torch.tensor(3)}

    # Act
    copy = scaled(tensors, 0.5)
    scale_(tensors, 3.0)

    # Assert
    assert_close(copy, {"w": t(1.0, -2.0)})
    assert_close(tensors["w"], t(6.0, -12.0))
    assert int(tensors["n"]) == 3


def test_added_builds_new_tensors() -> None:
    # Arrange
    base = {"w": t(1.0, 2.0), "n": torch.tensor(4)}
    delta = {"w": t(0.5, -1.0), "n": torch.tensor(9)}

    # Act
    result = added(base, delta)

    # Assert: only floating entries, and the base is unchanged
    assert_close(result, {"w": t(1.5, 1.0)})
    assert_close(base["w"], t(1.0, 2.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_entries_keep_the_model_value(dtype: torch.dtype) -> None:
    # Arrange
    model = {"w": t(1.0), "count": torch.tensor([1], dtype=dtype)}
    other = {"w": t(3.0), "count": torch.tensor([0], dtype=dtype)}

    # Act
    apply_delta_(model, other, 1.0)
    mix_(model, other, 0.5)

    # Assert: w = 1 + 3 = 4, then 0.5 * 4 + 0.5 * 3 = 3.5; the counter is untouched
    assert_close(model["w"], t(3.5))
    assert_close(model["count"], torch.tensor([1], dtype=dtype))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"a": t(1.0)}, "missing key 'b'"),
        ({"a": t(1.0), "b": t(1.0), "c": t(1.0)}, "unexpected key 'c'"),
        ({"a": t(1.0), "c": t(1.0)}, "missing key 'b'"),
    ],
)
def test_key_mismatch_raises_and_leaves_the_model_untouched(
    other: dict[str, torch.Tensor], message: str
) -> None:
    # Arrange
    model = {"a": t(0.0), "b": t(0.0)}

    # Act / Assert
    for fold in (apply_delta_, mix_, accumulate_):
        with pytest.raises(KeyError, match=message):
            fold(model, other, 1.0)
    assert_close(model, {"a": t(0.0), "b": t(0.0)})


def test_shape_mismatch_raises_instead_of_broadcasting() -> None:
    # Arrange
    model = {"w": t(0.0, 0.0, 0.0)}

    # Act / Assert
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        apply_delta_(model, {"w": t(1.0)}, 1.0)
    assert_close(model["w"], t(0.0, 0.0, 0.0))


def test_check_keys_names_the_key() -> None:
    # Act / Assert
    check_keys({"a": 1, "b": 2}, ["b", "a"])
    with pytest.raises(KeyError, match="missing key 'b'"):
        check_keys(["a", "b"], ["a"])
    with pytest.raises(KeyError, match="unexpected key 'z'"):
        check_keys(["a"], ["a", "z"])


def test_half_precision_model_keeps_its_dtype() -> None:
    # Arrange
    model = {"w": torch.tensor([1.0], dtype=torch.float16)}

    # Act: a float32 step into a float16 model
    apply_delta_(model, {"w": t(1.0)}, 0.5)
    mix_(model, {"w": torch.tensor([3.5], dtype=torch.float32)}, 0.5)

    # Assert: 1 + 0.5 = 1.5, then 0.5 * 1.5 + 0.5 * 3.5 = 2.5
    assert model["w"].dtype == torch.float16
    assert_close(model["w"], torch.tensor([2.5], dtype=torch.float16))
