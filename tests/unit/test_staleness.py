"""Staleness functions s(tau) against hand-computed tables."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from aggregator.strategies.staleness import (
    constant,
    hinge,
    inverse_sqrt,
    polynomial,
    staleness_function,
    within_max_staleness,
)
from schemas.messages import StalenessConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tau", [0, 1, 5, 1000])
def test_constant_is_one(tau: int) -> None:
    # Act / Assert
    assert constant(tau) == 1.0


@pytest.mark.parametrize(
    ("tau", "a", "expected"),
    [
        (0, 0.5, 1.0),  # 1^-0.5
        (3, 0.5, 0.5),  # 4^-0.5
        (8, 0.5, 1 / 3),  # 9^-0.5
        (1, 1.0, 0.5),  # 2^-1
        (4, 1.0, 0.2),  # 5^-1
        (3, 2.0, 1 / 16),  # 4^-2
        (7, 0.0, 1.0),  # a = 0 switches weighting off
    ],
)
def test_polynomial(tau: int, a: float, expected: float) -> None:
    # Act
    result = polynomial(tau, a)

    # Assert
    assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tau", "a", "b", "expected"),
    [
        (0, 10.0, 4, 1.0),
        (4, 10.0, 4, 1.0),  # tau <= b
        (5, 10.0, 4, 1 / 11),  # 1 / (10 * 1 + 1)
        (6, 10.0, 4, 1 / 21),  # 1 / (10 * 2 + 1)
        (2, 0.5, 0, 0.5),  # 1 / (0.5 * 2 + 1)
        (9, 0.0, 0, 1.0),  # a = 0: flat
    ],
)
def test_hinge(tau: int, a: float, b: int, expected: float) -> None:
    # Act
    result = hinge(tau, a, b)

    # Assert
    assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tau", "expected"), [(0, 1.0), (3, 0.5), (8, 1 / 3), (24, 0.2), (1, 1 / math.sqrt(2))]
)
def test_inverse_sqrt(tau: int, expected: float) -> None:
    # Act
    result = inverse_sqrt(tau)

    # Assert
    assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda: constant(-1),
        lambda: polynomial(-1, 0.5),
        lambda: hinge(-1, 10.0, 4),
        lambda: inverse_sqrt(-2),
        lambda: within_max_staleness(-1, 5),
    ],
)
def test_negative_tau_is_refused(call: Callable[[], object]) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        call()


@pytest.mark.parametrize(
    ("tau", "max_staleness", "expected"),
    [(0, 0, True), (1, 0, False), (3, 3, True), (4, 3, False), (0, 20, True)],
)
def test_within_max_staleness(tau: int, max_staleness: int, expected: bool) -> None:
    # Act / Assert
    assert within_max_staleness(tau, max_staleness) is expected


@pytest.mark.parametrize(
    ("cfg", "tau", "expected"),
    [
        (StalenessConfig(name="constant"), 3, 1.0),
        (StalenessConfig(name="polynomial", a=0.5), 3, 0.5),  # 4^-0.5
        (StalenessConfig(name="polynomial", a=1.0), 9, 0.1),  # 10^-1
        (StalenessConfig(name="hinge", a=10.0, b=1), 3, 1 / 21),  # 1 / (10 * 2 + 1)
        (StalenessConfig(name="hinge", a=10.0, b=3), 3, 1.0),  # tau <= b
        (StalenessConfig(name="sqrt"), 3, 0.5),  # 1 / sqrt(4)
    ],
)
def test_staleness_function_binds_the_config(
    cfg: StalenessConfig, tau: int, expected: float
) -> None:
    # Arrange
    s = staleness_function(cfg)

    # Act
    result = s(tau)

    # Assert
    assert result == pytest.approx(expected)
