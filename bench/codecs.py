"""Update codecs against `none`: bytes per update and final accuracy over paired seeds.

Run: `python bench/codecs.py` (defaults: the table in docs/codecs.md; `--quick` for a smoke
run). Every codec runs the same federation -- 8 non-IID MNIST-1D devices (Dirichlet 0.5),
FedBuff K=4 with sqrt staleness, the job's default local training -- for the same number of
versions, once per seed, and its final accuracy is compared with `none` on the same seed.

`--mode lockstep` (the default) steps the real `DeviceAgent`s and `Aggregator` in a fixed
round-robin order (fedq/lockstep.py): a run is bit-for-bit reproducible, so the paired
difference to `none` is the codec's effect on that seed and nothing else. `--mode async`
runs `fedq.simulate.run_strategy` (concurrent devices, wall clock), whose buffers depend on
thread timing. Results go to `--out` (JSON, rewritten after every run; `--resume` skips the
(codec, seed) pairs already there), the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedq.lockstep import LockstepSpec, run_lockstep
from fedq.simulate import SimulationSpec, run_strategy
from fedq.speeds import parse_speed_profile
from infra.settings import ConnectionSettings
from schemas import StalenessConfig, StrategyConfig, TrainingConfig
from schemas.compression import parse_codec
from schemas.messages import Codec

Record = dict[str, object]
CODECS = "none,fp16,bf16,int8,int8:channel,topk:0.1,topk:0.01"
# The goals, in accuracy points below `none` (paired mean difference).
GOALS = {"int8": 0.5, "int8:channel": 0.5, "topk:0.01": 2.0}
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1 seeds), beyond: normal.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the defaults are the ones docs/codecs.md reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default=CODECS)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--devices", type=int, default=8)
    # The plateau: `none` gains nothing after about version 600 (docs/codecs.md).
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--mode", choices=("lockstep", "async"), default="lockstep")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="async mode only")
    parser.add_argument("--out", type=Path, default=Path("runs/codecs/results.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--report", action="store_true", help="only print --out's tables")
    parser.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="another results file to include in the tables (repeatable)",
    )
    parser.add_argument(
        "--at",
        type=int,
        help="score the lockstep runs at this version (from their curves), not at their end",
    )
    parser.add_argument("--quick", action="store_true", help="2 codecs, 1 seed, 8 versions")
    args = parser.parse_args()
    if args.quick:
        args.codecs, args.seeds, args.versions = "none,topk:0.01", "0", 8
    return args


def strategy() -> StrategyConfig:
    """Return the strategy every codec's run uses."""
    return StrategyConfig(name="fedbuff", buffer_size=4, staleness=StalenessConfig(name="sqrt"))


async def run_one(args: argparse.Namespace, codec: Codec, seed: int) -> Record:
    """Run one (codec, seed) federation and return its record."""
    training = TrainingConfig(num_devices=args.devices, seed=seed)
    if args.mode == "lockstep":
        spec = LockstepSpec(
            "mnist1d-cnn", args.devices, training, strategy(), args.versions, codec, eval_every=1
        )
        result = await run_lockstep(spec)
        tail = [acc for _, acc in result.curve[-max(1, args.versions // 10) :]]
        return {
            "versions": result.versions,
            "updates": result.updates_applied,
            "rejected": result.updates_rejected,
            "bytes_per_update": result.bytes_per_update,
            "final_accuracy": result.final_accuracy,
            "tail_accuracy": statistics.fmean(tail),
            "mean_staleness": result.mean_staleness,
            "curve": result.curve,
            "model_sha256": result.model_sha256,
        }
    sim = SimulationSpec(
        task="mnist1d-cnn",
        devices=args.devices,
        training=training,
        speeds=parse_speed_profile("uniform"),
        target_accuracy=1.0,
        max_seconds=args.max_seconds,
        max_versions=args.versions,
        codec=codec,
    )
    memory = ConnectionSettings(amqp_url="memory://", redis_url="memory://")
    summary = (await run_strategy(sim, strategy(), memory)).summary()
    updates = max(1, int(summary["updates_applied"]))  # type: ignore[call-overload]
    return {
        "versions": summary["versions"],
        "updates": updates,
        "rejected": summary["updates_rejected"],
        "bytes_per_update": int(summary["bytes_received"]) / updates,  # type: ignore[call-overload]
        "final_accuracy": summary["final_accuracy"],
        "mean_staleness": summary["mean_staleness"],
    }


def at_version(records: list[Record], version: int) -> list[Record]:
    """Return the lockstep runs as if they had stopped at `version`, read off their curves.

    The runs are deterministic, so a longer run's first `version` versions are the shorter
    run: one set of long runs gives the table at every budget. Runs without that point are
    left out.
    """
    scored: list[Record] = []
    window = max(1, version // 10)
    for r in records:
        curve = r.get("curve")
        if not isinstance(curve, list):
            continue
        accuracy = {int(v): float(a) for v, a in curve}
        if version not in accuracy:
            continue
        tail = [accuracy[v] for v in range(version - window + 1, version + 1) if v in accuracy]
        scored.append(
            r
            | {
                "versions": version,
                "final_accuracy": accuracy[version],
                "tail_accuracy": statistics.fmean(tail),
            }
        )
    return scored


def by_seed(records: list[Record], codec: str, key: str) -> dict[int, float]:
    """Return `{seed: record[key]}` of one codec's runs."""
    return {int(str(r["seed"])): float(str(r[key])) for r in records if r["codec"] == codec}


def paired_points(values: dict[int, float], base: dict[int, float]) -> list[float]:
    """Return 100 x (value - base) for every seed both have, in seed order: accuracy points."""
    return [100 * (values[seed] - base[seed]) for seed in sorted(values.keys() & base.keys())]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Row:
    """One codec's line of the table; differences are per seed, in accuracy points."""

    codec: str
    seeds: list[int]
    bytes_per_update: float
    bytes_ratio: float
    accuracy: tuple[float, float]
    diff: list[float]
    tail_diff: list[float]


def verdict(diffs: list[float], goal: float) -> str:
    """Judge `mean >= -goal` by the 95% t-interval of the paired mean: met, missed or open."""
    if len(diffs) < 2:
        return "one seed: open"
    mean, std = mean_std(diffs)
    half = _T95.get(len(diffs) - 1, 1.96) * std / math.sqrt(len(diffs))
    if mean - half >= -goal:
        return "met"
    if mean + half < -goal:
        return "missed"
    return f"open: 95% CI {mean - half:+.1f} .. {mean + half:+.1f}"


def summary_rows(records: list[Record], codecs: list[str]) -> list[Row]:
    """Summarize each codec against `none`: bytes, accuracy, and the paired differences."""
    base_bytes = mean_std(list(by_seed(records, "none", "bytes_per_update").values()))[0]
    rows: list[Row] = []
    for codec in codecs:
        final = by_seed(records, codec, "final_accuracy")
        if not final:
            continue
        per_update = mean_std(list(by_seed(records, codec, "bytes_per_update").values()))[0]
        rows.append(
            Row(
                codec=codec,
                seeds=sorted(final),
                bytes_per_update=per_update,
                bytes_ratio=per_update / base_bytes,
                accuracy=mean_std(list(final.values())),
                diff=paired_points(final, by_seed(records, "none", "final_accuracy")),
                tail_diff=paired_points(
                    by_seed(records, codec, "tail_accuracy"),
                    by_seed(records, "none", "tail_accuracy"),
                ),
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """Render the summary rows as the markdown table of docs/codecs.md."""
    lines = [
        "| codec | bytes/update | vs none | final accuracy, mean ± std "
        "| final vs none, points: mean ± std (per seed) "
        "| last-10% mean vs none, points | goal (on final / on last-10%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        (acc_mean, acc_std), (d_mean, d_std) = r.accuracy, mean_std(r.diff)
        t_mean, t_std = mean_std(r.tail_diff)
        goal = GOALS.get(r.codec)
        judged = "" if goal is None else f"{verdict(r.diff, goal)} / {verdict(r.tail_diff, goal)}"
        lines.append(
            f"| {r.codec} | {r.bytes_per_update:,.0f} | {r.bytes_ratio:.3f}x "
            f"| {acc_mean:.4f} ± {acc_std:.4f} "
            f"| {d_mean:+.2f} ± {d_std:.2f} ({', '.join(f'{d:+.1f}' for d in r.diff)}) "
            f"| {t_mean:+.2f} ± {t_std:.2f} "
            f"| {'' if goal is None else f'>= -{goal}: {judged}'} |"
        )
    return "\n".join(lines)


def curve_points(records: list[Record], codec: str, version: int) -> dict[int, float]:
    """Return `{seed: accuracy at version}` from the runs' curves (lockstep mode only)."""
    found: dict[int, float] = {}
    for r in records:
        curve = r.get("curve")
        if r["codec"] == codec and isinstance(curve, list):
            found |= {int(str(r["seed"])): float(a) for v, a in curve if v == version}
    return found


def checkpoint_table(records: list[Record], codecs: list[str], versions: list[int]) -> str:
    """Render the mean paired difference to `none` at a few versions: does a gap close?"""
    lines = [
        "| codec | " + " | ".join(f"vs none at v{v}, points" for v in versions) + " |",
        "| --- |" + " --- |" * len(versions),
    ]
    for codec in codecs:
        if not any(r["codec"] == codec for r in records):
            continue
        cells = []
        for version in versions:
            diff = paired_points(
                curve_points(records, codec, version), curve_points(records, "none", version)
            )
            mean, std = mean_std(diff)
            cells.append(f"{mean:+.2f} ± {std:.2f}")
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run every (seed, codec) pair seed by seed, saving as it goes, then print the table."""
    args = parse_args()
    torch.set_num_threads(1)
    codecs = [parse_codec(c.strip()) for c in args.codecs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    records: list[Record] = []
    if (args.resume or args.report) and args.out.exists():
        records = json.loads(args.out.read_text())["runs"]
    for extra in args.also:
        records += json.loads(extra.read_text())["runs"]
    done = {(r["codec"], r["seed"]) for r in records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Seed-major: a cut-short run still holds complete pairs for the seeds it finished.
    for seed in seeds:
        for codec in codecs:
            if (codec, seed) in done or args.report:
                continue
            started = time.perf_counter()
            record = asyncio.run(run_one(args, codec, seed))
            record.update(codec=codec, seed=seed, seconds=round(time.perf_counter() - started, 1))
            records.append(record)
            settings = {k: str(v) for k, v in vars(args).items()}
            args.out.write_text(json.dumps({"settings": settings, "runs": records}, indent=1))
            shown = {k: v for k, v in record.items() if k != "curve"}
            print(f"{codec} seed {seed}: {shown}", file=sys.stderr, flush=True)
    budget = args.versions if args.at is None else args.at
    scored = records if args.at is None else at_version(records, args.at)
    print(table(summary_rows(scored, codecs)))
    if args.mode == "lockstep":
        checkpoints = sorted({max(1, budget * i // 3) for i in (1, 2, 3)})
        print()
        print(checkpoint_table(records, codecs, checkpoints))


if __name__ == "__main__":
    main()
