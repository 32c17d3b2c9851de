"""The benchmarks' arithmetic (bench/measure.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from bench.measure import (
    Summary,
    human_bytes,
    median,
    parse_summary,
    percentile,
    rate,
    ratio,
    window_stats,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 0, 5.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # unsorted input
        ([1.0, 2.0, 3.0, 4.0], 25, 1.75),
        (list(map(float, range(1, 101))), 99, 99.01),
        (list(map(float, range(101))), 99, 99.0),
    ],
)
def test_percentile_interpolates_between_closest_ranks(
    values: list[float], q: float, expected: float
) -> None:
    # Act / Assert
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_leaves_its_input_alone() -> None:
    # Arrange
    values = [3.0, 1.0, 2.0]
    # Act
    percentile(values, 50)
    # Assert
    assert values == [3.0, 1.0, 2.0]


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_refuses_no_values_and_q_out_of_range(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_median_of_odd_and_even_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


@pytest.mark.parametrize(("count", "seconds", "expected"), [(10, 2.0, 5.0), (0, 1.0, 0.0)])
def test_rate_is_count_over_seconds(count: int, seconds: float, expected: float) -> None:
    assert rate(count, seconds) == expected


@pytest.mark.parametrize(("count", "seconds"), [(1, 0.0), (1, -1.0), (-1, 1.0)])
def test_rate_refuses_a_non_positive_duration_or_negative_count(count: int, seconds: float) -> None:
    with pytest.raises(ValueError):
        rate(count, seconds)


def test_ratio_divides_by_a_positive_baseline_only() -> None:
    assert ratio(80.0, 100.0) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        ratio(1.0, 0.0)


def test_window_stats_counts_samples_by_start_time() -> None:
    # Arrange: (started_at, latency); the first is warm-up, the last starts at the end.
    samples = [(0.5, 9.0), (1.0, 1.0), (2.0, 2.0), (2.5, 3.0), (3.0, 4.0), (3.5, 100.0)]
    # Act
    stats = window_stats(samples, start=1.0, end=3.5)
    # Assert
    assert stats.count == 4
    assert stats.per_second == pytest.approx(4 / 2.5)
    assert stats.p50 == pytest.approx(2.5)
    assert stats.p99 == pytest.approx(3.97)


def test_window_stats_refuses_an_empty_window() -> None:
    with pytest.raises(ValueError):
        window_stats([(0.0, 1.0)], start=1.0, end=2.0)


def test_summary_line_has_the_issue_format_and_reads_back() -> None:
    # Arrange
    summary = Summary("ingest-1MB", "40.0 updates/s", "50.0 msg/s", 0.8, 0.8, "200 updates")
    # Act
    line = summary.line()
    parsed = parse_summary(line)
    # Assert
    assert line == (
        "ingest-1MB: 40.0 updates/s vs baseline 50.0 msg/s = ratio 0.80 (goal >= 0.8); 200 updates"
    )
    assert parsed == summary
    assert summary.met is True


def test_a_summary_without_a_goal_reads_back_without_one() -> None:
    summary = Summary("scale", "100 updates/s", "300 msg/s", 1 / 3, None)
    parsed = parse_summary(summary.line())
    assert parsed is not None
    assert parsed.goal is None and parsed.met is None
    assert math.isclose(parsed.ratio, 0.33)


def test_parse_summary_ignores_other_lines() -> None:
    assert parse_summary("ingest 100 KB run 1: fedq 10 updates/s") is None


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (100_000, "100 KB"),
        (1_000_000, "1 MB"),
        (10_000_000, "10 MB"),
        (500_000_000, "500 MB"),
        (12, "12 B"),
    ],
)
def test_human_bytes_uses_powers_of_1000(size: int, text: str) -> None:
    assert human_bytes(size) == text
