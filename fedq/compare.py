"""Run one or several strategies on the same simulated devices, show progress, report."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_agent.tasks import get_task
from device_agent.training import train_centralized, train_local
from fedq.report import results_document, write_results
from fedq.simulate import Progress, RunResult, SimulationSpec, run_strategy
from infra.settings import ConnectionSettings
from schemas import StrategyConfig, TrainingConfig

# Centralized training gets the same sample passes as the longest federated run, up to the
# point where more epochs stop helping (bench/centralized.py: 0.949 at 80 epochs).
_MAX_CENTRALIZED_EPOCHS = 80


class ProgressDisplay:
    """A live table on a terminal; a plain line every few seconds anywhere else (CI, logs)."""

    def __init__(self, console: Console, plain_interval: float = 5.0) -> None:
        self.console = console
        self.rows: dict[str, Progress] = {}
        self._live: Live | None = None
        self._plain_interval = plain_interval
        self._last_plain = 0.0

    def __enter__(self) -> ProgressDisplay:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def update(self, progress: Progress) -> None:
        """Show the latest figures of one strategy's run."""
        self.rows[progress.strategy] = progress
        if self._live is not None:
            self._live.update(self._table())
        elif progress.done or time.monotonic() - self._last_plain >= self._plain_interval:
            self._last_plain = time.monotonic()
            self.console.print(_line(progress), highlight=False)

    def _table(self) -> Table:
        table = Table(title="fedq simulate")
        for column in ("strategy", "version", "accuracy", "updates/s", "mean staleness", "elapsed"):
            table.add_column(column, justify="right")
        for p in self.rows.values():
            table.add_row(
                p.strategy + (" (done)" if p.done else ""),
                str(p.version),
                "-" if p.accuracy is None else f"{p.accuracy:.3f}",
                f"{p.updates_per_second:.1f}",
                f"{p.mean_staleness:.2f}",
                f"{p.elapsed:.0f}s",
            )
        return table


def _line(p: Progress) -> str:
    accuracy = "-" if p.accuracy is None else f"{p.accuracy:.3f}"
    return (
        f"{p.strategy:>9} {'done' if p.done else 'running':>7}  {p.elapsed:5.0f}s  "
        f"version {p.version:4d}  accuracy {accuracy}  {p.updates_per_second:5.1f} updates/s  "
        f"staleness {p.mean_staleness:.2f}"
    )


async def run_simulation(
    spec: SimulationSpec,
    strategies: list[StrategyConfig],
    settings: ConnectionSettings,
    out: Path | None,
    console: Console,
    overrides: Mapping[str, SimulationSpec] | None = None,
) -> dict[str, Any]:
    """Run each strategy in turn, measure the centralized baseline, print and write results.

    `overrides` gives a strategy a spec of its own (a longer budget for a slow baseline, say);
    devices, data and speeds must stay those of `spec` for the comparison to mean anything.
    """
    # Every device trains in a thread of its own, so none queues behind the others; asyncio.run
    # shuts this executor down at the end.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=spec.devices + 4, thread_name_prefix="fedq-sim")
    )
    await asyncio.to_thread(_warm_up, spec)
    runs: list[RunResult] = []
    with ProgressDisplay(console) as display:
        for strategy in strategies:
            run_spec = (overrides or {}).get(strategy.name, spec)
            runs.append(await run_strategy(run_spec, strategy, settings, display.update))
    epochs = _centralized_epochs(spec, runs)
    console.print(f"centralized baseline: {epochs} epochs on the pooled training set ...")
    centralized = await asyncio.to_thread(
        train_centralized, get_task(spec.task), _centralized_training(spec), epochs, spec.seed
    )
    document = results_document(spec, runs, centralized["accuracy"])
    document["centralized_epochs"] = epochs
    console.print(_summary_table(document))
    if out is not None:
        files = write_results(out, document, runs)
        console.print(f"results and plots: {', '.join(str(f) for f in files)}")
    return document


def _warm_up(spec: SimulationSpec) -> None:
    """Pay the process's one-off costs (data generation, torch's lazy imports on the first
    optimizer step) before any clock runs: a slow device would otherwise multiply them."""
    task = get_task(spec.task)
    data = task.load_data(spec.seed)
    warm = spec.training.model_copy(update={"local_epochs": 1})
    train_local(task.build_model(spec.seed), data.x_train[:64], data.y_train[:64], warm, seed=0)


def _centralized_training(spec: SimulationSpec) -> TrainingConfig:
    """Pooled data takes a larger batch: the devices' batch of 32 with the same learning rate
    plateaus and then degrades on the 8x larger pooled set (measured with bench/centralized.py)."""
    return spec.training.model_copy(update={"batch_size": max(64, spec.training.batch_size)})


def _centralized_epochs(spec: SimulationSpec, runs: list[RunResult]) -> int:
    """Pooled epochs with as many sample passes as the federated run that trained the most."""
    train_size = len(get_task(spec.task).load_data(spec.seed).y_train)
    samples = max((run.samples_trained for run in runs), default=0)
    return max(1, min(_MAX_CENTRALIZED_EPOCHS, math.ceil(samples / train_size)))


def _summary_table(document: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"{document['task']}, {document['devices']} devices, speeds "
            f"{document['device_speeds']}, target {document['target_accuracy']:.2f}, "
            f"centralized {document['centralized_accuracy']:.3f}"
        )
    )
    columns = [
        "strategy",
        "time to target",
        "trips to target",
        "final accuracy",
        "versions",
        "applied",
        "rejected",
        "mean staleness",
        "wall",
    ]
    for column in columns:
        table.add_column(column, justify="right")
    for run in document["runs"]:
        final = run["final_accuracy"]
        table.add_row(
            run["strategy"],
            "never" if run["time_to_target_s"] is None else f"{run['time_to_target_s']:.1f}s",
            "-" if run["client_trips_to_target"] is None else str(run["client_trips_to_target"]),
            "-" if final is None else f"{final:.3f}",
            str(run["versions"]),
            str(run["updates_applied"]),
            str(run["updates_rejected"]),
            f"{run['mean_staleness']:.2f}",
            f"{run['wall_seconds']:.0f}s",
        )
    return table
