"""Async against sync: time and client trips to a target accuracy, FedAsync/FedBuff vs FedAvg.

Run: `python bench/compare_strategies.py [--max-seconds 120] [--out runs/bench-compare]`.
Every strategy runs on the same 8 non-IID MNIST-1D devices (Dirichlet 0.5) of which a
quarter are 10x slower, with the same seeds, one after the other in this process: FedAvg
until it reaches the target, the async strategies for the whole budget (their final
accuracy is compared with centralized training). The baseline (synchronous FedAvg) is
measured in the same run; the last lines print each async strategy's speedup over it and
the gap of the best one to centralized training.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedq.compare import run_simulation
from fedq.simulate import SimulationSpec
from fedq.speeds import parse_speed_profile
from infra.settings import ConnectionSettings
from schemas import StalenessConfig, StrategyConfig, TrainingConfig


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the defaults are the issue's benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--dirichlet", type=float, default=0.5)
    parser.add_argument("--device-speeds", default="stragglers:0.25:10")
    parser.add_argument("--target-accuracy", type=float, default=0.85)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per async strategy")
    parser.add_argument(
        "--fedavg-seconds",
        type=float,
        default=300.0,
        help="FedAvg's budget; its run ends as soon as it reaches the target",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compare"))
    return parser.parse_args()


def strategies(devices: int) -> list[StrategyConfig]:
    """FedAvg (all devices per round), FedAsync (hinge staleness), FedBuff (K=4, 1/sqrt)."""
    return [
        StrategyConfig(name="fedavg", buffer_size=devices),
        StrategyConfig(
            name="fedasync",
            alpha=0.6,
            max_staleness=100,
            staleness=StalenessConfig(name="hinge", a=0.5, b=4),
        ),
        StrategyConfig(
            name="fedbuff",
            buffer_size=4,
            max_staleness=100,
            staleness=StalenessConfig(name="sqrt"),
        ),
    ]


def report(document: dict[str, Any]) -> None:
    """Print one summary line per async strategy: its speedup over FedAvg in the same run."""
    runs = {run["strategy"]: run for run in document["runs"]}
    sync = runs["fedavg"]
    for name in ("fedasync", "fedbuff"):
        run = runs[name]
        if run["time_to_target_s"] is None or sync["time_to_target_s"] is None:
            missed = name if run["time_to_target_s"] is None else "fedavg"
            print(f"{name}: no ratio, {missed} never reached the target")
            continue
        print(
            f"{name} vs fedavg to {document['target_accuracy']:.2f}: "
            f"time {sync['time_to_target_s'] / run['time_to_target_s']:.2f}x sooner "
            f"({run['time_to_target_s']:.1f}s vs {sync['time_to_target_s']:.1f}s), "
            f"client trips {sync['client_trips_to_target'] / run['client_trips_to_target']:.2f}x "
            f"({run['client_trips_to_target']} vs {sync['client_trips_to_target']})"
        )
    best = max(
        (runs[n] for n in ("fedasync", "fedbuff") if runs[n]["final_accuracy"] is not None),
        key=lambda r: r["final_accuracy"],
    )
    gap = document["centralized_accuracy"] - best["final_accuracy"]
    print(
        f"best async final accuracy {best['final_accuracy']:.3f} ({best['strategy']}) vs "
        f"centralized {document['centralized_accuracy']:.3f}: gap {100 * gap:.1f} points"
    )


def main() -> None:
    """Run the comparison and print the table, the files and the ratios."""
    args = parse_args()
    torch.set_num_threads(1)
    spec = SimulationSpec(
        task="mnist1d-cnn",
        devices=args.devices,
        training=TrainingConfig(
            num_devices=args.devices, dirichlet_alpha=args.dirichlet, seed=args.seed
        ),
        speeds=parse_speed_profile(args.device_speeds),
        target_accuracy=args.target_accuracy,
        max_seconds=args.max_seconds,
    )
    settings = ConnectionSettings(amqp_url="memory://", redis_url="memory://")
    console = Console(width=140)
    # The synchronous baseline is slow by design: give it time to reach the target at all.
    fedavg = dataclasses.replace(spec, max_seconds=args.fedavg_seconds, stop_at_target=True)
    document = asyncio.run(
        run_simulation(
            spec, strategies(args.devices), settings, args.out, console, {"fedavg": fedavg}
        )
    )
    report(document)


if __name__ == "__main__":
    main()
