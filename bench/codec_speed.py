"""Codec: decode throughput of an update payload vs a plain memory copy of the same bytes.

Run: `python bench/codec_speed.py [--quick] [--bytes 100000000] [--repeats 5]`.
Times `decode_validated`, what the aggregator runs on every update (parse the safetensors
bytes, check keys, shapes, dtypes and finiteness against the job's schema), on a payload of
`--bytes` float32 in 8 tensors, and a `bytes(bytearray)` copy of the same payload, both in
this process: like the decoded tensors, the copy lands in freshly allocated memory. The
summary also gives a copy into an already mapped buffer (no page faults), the stricter
floor. The figure is payload MB/s, the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import synthetic_model
from bench.measure import Summary, median, rate, ratio
from schemas.codec import decode_validated, encode, schema_of

TENSORS = 8


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=100_000_000)
    parser.add_argument("--quick", action="store_true", help="10 MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def timed(action: Callable[[], object]) -> float:
    """Return the seconds one call of `action` takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    """Print the summary line: decode MB/s against memcpy MB/s."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    size = 10_000_000 if args.quick else args.bytes
    delta = synthetic_model(size, tensors=TENSORS)
    schema = schema_of(delta)
    payload = encode(delta)
    buffer = bytearray(payload)
    del delta
    # Untimed first passes: page faults of the first allocations are not the codec's cost.
    decode_validated(payload, schema)
    bytes(buffer)
    decodes = [timed(lambda: decode_validated(payload, schema)) for _ in range(args.repeats)]
    copies = [timed(lambda: bytes(buffer)) for _ in range(args.repeats)]
    # A copy into memory already mapped: no page faults, the floor of any copy.
    target = bytearray(len(payload))
    warm = [timed(lambda: target.__setitem__(slice(None), buffer)) for _ in range(args.repeats)]
    ours = rate(len(payload), median(decodes)) / 1e6
    base = rate(len(payload), median(copies)) / 1e6
    warm_base = rate(len(payload), median(warm)) / 1e6
    summary = Summary(
        name="codec",
        figure=f"{ours:,.0f} MB/s",
        baseline=f"{base:,.0f} MB/s",
        ratio=ratio(ours, base),
        goal=0.5,
        extra=(
            f"decode_validated of {len(payload) / 1e6:.0f} MB, codec none; into a mapped "
            f"buffer memcpy runs {warm_base:,.0f} MB/s (ratio {ratio(ours, warm_base):.2f}); "
            f"{args.threads} thread(s), median of {args.repeats}"
        ),
    )
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
