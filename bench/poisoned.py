"""One poisoned device out of five: final accuracy under plain mean, median, trimmed mean, clipping.

Run: `python bench/poisoned.py [--versions 30] [--task digits-mlp]`.
Five devices train on non-IID digits (FedAvg rounds of all five by default, so each round
holds exactly one poisoned update and runs repeat; `--strategy fedbuff` for K=5); device 0 is
malicious. It trains honestly,
then publishes a corrupted delta: "scaled" (delta x -10), "sign" (delta x -1) or "random"
(Gaussian noise of norm 100). Every attack runs with the plain mean, the coordinate median,
the trimmed mean (0.2 of 5: one value cut at each end) and norm clipping, next to a clean run.
Each run is the real Aggregator and DeviceAgents over the in-process broker and store, stopped
after a fixed number of versions; the final model is evaluated on the test set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.service import Aggregator
from device_agent.agent import DeviceAgent
from device_agent.sender import build_update, send_update
from device_agent.tasks import get_task
from device_agent.training import evaluate, train_local
from fedq.jobs import create_job, initial_job
from infra.connect import MemoryBackends, open_broker, open_store
from infra.settings import ConnectionSettings
from schemas import StrategyConfig, TrainingConfig
from schemas.codec import decode

Delta = dict[str, Tensor]
Attack = Callable[[Delta, torch.Generator], Delta]
MEMORY = ConnectionSettings(amqp_url="memory://", redis_url="memory://")


def scaled(delta: Delta, _: torch.Generator) -> Delta:
    """Boost the update and point it the wrong way: x -10."""
    return {k: v * -10.0 if v.is_floating_point() else v for k, v in delta.items()}


def sign_flipped(delta: Delta, _: torch.Generator) -> Delta:
    """Send the honest step backwards, at honest size."""
    return {k: -v if v.is_floating_point() else v for k, v in delta.items()}


def random_noise(delta: Delta, gen: torch.Generator, norm: float = 100.0) -> Delta:
    """Replace the update by Gaussian noise with a global L2 norm of `norm`."""
    noise = {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
        for k, v in delta.items()
    }
    total = sum(float(v.pow(2).sum()) for v in noise.values() if v.is_floating_point()) ** 0.5
    return {k: v * (norm / total) if v.is_floating_point() else v for k, v in noise.items()}


ATTACKS: dict[str, Attack] = {"scaled": scaled, "sign": sign_flipped, "random": random_noise}


class MaliciousAgent(DeviceAgent):
    """A device that trains honestly, then publishes `attack(delta)` instead of its delta."""

    def __init__(self, *, attack: Attack, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.attack = attack
        self._gen = torch.Generator().manual_seed(1234)

    async def train_and_publish(self, version: int, model_bytes: bytes) -> None:
        """Run one honest local round, corrupt its delta, publish it like any device."""
        start = await asyncio.to_thread(decode, model_bytes)
        self.model.load_state_dict(start)
        seed = random.Random(f"{self.config.training.seed}:{self.device_id}:{self.sent}")
        result = await asyncio.to_thread(
            train_local,
            self.model,
            self.x,
            self.y,
            self.config.training,
            seed=seed.randrange(2**31),
            global_params=start,
        )
        trained = self.model.state_dict()
        honest = {name: trained[name].detach() - start[name] for name in start}
        header, payload = build_update(
            self.config,
            device_id=self.device_id,
            base_version=version,
            num_samples=result.num_samples,
            delta=self.attack(honest, self._gen),
            train_metrics={"loss": result.loss, "accuracy": result.accuracy},
        )
        await send_update(self.broker, self.store, self.config, header, payload)
        self.sent += 1


@dataclass(frozen=True)
class Case:
    """One row of the table: which attack (None: clean) against which defence."""

    attack: str | None
    defence: str
    strategy: StrategyConfig


async def run_case(
    case: Case, task: str, training: TrainingConfig, versions: int, max_seconds: float
) -> float:
    """Federate until `versions` versions or `max_seconds`; return the final test accuracy."""
    memory = MemoryBackends()
    job = f"poison-{uuid.uuid4().hex[:8]}"
    broker = await open_broker(MEMORY, memory)
    store = open_store(MEMORY, job, memory)
    config, model, meta = initial_job(job, task, case.strategy, training)
    await create_job(store, broker, config, model, meta)
    common = {"broker": broker, "store": store, "retry_seconds": 0.2}
    agents: list[DeviceAgent] = [
        MaliciousAgent(attack=ATTACKS[case.attack], device_id="device-0", device_index=0, **common)
        if case.attack is not None and i == 0
        else DeviceAgent(device_id=f"device-{i}", device_index=i, **common)  # type: ignore[arg-type]
        for i in range(training.num_devices)
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            aggregator = await stack.enter_async_context(
                Aggregator(job=job, broker=broker, store=store, retry_seconds=0.2)
            )
            aggregating = asyncio.create_task(aggregator.run())
            for agent in agents:
                await stack.enter_async_context(agent)
            training_tasks = [asyncio.create_task(agent.run()) for agent in agents]
            # A poisoned model can go non-finite; honest devices then cannot publish and a
            # FedAvg round never fills, so the deadline ends the run with the model it has.
            deadline = time.monotonic() + max_seconds
            version = 0
            while version < versions and time.monotonic() < deadline and not aggregating.done():
                await store.wait_for_version(version, 0.5)
                version = await store.current_version()
            for agent in agents:
                agent.stop()
            for t in training_tasks:
                t.cancel()
            await asyncio.gather(*training_tasks, return_exceptions=True)
            aggregator.stop()
            await aggregating
        _, final = await store.latest()
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()
    net = get_task(task).build_model(training.seed)
    net.load_state_dict(decode(final))
    data = get_task(task).load_data(training.seed)
    return evaluate(net, data.x_test, data.y_test)["accuracy"]


def cases(strategy: str, buffer_size: int, clip_norm: float) -> list[Case]:
    """Every defence without an attack, then each attack under each defence."""
    base = StrategyConfig.model_validate(
        {"name": strategy, "buffer_size": buffer_size, "max_staleness": 100}
    )
    defences = {
        "mean": base,
        "median": base.model_copy(update={"aggregation": "median"}),
        "trimmed_mean": base.model_copy(update={"aggregation": "trimmed_mean"}),
        f"clip {clip_norm:g}": base.model_copy(update={"clip_norm": clip_norm}),
    }
    # Clean runs under every defence too: what robustness costs when nobody attacks.
    out = [Case(None, name, cfg) for name, cfg in defences.items()]
    for attack in ATTACKS:
        out += [Case(attack, name, cfg) for name, cfg in defences.items()]
    return out


def parse_args() -> argparse.Namespace:
    """Parse the experiment's knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument(
        "--strategy",
        choices=("fedavg", "fedbuff"),
        default="fedavg",
        help="fedavg: every round holds each device once, so runs repeat exactly; fedbuff "
        "(K = devices) depends on arrival order and varies from run to run",
    )
    parser.add_argument("--versions", type=int, default=30)
    parser.add_argument("--dirichlet", type=float, default=1.0)
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.0,
        help="about an honest update's norm (digits-mlp: ~0.5-1.5 early, shrinking)",
    )
    parser.add_argument("--max-seconds", type=float, default=15.0, help="per run")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


async def main() -> None:
    """Run every case one after the other and print the table and a summary line."""
    args = parse_args()
    torch.set_num_threads(1)
    training = TrainingConfig(
        num_devices=args.devices, dirichlet_alpha=args.dirichlet, seed=args.seed
    )
    results: dict[tuple[str, str], float] = {}
    started = time.monotonic()
    print(f"{'attack':<8} {'defence':<14} {'final accuracy':>14}")
    for case in cases(args.strategy, args.devices, args.clip_norm):
        accuracy = await run_case(case, args.task, training, args.versions, args.max_seconds)
        attack = case.attack or "none"
        results[(attack, case.defence)] = accuracy
        print(f"{attack:<8} {case.defence:<14} {accuracy:>14.3f}", flush=True)
    clean = results[("none", "mean")]
    attacked = [k for k in results if k[0] != "none"]
    worst_mean = min(v for k, v in results.items() if k[0] != "none" and k[1] == "mean")
    worst_median = min(results[k] for k in attacked if k[1] == "median")
    worst_trimmed = min(results[k] for k in attacked if k[1] == "trimmed_mean")
    print(
        f"summary: clean {clean:.3f}; worst attack under mean {worst_mean:.3f}, "
        f"under median {worst_median:.3f}, under trimmed mean {worst_trimmed:.3f} "
        f"({args.task}, {args.strategy}, {args.devices} devices, 1 malicious, "
        f"{args.versions} versions, {time.monotonic() - started:.0f}s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
