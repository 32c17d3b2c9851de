"""Folding: one FedBuff step per update on a 100M-parameter model vs an in-place `torch.add_`.

Run: `python bench/fold.py [--quick] [--params 100000000] [--repeats 3]`.
The strategy's cost per update is a whole buffer of K=10 `FedBuff.add` calls (the tenth
also takes the mean and steps the model) divided by K: what the aggregator spends in the
strategy per update, off the event loop. The baseline is `model[k].add_(delta[k])` over the
same tensors, the least any fold can cost. Both run in this process on one thread (the
machine is shared); the figure is parameters folded per second, the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.strategies import Contribution, Receipt, Strategy, build_strategy
from bench.harness import fedbuff, synthetic_model
from bench.measure import Summary, median, rate, ratio

BUFFER_SIZE = 10
TENSORS = 10


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the default size is the issue's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--quick", action="store_true", help="10M parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def contribution(delta: dict[str, torch.Tensor]) -> Contribution:
    """Wrap a delta as a fresh update of staleness 1."""
    receipt = Receipt(update_id=str(uuid.uuid4()), device_id="d", staleness=1, num_samples=10)
    return Contribution(receipt=receipt, base_version=0, delta=delta)


def strategy_seconds(
    strategy: Strategy, model: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> float:
    """Time one full buffer of FedBuff adds and return the seconds per update."""
    contributions = [contribution(delta) for _ in range(BUFFER_SIZE)]
    started = time.perf_counter()
    receipts = None
    for item in contributions:
        receipts = strategy.add(model, item)
    elapsed = time.perf_counter() - started
    assert receipts is not None and len(receipts) == BUFFER_SIZE, "the buffer did not step"
    return elapsed / BUFFER_SIZE


def add_seconds(model: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    """Time one in-place add of the delta to the model."""
    started = time.perf_counter()
    for name, tensor in model.items():
        tensor.add_(delta[name])
    return time.perf_counter() - started


def main() -> None:
    """Print the summary line: parameters/s of the strategy against those of add_."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    params = 10_000_000 if args.quick else args.params
    model = synthetic_model(4 * params, tensors=TENSORS)
    delta = synthetic_model(4 * params, tensors=TENSORS, seed=1)
    params = sum(t.numel() for t in model.values())
    # One strategy for every buffer, as the aggregator keeps one. One untimed pass each:
    # first touches of freshly allocated pages are not the fold's cost.
    strategy = build_strategy(fedbuff(BUFFER_SIZE))
    strategy_seconds(strategy, model, delta)
    add_seconds(model, delta)
    ours: list[float] = []
    base: list[float] = []
    for run in range(args.repeats):
        ours.append(rate(params, strategy_seconds(strategy, model, delta)))
        base.append(rate(params, median([add_seconds(model, delta) for _ in range(3)])))
        print(
            f"fold run {run + 1}: FedBuff {ours[-1] / 1e6:.0f}M params/s per update, "
            f"add_ {base[-1] / 1e6:.0f}M params/s",
            file=sys.stderr,
            flush=True,
        )
    summary = Summary(
        name="fold",
        figure=f"{median(ours) / 1e6:.0f}M params/s",
        baseline=f"{median(base) / 1e6:.0f}M params/s",
        ratio=ratio(median(ours), median(base)),
        goal=0.5,
        extra=(
            f"{params / 1e6:.0f}M parameters, FedBuff K={BUFFER_SIZE}, per update, "
            f"{args.threads} thread(s), median of {args.repeats}"
        ),
    )
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
