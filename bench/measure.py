"""The pure arithmetic of the benchmarks: rates, percentiles, medians, ratios, summary lines."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# `name: <figure> vs baseline <figure> = ratio X (goal >= G)`, as every benchmark prints it.
SUMMARY_PATTERN = re.compile(
    r"^(?P<name>[\w.-]+): (?P<figure>.+?) vs baseline (?P<baseline>.+?) = ratio "
    r"(?P<ratio>[0-9.]+|nan) \(goal (?P<goal>[^)]*)\)(?P<extra>.*)$"
)


def rate(count: int, seconds: float) -> float:
    """Return events per second; zero or negative time is an error, not infinity."""
    if seconds <= 0:
        raise ValueError(f"a rate needs a positive duration, got {seconds}")
    if count < 0:
        raise ValueError(f"a count cannot be negative, got {count}")
    return count / seconds


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0-100), interpolating linearly between closest ranks."""
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(values: Sequence[float]) -> float:
    """Return the median of repeated measurements."""
    return percentile(values, 50)


def per_call_seconds(work: Callable[[], object], calls: int, timings: int = 5) -> float:
    """Median over `timings` timings of `calls` calls of `work` (after one warm-up call), in
    seconds per call."""
    work()
    spans = []
    for _ in range(timings):
        started = time.perf_counter()
        for _ in range(calls):
            work()
        spans.append((time.perf_counter() - started) / calls)
    return median(spans)


def ratio(value: float, baseline: float) -> float:
    """Return value / baseline, both in higher-is-better units."""
    if baseline <= 0:
        raise ValueError(f"the baseline must be positive, got {baseline}")
    return value / baseline


@dataclass(frozen=True)
class Summary:
    """One benchmark's result: its figure against the baseline's, and the goal for the ratio."""

    name: str
    figure: str
    baseline: str
    ratio: float
    goal: float | None
    extra: str = ""

    def line(self) -> str:
        """Render the one summary line a benchmark prints."""
        goal = "none set" if self.goal is None else f">= {self.goal:g}"
        extra = f"; {self.extra}" if self.extra else ""
        return (
            f"{self.name}: {self.figure} vs baseline {self.baseline} "
            f"= ratio {self.ratio:.2f} (goal {goal}){extra}"
        )

    @property
    def met(self) -> bool | None:
        """Whether the ratio reaches the goal; None without a goal."""
        return None if self.goal is None else self.ratio >= self.goal


def parse_summary(line: str) -> Summary | None:
    """Read a summary line back (for the table of `bench/run_all.py`); None if it is not one."""
    match = SUMMARY_PATTERN.match(line.strip())
    if match is None:
        return None
    goal_text = match["goal"].strip()
    goal = float(goal_text[2:]) if goal_text.startswith(">=") else None
    return Summary(
        name=match["name"],
        figure=match["figure"],
        baseline=match["baseline"],
        ratio=float(match["ratio"]),
        goal=goal,
        extra=match["extra"].removeprefix(";").strip(),
    )


def human_bytes(size: int) -> str:
    """Name a size the way the issue does: 100 KB, 1 MB, 10 MB, 500 MB (powers of 1000)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class WindowStats:
    """Completions within a measurement window: their rate and latency percentiles."""

    count: int
    per_second: float
    p50: float
    p99: float


def window_stats(samples: Sequence[tuple[float, float]], start: float, end: float) -> WindowStats:
    """Summarize (started_at, latency) samples whose start lies in [start, end).

    Counting by start time keeps a closed loop's warm-up and its unfinished tail out alike.
    """
    latencies = [latency for started, latency in samples if start <= started < end]
    if not latencies:
        raise ValueError(f"no sample started within [{start}, {end})")
    return WindowStats(
        count=len(latencies),
        per_second=rate(len(latencies), end - start),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
    )
