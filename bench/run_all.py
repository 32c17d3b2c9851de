"""Run every throughput benchmark, one after the other, and print their summary lines as a table.

Run: `python bench/run_all.py [--quick] [--only ingest,fold,codec,large,scale]`.
Each benchmark runs in a child process of its own (so one's peak RSS and threads do not
colour the next), with its default sizes or, with `--quick`, the smaller ones. Their
progress goes to stderr; the summary lines and then a markdown table go to stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import Summary, parse_summary

BENCH = Path(__file__).resolve().parent
SCRIPTS = {
    "ingest": "ingest.py",
    "fold": "fold.py",
    "codec": "codec_speed.py",
    "large": "large.py",
    "scale": "scale.py",
}


def parse_args() -> argparse.Namespace:
    """Parse which benchmarks to run and how big."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller sizes of each")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated names")
    return parser.parse_args()


def run(name: str, quick: bool) -> list[Summary]:
    """Run one benchmark script and return the summaries it printed."""
    command = [sys.executable, str(BENCH / SCRIPTS[name]), *(["--quick"] if quick else [])]
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - started
    summaries = [s for s in map(parse_summary, result.stdout.splitlines()) if s is not None]
    for summary in summaries:
        print(summary.line(), flush=True)
    if result.returncode != 0 or not summaries:
        print(f"{name}: FAILED (exit {result.returncode}) after {elapsed:.0f} s", flush=True)
    return summaries


def table(summaries: list[Summary]) -> str:
    """Render the summaries as the README's markdown table."""
    rows = [
        "| benchmark | fedq | baseline | ratio | goal | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        goal = "none set" if s.goal is None else f">= {s.goal:g} ({'met' if s.met else 'not met'})"
        rows.append(
            f"| {s.name} | {s.figure} | {s.baseline} | {s.ratio:.2f} | {goal} | {s.extra} |"
        )
    return "\n".join(rows)


def main() -> int:
    """Run the chosen benchmarks; exit 1 if any failed to print its summary."""
    args = parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - SCRIPTS.keys())
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(SCRIPTS)}")
    summaries: list[Summary] = []
    failed = False
    for name in names:
        found = run(name, args.quick)
        failed |= not found
        summaries.extend(found)
    print()
    print(table(summaries))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
