"""Digest speed: the payload hash every agent and the aggregator compute, BLAKE3 vs SHA-256.

Run: `python bench/digest_speed.py [--sizes 1000000,200000000] [--repeats 5]`. No services.
Per size, `payload_hex("blake3", ...)` (one thread below 8 MiB, every core from there, as the
agents and the aggregator run it) against `hashlib.sha256` of the same bytes, the digest of
header schema 1; the median of `--repeats` timings each, in MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import Summary, human_bytes, per_call_seconds
from schemas.digests import payload_hex


def parse_args() -> argparse.Namespace:
    """Parse the payload sizes and how often to time each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,200000000", help="payload bytes, commas")
    parser.add_argument("--repeats", type=int, default=5, help="timings per digest and size")
    return parser.parse_args()


def megabytes_per_second(digest: Callable[[], object], size: int, repeats: int) -> float:
    """Median MB/s of `digest` over `repeats` timings (enough calls each to last 0.2 s)."""
    digest()  # warm: pages faulted in, code loaded
    started = time.perf_counter()
    digest()
    calls = max(1, int(0.2 / max(time.perf_counter() - started, 1e-6)))
    return size / per_call_seconds(digest, calls, repeats) / 1e6


def main() -> None:
    """Print one summary line per size."""
    args = parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        print(compare(os.urandom(size), args.repeats).line(), flush=True)


def compare(payload: bytes, repeats: int) -> Summary:
    """Time both digests of `payload` and return the summary."""
    size = len(payload)
    blake3 = megabytes_per_second(lambda: payload_hex("blake3", payload), size, repeats)
    sha256 = megabytes_per_second(lambda: hashlib.sha256(payload).hexdigest(), size, repeats)
    return Summary(
        name=f"digest-{human_bytes(size).replace(' ', '')}",
        figure=f"{blake3:,.0f} MB/s",
        baseline=f"{sha256:,.0f} MB/s",
        ratio=blake3 / sha256,
        goal=None,
        extra=f"BLAKE3 against SHA-256, {os.cpu_count()} cores, median of {repeats}",
    )


if __name__ == "__main__":
    main()
