"""Render a `fedq status` summary (from `fedq.jobs.job_status`) as rich tables or one line."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table


def _value(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def _overview(s: dict[str, Any]) -> Table:
    table = Table(title=f"fedq job {s['job']}", show_header=False)
    queue = s.get("queue")
    accuracy = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
    rows = [
        ("task / strategy", f"{s['task']} / {s['strategy']}"),
        ("version", str(s["version"])),
        ("last version", _value(s["last_version_age_seconds"], " s ago")),
        ("versions per minute", str(s["versions_per_minute"])),
        ("accuracy", f"{accuracy} (version {_value(s['evaluated_version'])})"),
        ("updates applied", str(s["applied_updates"])),
        ("updates dead-lettered", str(s["dead_lettered"])),
        ("staleness mean / max", f"{_value(s['staleness_mean'])} / {_value(s['staleness_max'])}"),
    ]
    if queue is not None:
        rows.append(("queue ready / consumers", f"{queue['ready']} / {queue['consumers']}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _dead_letters(by_reason: dict[str, int]) -> Table:
    table = Table(title="dead letters by reason")
    table.add_column("reason")
    table.add_column("updates", justify="right")
    for reason, count in sorted(by_reason.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(reason, str(count))
    return table


def _devices(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="contributions by device")
    table.add_column("device")
    for name in ("applied", "staleness mean", "staleness max"):
        table.add_column(name, justify="right")
    for device in sorted(devices, key=lambda d: (-d["applied"], d["device_id"])):
        table.add_row(
            device["device_id"],
            str(device["applied"]),
            f"{device['staleness_mean']:.2f}",
            str(device["staleness_max"]),
        )
    return table


def print_status(summary: dict[str, Any], console: Console) -> None:
    """Print the overview, then dead letters by reason and devices where there are any."""
    parts: list[Table] = [_overview(summary)]
    if summary["dead_lettered_by_reason"]:
        parts.append(_dead_letters(summary["dead_lettered_by_reason"]))
    if summary["devices"]:
        parts.append(_devices(summary["devices"]))
    console.print(Group(*parts))


def progress_line(s: dict[str, Any], elapsed: float) -> str:
    """One `--watch` line: version, rate, accuracy, counts, staleness and queue."""
    accuracy = "  n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    line = (
        f"{elapsed:6.0f}s  version {s['version']:4d} ({s['versions_per_minute']}/min)  "
        f"accuracy {accuracy} (v{s['evaluated_version']})  "
        f"applied {s['applied_updates']:5d}  dead-lettered {s['dead_lettered']}  "
        f"staleness {_value(s['staleness_mean'])}/{_value(s['staleness_max'])}"
    )
    queue = s.get("queue")
    if queue is not None:
        line += f"  queue {queue['ready']} ({queue['consumers']} consumers)"
    return line
