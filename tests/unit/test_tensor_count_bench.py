"""bench/tensor_count.py times every step and prints a summary line run_all's parser reads."""

from __future__ import annotations

import pytest

from bench.tensor_count import BASE_TENSORS, compare, measure
from tests.unit.helpers import assert_parses_back

pytestmark = pytest.mark.unit


def test_each_step_is_timed_and_the_summary_parses() -> None:
    # Arrange
    base = measure(4_000, BASE_TENSORS, repeats=1)
    # Act
    summary = compare(4_000, 20, base, repeats=1)
    # Assert
    assert set(base) == {"decode", "fold", "encode"}
    assert all(us > 0 for us in base.values())
    assert summary.name == "tensors-20-4KB"
    assert summary.ratio > 0
    assert_parses_back(summary)
