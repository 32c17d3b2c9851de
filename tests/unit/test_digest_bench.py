"""bench/digest_speed.py prints a summary line that bench/run_all.py's parser reads back."""

from __future__ import annotations

import pytest

from bench.digest_speed import compare
from tests.unit.helpers import assert_parses_back

pytestmark = pytest.mark.unit


def test_the_comparison_is_a_parsable_summary_of_two_positive_rates() -> None:
    summary = compare(b"\x01" * 1000, repeats=1)
    assert summary.name == "digest-1KB"
    assert summary.ratio > 0
    assert_parses_back(summary)
