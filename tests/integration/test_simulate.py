"""`fedq simulate` end to end: in memory and on the real services, results checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedq.cli import app
from tests.conftest import AMQP_URL, REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _simulate(out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--task",
            "digits-mlp",
            "--devices",
            "3",
            "--max-seconds",
            "6",
            "--device-speeds",
            "stragglers:0.34:3",
            "--target-accuracy",
            "0.5",
            "--out",
            str(out),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "centralized" in result.output  # the summary table was printed
    return json.loads((out / "results.json").read_text())


def _rows(out: Path, strategy: str) -> list[dict[str, str]]:
    with (out / f"metrics-{strategy}.csv").open() as handle:
        return list(csv.DictReader(handle))


def _check_run(out: Path, run: dict) -> None:
    rows = _rows(out, run["strategy"])
    evaluated = [float(r["accuracy"]) for r in rows if r["accuracy"]]
    # The model learns: the last evaluated accuracy is well above version 0's.
    assert evaluated[-1] > evaluated[0] + 0.2
    assert run["final_accuracy"] == pytest.approx(evaluated[-1])
    # Counts add up: versions, updates and bytes agree between results.json and the CSV.
    assert int(rows[-1]["version"]) == run["versions"] == len(rows) - 1
    assert int(rows[-1]["updates_applied"]) == run["updates_applied"] > 0
    assert int(rows[-1]["bytes_received"]) == run["bytes_received"] > 0
    assert run["updates_sent"] >= run["updates_applied"] + run["updates_rejected"]
    assert [float(r["wall_seconds"]) for r in rows] == sorted(
        float(r["wall_seconds"]) for r in rows
    )
    if run["time_to_target_s"] is not None:
        first = next(r for r in rows if r["accuracy"] and float(r["accuracy"]) >= 0.5)
        assert run["client_trips_to_target"] == int(first["updates_applied"])


def _check_document(out: Path, document: dict, strategies: list[str]) -> None:
    assert document["task"] == "digits-mlp"
    assert document["devices"] == 3
    assert document["device_speeds"] == "stragglers:0.34:3"
    assert 0.5 < document["centralized_accuracy"] <= 1.0
    assert [run["strategy"] for run in document["runs"]] == strategies
    for run in document["runs"]:
        _check_run(out, run)
    for plot in ("accuracy-vs-time.png", "accuracy-vs-trips.png", "staleness-and-devices.png"):
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)


def test_simulate_in_memory(tmp_path: Path) -> None:
    document = _simulate(tmp_path)
    _check_document(tmp_path, document, ["fedbuff"])


def test_simulate_on_the_real_services(tmp_path: Path) -> None:
    document = _simulate(tmp_path, "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL)
    _check_document(tmp_path, document, ["fedbuff"])


def test_compare_runs_each_strategy_on_the_same_devices(tmp_path: Path) -> None:
    document = _simulate(tmp_path, "--compare", "fedavg,fedasync")
    _check_document(tmp_path, document, ["fedavg", "fedasync"])
    fedavg, fedasync = document["runs"]
    # Synchronous rounds only ever fold fresh updates; FedAsync folds stale ones too.
    assert fedavg["mean_staleness"] == 0
    assert fedasync["mean_staleness"] > 0
    # FedAsync makes one version per update.
    assert fedasync["versions"] == fedasync["updates_applied"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--task", "cifar"], "--task"),
        (["--compare", "fedavg,fedmagic"], "--compare"),
        (["--strategy", "fedmagic"], "--strategy"),
        (["--device-speeds", "stragglers:2"], "--device-speeds"),
        (["--device-speeds", "warp:9"], "--device-speeds"),
        (["--devices", "0"], "--devices"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], named: str) -> None:
    result = CliRunner().invoke(app, ["simulate", *args])
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert named in error_lines[0]
    assert "Traceback" not in result.output
