"""Write a simulation's results: results.json, one metrics CSV per strategy, and PNG plots."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt

from fedq.simulate import RunResult, SimulationSpec

CSV_FIELDS = [
    "version",
    "wall_seconds",
    "accuracy",
    "loss",
    "updates_applied",
    "mean_staleness",
    "bytes_received",
]


def results_document(
    spec: SimulationSpec, runs: list[RunResult], centralized_accuracy: float | None
) -> dict[str, Any]:
    """Build the results.json document."""
    return {
        "task": spec.task,
        "devices": spec.devices,
        "seed": spec.seed,
        "dirichlet": spec.training.dirichlet_alpha,
        "device_speeds": str(spec.speeds),
        "target_accuracy": spec.target_accuracy,
        "max_seconds": spec.max_seconds,
        "centralized_accuracy": centralized_accuracy,
        "runs": [run.summary() for run in runs],
    }


def write_results(out: Path, document: dict[str, Any], runs: list[RunResult]) -> list[Path]:
    """Write results.json, metrics-<strategy>.csv and the plots into `out`; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(document, indent=2) + "\n")
    for run in runs:
        path = out / f"metrics-{run.strategy}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in run.rows:
                writer.writerow(asdict(row))
        written.append(path)
    return written + write_plots(out, runs, document.get("centralized_accuracy"))


def write_plots(out: Path, runs: list[RunResult], centralized: float | None) -> list[Path]:
    """Plot accuracy against wall time and client trips, staleness, and updates per device."""
    paths = [
        _accuracy_plot(
            out / "accuracy-vs-time.png", runs, "wall_seconds", "wall time (s)", centralized
        ),
        _accuracy_plot(
            out / "accuracy-vs-trips.png",
            runs,
            "updates_applied",
            "client trips (updates applied)",
            centralized,
        ),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if run.staleness:
            bins = range(0, max(run.staleness) + 2)
            axes[0].hist(run.staleness, bins=bins, alpha=0.5, label=run.strategy)
        devices = sorted(run.updates_per_device, key=_device_order)
        axes[1].plot(
            devices, [run.updates_per_device[d] for d in devices], "o-", label=run.strategy
        )
    axes[0].set(
        title="staleness of applied updates", xlabel="staleness (versions)", ylabel="updates"
    )
    axes[1].set(title="updates contributed per device", xlabel="device", ylabel="updates")
    axes[1].tick_params(axis="x", rotation=45)
    for axis in axes:
        axis.legend()
    figure.tight_layout()
    paths.append(out / "staleness-and-devices.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def _accuracy_plot(
    path: Path, runs: list[RunResult], x_field: str, x_label: str, centralized: float | None
) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = [(getattr(r, x_field), r.accuracy) for r in run.rows if r.accuracy is not None]
        axis.plot([x for x, _ in points], [y for _, y in points], label=run.strategy)
    if runs:
        axis.axhline(runs[0].target_accuracy, color="grey", linestyle=":", label="target")
    if centralized is not None:
        axis.axhline(centralized, color="black", linestyle="--", label="centralized")
    axis.set(xlabel=x_label, ylabel="test accuracy", title=f"accuracy against {x_label}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _device_order(device: str) -> tuple[int, str]:
    """Sort device-2 before device-10."""
    prefix, _, number = device.rpartition("-")
    return (int(number), prefix) if number.isdigit() else (0, device)
