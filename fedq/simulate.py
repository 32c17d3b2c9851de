"""`fedq simulate`: a whole federation in one process, and strategies measured side by side.

The very same components as the deployed system run here -- `Aggregator`, `DeviceAgent`,
`Evaluator` -- over the in-process broker and store by default, or over real RabbitMQ and
Redis when URLs are given. Devices really train; a slow device additionally waits
(slowdown - 1) x its measured compute time, so heterogeneity costs wall time honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.service import Aggregator
from device_agent.agent import DeviceAgent
from device_agent.evaluator import Evaluator
from fedq.jobs import create_job, initial_job
from fedq.speeds import SpeedProfile, slowdowns
from infra.connect import MEMORY_SCHEME, MemoryBackends, open_broker, open_store
from infra.protocols import Broker, ModelStore
from infra.settings import ConnectionSettings
from schemas import StrategyConfig, TrainingConfig
from schemas.messages import Codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate: the same devices, data and budget for every strategy."""

    task: str
    devices: int
    training: TrainingConfig
    speeds: SpeedProfile
    target_accuracy: float
    max_seconds: float
    max_versions: int | None = None
    stop_at_target: bool = False
    # Update codec of every device (schemas/compression.py); the same for all, like the data.
    codec: Codec = "none"

    @property
    def seed(self) -> int:
        return self.training.seed


@dataclass(frozen=True)
class VersionRow:
    """One committed version as the metrics CSV records it (cumulative counts)."""

    version: int
    wall_seconds: float
    accuracy: float | None
    loss: float | None
    updates_applied: int
    mean_staleness: float
    bytes_received: int


@dataclass
class RunResult:
    """Everything measured about one strategy's run."""

    strategy: str
    rows: list[VersionRow]
    staleness: list[int]
    updates_per_device: dict[str, int]
    updates_sent: int
    updates_rejected: int
    wall_seconds: float
    target_accuracy: float
    samples_trained: int = 0

    @property
    def first_at_target(self) -> VersionRow | None:
        return next(
            (r for r in self.rows if r.accuracy is not None and r.accuracy >= self.target_accuracy),
            None,
        )

    def summary(self) -> dict[str, object]:
        """The run's entry in results.json."""
        reached = self.first_at_target
        evaluated = [r for r in self.rows if r.accuracy is not None]
        last = self.rows[-1] if self.rows else None
        return {
            "strategy": self.strategy,
            "time_to_target_s": round(reached.wall_seconds, 3) if reached else None,
            "client_trips_to_target": reached.updates_applied if reached else None,
            "final_accuracy": evaluated[-1].accuracy if evaluated else None,
            "versions": last.version if last else 0,
            "updates_applied": last.updates_applied if last else 0,
            "updates_rejected": self.updates_rejected,
            "updates_sent": self.updates_sent,
            "bytes_received": last.bytes_received if last else 0,
            "mean_staleness": (sum(self.staleness) / len(self.staleness)) if self.staleness else 0,
            "wall_seconds": round(self.wall_seconds, 3),
        }


@dataclass
class Progress:
    """Live figures of the run in progress, for the display."""

    strategy: str
    started: float = field(default_factory=time.monotonic)
    version: int = 0
    accuracy: float | None = None
    applied: int = 0
    mean_staleness: float = 0.0
    done: bool = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def updates_per_second(self) -> float:
        return self.applied / self.elapsed if self.elapsed > 0 else 0.0


async def run_strategy(
    spec: SimulationSpec,
    strategy: StrategyConfig,
    settings: ConnectionSettings,
    on_progress: Callable[[Progress], None] = lambda _: None,
) -> RunResult:
    """Run one federation with `strategy` until the budget ends; return what was measured."""
    memory = MemoryBackends() if settings.amqp_url.startswith(MEMORY_SCHEME) else None
    job = f"sim-{strategy.name}-{uuid.uuid4().hex[:8]}"
    broker = await open_broker(settings, memory)
    store = open_store(settings, job, memory)
    training = spec.training.model_copy(update={"num_devices": spec.devices})
    config, model, meta = initial_job(job, spec.task, strategy, training)
    # A simulation is measured, not recorded: no log stream to hold every update.
    await create_job(store, broker, config, model, meta, log_stream=False)
    progress = Progress(strategy=strategy.name)
    try:
        started = time.time()
        sent = await _federate(spec, job, broker, store, progress, on_progress)
        return await _collect(spec, strategy.name, store, started, time.time() - started, sent)
    finally:
        progress.done = True
        on_progress(progress)
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


async def _federate(
    spec: SimulationSpec,
    job: str,
    broker: Broker,
    store: ModelStore,
    progress: Progress,
    on_progress: Callable[[Progress], None],
) -> int:
    """Run aggregator, evaluator and devices until the budget ends; return updates sent."""
    factors = slowdowns(spec.speeds, spec.devices, spec.seed)
    agents = [
        DeviceAgent(
            device_id=f"device-{i}",
            broker=broker,
            store=store,
            slowdown=factors[i],
            device_index=i,
            codec=spec.codec,
            retry_seconds=0.2,
        )
        for i in range(spec.devices)
    ]
    async with contextlib.AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(
            Aggregator(job=job, broker=broker, store=store, retry_seconds=0.2)
        )
        aggregating = asyncio.create_task(aggregator.run())
        evaluator = Evaluator(store=store, poll_seconds=0.2)
        evaluating = asyncio.create_task(evaluator.run())
        for agent in agents:
            await stack.enter_async_context(agent)
        training = [asyncio.create_task(agent.run()) for agent in agents]
        progress.started = time.monotonic()
        await _watch(spec, store, aggregator, progress, on_progress, aggregating)
        for agent in agents:
            agent.stop()
        for task in training:
            task.cancel()
        await asyncio.gather(*training, return_exceptions=True)
        aggregator.stop()
        await aggregating
        # The evaluator catches up on the last versions before the results are read.
        await _until_evaluated(store, await store.current_version(), timeout=60)
        evaluator.stop()
        await evaluating
    return sum(agent.sent for agent in agents)


async def _watch(
    spec: SimulationSpec,
    store: ModelStore,
    aggregator: Aggregator,
    progress: Progress,
    on_progress: Callable[[Progress], None],
    aggregating: asyncio.Task[object],
) -> None:
    """Refresh the progress figures until time, versions or (optionally) the target say stop."""
    while progress.elapsed < spec.max_seconds and not aggregating.done():
        await asyncio.sleep(0.25)
        progress.version = aggregator.version
        progress.applied = aggregator.stats.applied
        latest = await store.latest_eval()
        progress.accuracy = latest[1].get("accuracy") if latest else None
        progress.mean_staleness = aggregator.stats.staleness_total / max(1, progress.applied)
        on_progress(progress)
        if spec.max_versions is not None and progress.version >= spec.max_versions:
            break
        reached = progress.accuracy is not None and progress.accuracy >= spec.target_accuracy
        if spec.stop_at_target and reached:
            break
    if aggregating.done():
        aggregating.result()  # surface an aggregator crash instead of hiding it


async def _until_evaluated(store: ModelStore, version: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = await store.latest_eval()
        if latest is not None and latest[0] >= version:
            return
        await asyncio.sleep(0.1)
    log.warning("the evaluator did not reach version %d within %.0fs", version, timeout)


async def _collect(
    spec: SimulationSpec, strategy: str, store: ModelStore, started: float, wall: float, sent: int
) -> RunResult:
    """Read every committed version's meta back into rows and totals."""
    rows: list[VersionRow] = []
    staleness: list[int] = []
    per_device: dict[str, int] = {}
    applied = received = samples = 0
    for version in range(await store.current_version() + 1):
        meta = await store.get_meta(version)
        if meta is None:
            continue
        staleness += meta.staleness
        for device in meta.devices:
            per_device[device] = per_device.get(device, 0) + 1
        applied += len(meta.contributors)
        received += meta.update_bytes
        samples += meta.num_samples
        rows.append(
            VersionRow(
                version=version,
                wall_seconds=max(0.0, meta.created_at - started),
                accuracy=meta.eval.get("accuracy") if meta.eval else None,
                loss=meta.eval.get("loss") if meta.eval else None,
                updates_applied=applied,
                mean_staleness=sum(meta.staleness) / len(meta.staleness) if meta.staleness else 0,
                bytes_received=received,
            )
        )
    rejected = sum((await store.rejection_counts()).values())
    return RunResult(
        strategy=strategy,
        rows=rows,
        staleness=staleness,
        updates_per_device=per_device,
        updates_sent=sent,
        updates_rejected=rejected,
        wall_seconds=wall,
        target_accuracy=spec.target_accuracy,
        samples_trained=samples * spec.training.local_epochs,
    )
