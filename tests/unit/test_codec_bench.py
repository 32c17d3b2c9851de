"""bench/codecs.py's arithmetic: per-seed paired differences to `none` and the goal verdicts."""

from __future__ import annotations

import pytest

from bench.codecs import (
    Record,
    at_version,
    mean_std,
    paired_points,
    summary_rows,
    table,
    verdict,
)

pytestmark = pytest.mark.unit


def _run(codec: str, seed: int, final: float, tail: float, size: float) -> Record:
    return {
        "codec": codec,
        "seed": seed,
        "final_accuracy": final,
        "tail_accuracy": tail,
        "bytes_per_update": size,
    }


RECORDS = [
    _run("none", 0, 0.90, 0.89, 1000),
    _run("none", 1, 0.80, 0.81, 1000),
    _run("int8", 0, 0.91, 0.89, 300),
    _run("int8", 1, 0.79, 0.80, 300),
    _run("topk:0.01", 0, 0.85, 0.86, 80),
    # Seed 2 has no `none` run: it counts in the mean accuracy, not in the differences.
    _run("topk:0.01", 2, 0.70, 0.70, 80),
]


@pytest.mark.parametrize(
    ("values", "base", "expected"),
    [
        ({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.85}, [0.0, -5.0]),
        ({1: 0.8, 0: 0.9}, {0: 0.8}, [10.0]),
        ({3: 0.5}, {0: 0.5}, []),
    ],
)
def test_paired_points_compare_the_same_seed_only(
    values: dict[int, float], base: dict[int, float], expected: list[float]
) -> None:
    # Act / assert
    assert paired_points(values, base) == pytest.approx(expected)


def test_mean_std_of_one_value_has_zero_spread() -> None:
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2**0.5))


def test_summary_rows_pair_each_codec_with_none_seed_by_seed() -> None:
    # Act
    rows = {row.codec: row for row in summary_rows(RECORDS, ["none", "int8", "topk:0.01"])}

    # Assert
    assert rows["int8"].diff == pytest.approx([1.0, -1.0])
    assert rows["int8"].tail_diff == pytest.approx([0.0, -1.0])
    assert rows["int8"].bytes_ratio == pytest.approx(0.3)
    assert rows["topk:0.01"].seeds == [0, 2]
    assert rows["topk:0.01"].diff == pytest.approx([-5.0])
    assert rows["topk:0.01"].accuracy[0] == pytest.approx(0.775)


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([0.1, -0.1, 0.0], "met"),
        ([-5.0, -5.2, -4.9], "missed"),
        ([1.0, -2.0, 0.5], "open: 95% CI -4.2 .. +3.8"),
        ([-1.0], "one seed: open"),
    ],
)
def test_verdict_needs_the_whole_95_percent_interval_on_one_side(
    diffs: list[float], expected: str
) -> None:
    # Act / assert: the goal is "no more than 0.5 points below none"
    assert verdict(diffs, 0.5) == expected


def test_the_table_judges_each_goal_on_final_and_tail() -> None:
    # Act
    lines = table(summary_rows(RECORDS, ["none", "int8", "topk:0.01"])).splitlines()

    # Assert: int8's two seeds straddle the goal; top-k has one paired seed only
    assert "| int8 |" in lines[3] and ">= -0.5: open: 95% CI" in lines[3]
    assert "| topk:0.01 |" in lines[4] and ">= -2.0: one seed: open / one seed: open" in lines[4]


def test_at_version_reads_final_and_tail_off_the_curve() -> None:
    # Arrange: a 30-version run scored every version, and one without a curve
    curve = [[v, v / 100] for v in range(1, 31)]
    runs = [_run("none", 0, 0.30, 0.29, 1000) | {"curve": curve}, _run("int8", 0, 0.9, 0.9, 300)]
    # Act
    [scored] = at_version(runs, 20)
    # Assert: accuracy at v20, tail = mean of the last 10% (2 versions) up to v20
    assert scored["final_accuracy"] == 0.20
    assert scored["tail_accuracy"] == pytest.approx((0.19 + 0.20) / 2)
    assert scored["versions"] == 20
    assert runs[0]["final_accuracy"] == 0.30  # the original is untouched
    assert at_version(runs, 31) == []
