"""Update codecs against `none`: bytes per update, final accuracy, decode throughput.

Run: `python bench/codecs.py [--versions 150] [--codecs none,fp16,int8,topk:0.1,topk:0.01]`.
Every codec runs the same federation (8 non-IID MNIST-1D devices, Dirichlet 0.5, uniform
speeds, seed 0, FedBuff K=4) for the same number of versions, one after the other in this
process, through `fedq.simulate.run_strategy`, the engine behind `fedq simulate` (without
its centralized baseline, which does not depend on the codec). Decode throughput times the
aggregator's `decode_validated` on one real update and divides by a plain copy of the same
bytes, so the ratio says how much slower than memcpy a codec's decode is on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.tasks import get_task
from fedq.simulate import SimulationSpec, run_strategy
from fedq.speeds import parse_speed_profile
from infra.settings import ConnectionSettings
from schemas import StalenessConfig, StrategyConfig, TrainingConfig
from schemas.codec import decode_validated, encode, schema_of
from schemas.compression import parse_codec


def parse_args() -> argparse.Namespace:
    """Parse the benchmark's knobs; the defaults are the ones docs/codecs.md reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="none,fp16,int8,int8:channel,topk:0.1,topk:0.01")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--versions", type=int, default=150)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-repeats", type=int, default=200)
    return parser.parse_args()


def decode_ratio(codec: str, repeats: int, seed: int) -> tuple[float, float]:
    """Time decode_validated of one MNIST-1D-CNN update; return (MB/s of payload, x memcpy)."""
    model = get_task("mnist1d-cnn").build_model(seed).state_dict()
    delta = {name: torch.randn_like(t) if t.is_floating_point() else t for name, t in model.items()}
    schema = schema_of(delta)
    payload = encode(delta, codec)
    started = time.perf_counter()
    for _ in range(repeats):
        decode_validated(payload, schema, codec)
    decode_s = (time.perf_counter() - started) / repeats
    # The baseline: copy the very same bytes, which is all a zero-work decode would cost.
    buffer = bytearray(payload)
    started = time.perf_counter()
    for _ in range(repeats * 20):
        bytes(buffer)
    copy_s = (time.perf_counter() - started) / (repeats * 20)
    return len(payload) / decode_s / 1e6, decode_s / copy_s


async def federate(args: argparse.Namespace, codec: str) -> dict[str, object]:
    """Run one codec's federation and return its summary."""
    spec = SimulationSpec(
        task="mnist1d-cnn",
        devices=args.devices,
        training=TrainingConfig(num_devices=args.devices, seed=args.seed),
        speeds=parse_speed_profile("uniform"),
        target_accuracy=0.85,
        max_seconds=args.max_seconds,
        max_versions=args.versions,
        codec=codec,
    )
    strategy = StrategyConfig(name="fedbuff", buffer_size=4, staleness=StalenessConfig(name="sqrt"))
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=args.devices + 4, thread_name_prefix="bench-codecs")
    )
    result = await run_strategy(
        spec, strategy, ConnectionSettings(amqp_url="memory://", redis_url="memory://")
    )
    return result.summary()


def main() -> None:
    """Run every codec, then print a markdown table relative to `none`."""
    args = parse_args()
    torch.set_num_threads(1)
    codecs = [parse_codec(c.strip()) for c in args.codecs.split(",")]
    rows = []
    for codec in codecs:
        summary = asyncio.run(federate(args, codec))
        mb_s, ratio = decode_ratio(codec, args.decode_repeats, args.seed)
        per_update = int(summary["bytes_received"]) / max(1, int(summary["updates_applied"]))  # type: ignore[call-overload]
        rows.append(
            (codec, per_update, summary["final_accuracy"], summary["versions"], mb_s, ratio)
        )
        print(f"{codec}: {summary}", file=sys.stderr, flush=True)
    base_bytes, base_acc = rows[0][1], rows[0][2]
    print(
        "| codec | bytes/update | vs none | final accuracy | vs none (points) | versions "
        "| decode MB/s | decode time / memcpy |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for codec, per_update, acc, versions, mb_s, ratio in rows:
        delta = (
            "n/a"
            if acc is None or base_acc is None
            else f"{100 * (float(acc) - float(base_acc)):+.1f}"
        )  # type: ignore[arg-type]
        print(
            f"| {codec} | {per_update:,.0f} | {per_update / base_bytes:.3f}x | "
            f"{acc if acc is None else f'{float(acc):.3f}'} | {delta} | {versions} | "  # type: ignore[arg-type]
            f"{mb_s:,.0f} | {ratio:.0f}x |"
        )


if __name__ == "__main__":
    main()
