"""What the unit tests of the benchmarks share."""

from __future__ import annotations

from bench.measure import Summary, parse_summary


def assert_parses_back(summary: Summary) -> None:
    """The summary line reads back (as bench/run_all.py reads it) to the same fields."""
    parsed = parse_summary(summary.line())
    assert parsed is not None
    assert (parsed.name, parsed.figure, parsed.baseline) == (
        summary.name,
        summary.figure,
        summary.baseline,
    )
