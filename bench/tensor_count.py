"""Tensor count: the aggregator's CPU per update for the same bytes cut into more tensors.

Run: `python bench/tensor_count.py [--size 100000] [--tensors 4,50,200,1000] [--repeats 5]`.
Real models hold hundreds of tensors (a ResNet-50 state dict 320, BERT-base about 200), and
every step of the aggregator's work on an update loops over them: decoding and validating
its payload (`decode_validated`), folding it (FedBuff K=10: ten `add` calls, the tenth also
stepping the model, divided by ten) and encoding the new version (`encode_buffer`, once per
K updates). All in this process on one thread, no services. The baseline is the same work
on the same bytes as the 4 tensors the other benchmarks send, measured first in the same
run: the ratio says how much of a many-tensor model's time is the per-tensor overhead.
Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.strategies import build_strategy
from bench.fold import BUFFER_SIZE, contribution
from bench.harness import fedbuff, synthetic_model
from bench.measure import Summary, human_bytes, median, per_call_seconds, ratio
from schemas.codec import decode_validated, encode, encode_buffer, schema_of

CALLS = 100
BASE_TENSORS = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="payload bytes")
    parser.add_argument("--tensors", default="50,200,1000", help="tensor counts")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def fold_seconds(model: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    """Seconds per update of a full FedBuff buffer of K adds (the last one steps)."""
    strategy = build_strategy(fedbuff(BUFFER_SIZE))
    contributions = [contribution(delta) for _ in range(BUFFER_SIZE)]
    started = time.perf_counter()
    for item in contributions:
        strategy.add(model, item)
    return (time.perf_counter() - started) / BUFFER_SIZE


def measure(size: int, tensors: int, repeats: int) -> dict[str, float]:
    """Return the median of each step's time, in us per update."""
    model = synthetic_model(size, tensors=tensors)
    payload = bytearray(encode(synthetic_model(size, tensors=tensors, seed=1)))
    schema = schema_of(model)
    delta = decode_validated(payload, schema)
    spare = encode_buffer(model)
    steps: dict[str, list[float]] = {"decode": [], "fold": [], "encode": []}
    for _ in range(repeats):
        steps["decode"].append(per_call_seconds(lambda: decode_validated(payload, schema), CALLS))
        steps["fold"].append(median([fold_seconds(model, delta) for _ in range(CALLS // 10)]))
        # Once per version, so a tenth of it per update.
        per_version = per_call_seconds(lambda: encode_buffer(model, into=spare), CALLS // 10)
        steps["encode"].append(per_version / BUFFER_SIZE)
    return {step: median(times) * 1e6 for step, times in steps.items()}


def describe(steps: dict[str, float]) -> str:
    """`1541 us per update (decode 1085, fold 387, encode 69)`."""
    split = ", ".join(f"{step} {us:.0f}" for step, us in steps.items())
    return f"{sum(steps.values()):.0f} us per update ({split})"


def compare(size: int, tensors: int, base: dict[str, float], repeats: int) -> Summary:
    """Measure `tensors` tensors of `size` bytes against `base`, the steps at 4 tensors."""
    steps = measure(size, tensors, repeats)
    return Summary(
        name=f"tensors-{tensors}-{human_bytes(size).replace(' ', '')}",
        figure=describe(steps),
        baseline=f"{describe(base)} as {BASE_TENSORS} tensors",
        ratio=ratio(1 / sum(steps.values()), 1 / sum(base.values())),
        goal=None,
        extra=f"FedBuff K={BUFFER_SIZE}, one thread, median of {repeats}",
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    base = measure(args.size, BASE_TENSORS, args.repeats)
    for tensors in (int(t) for t in args.tensors.split(",")):
        print(compare(args.size, tensors, base, args.repeats).line(), flush=True)


if __name__ == "__main__":
    main()
