"""A deterministic federation: the real agents and aggregator, stepped in round-robin order.

`fedq simulate` runs its devices as concurrent tasks, so which update lands in which FedBuff
buffer depends on thread timing, and two runs with the same seeds end a point or more apart.
To compare runs that should differ in one thing only (the codec), this drives the very same
`DeviceAgent` and `Aggregator` over the in-memory broker and store one step at a time: device
`step % N` trains from the version it fetched after its previous update and publishes, and
the aggregator handles that one delivery before the next device goes. That is uniform device
speeds with no clock: N - 1 updates land between a device's fetch and its next update, so
with FedBuff K its staleness averages (N - 1) / K. The same inputs give the same versions,
bit for bit.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import torch

from aggregator.service import Aggregator
from device_agent.agent import DeviceAgent
from device_agent.tasks import Dataset, get_task
from device_agent.training import evaluate
from fedq.jobs import create_job, initial_job
from infra.connect import MemoryBackends, open_broker, open_store
from infra.protocols import Broker, ModelStore
from infra.settings import ConnectionSettings
from schemas import StrategyConfig, TrainingConfig
from schemas.codec import sha256_hex
from schemas.messages import Codec

_MEMORY = ConnectionSettings(amqp_url="memory://", redis_url="memory://")


@dataclass(frozen=True)
class LockstepSpec:
    """One deterministic run: task, devices, training, strategy, codec and version budget."""

    task: str
    devices: int
    training: TrainingConfig
    strategy: StrategyConfig
    versions: int
    codec: Codec = "none"
    # Score the global model every this many versions (and always the last one).
    eval_every: int = 25


@dataclass(frozen=True)
class LockstepResult:
    """What one deterministic run measured; `curve` is (version, test accuracy)."""

    versions: int
    updates_applied: int
    updates_rejected: int
    bytes_received: int
    mean_staleness: float
    final_accuracy: float
    final_loss: float
    curve: list[tuple[int, float]]
    model_sha256: str

    @property
    def bytes_per_update(self) -> float:
        return self.bytes_received / max(1, self.updates_applied)


async def run_lockstep(spec: LockstepSpec) -> LockstepResult:
    """Run the federation step by step until `spec.versions` are committed; return the figures."""
    if spec.devices < 1 or spec.versions < 1 or spec.eval_every < 1:
        raise ValueError("devices, versions and eval_every must all be >= 1")
    memory = MemoryBackends()
    job = f"lockstep-{uuid.uuid4().hex[:8]}"
    broker = await open_broker(_MEMORY, memory)
    store = open_store(_MEMORY, job, memory)
    training = spec.training.model_copy(update={"num_devices": spec.devices})
    config, model, meta = initial_job(job, spec.task, spec.strategy, training)
    await create_job(store, broker, config, model, meta, log_stream=False)
    try:
        return await _drive(spec, job, broker, store)
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


async def _drive(spec: LockstepSpec, job: str, broker: Broker, store: ModelStore) -> LockstepResult:
    """Step devices in turn, one delivery handled per published update."""
    task = get_task(spec.task)
    data = task.load_data(spec.training.seed)
    scorer = task.build_model(spec.training.seed)
    agents = [
        DeviceAgent(
            device_id=f"device-{i}", broker=broker, store=store, device_index=i, codec=spec.codec
        )
        for i in range(spec.devices)
    ]
    curve: list[tuple[int, float]] = []
    async with contextlib.AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(
            Aggregator(job=job, broker=broker, store=store)
        )
        for agent in agents:
            await stack.enter_async_context(agent)
        deliveries = broker.consume(job, prefetch=aggregator.prefetch)
        bases = [await store.latest() for _ in agents]
        step = 0
        # Rejected or diverged rounds make no version; give up rather than loop forever.
        limit = 10 * spec.versions * spec.strategy.buffer_size + spec.devices
        while aggregator.version < spec.versions:
            if step > limit:
                raise RuntimeError(f"no progress: version {aggregator.version} after {step} steps")
            i = step % spec.devices
            sent = agents[i].sent
            await agents[i].train_and_publish(*bases[i])
            if agents[i].sent > sent:  # a diverged round publishes nothing
                before = aggregator.version
                await aggregator.handle(await anext(deliveries))
                if aggregator.version != before and aggregator.version % spec.eval_every == 0:
                    curve.append((aggregator.version, _score(scorer, aggregator.model, data)[0]))
            bases[i] = await store.latest()
            step += 1
        await deliveries.aclose()
        accuracy, loss = _score(scorer, aggregator.model, data)
        if not curve or curve[-1][0] != aggregator.version:
            curve.append((aggregator.version, accuracy))
        stats = aggregator.stats
        _, final_bytes = await store.latest()
    received = 0
    for version in range(1, stats.versions + 1):
        version_meta = await store.get_meta(version)
        received += version_meta.update_bytes if version_meta is not None else 0
    return LockstepResult(
        versions=stats.versions,
        updates_applied=stats.applied,
        updates_rejected=sum(stats.rejected.values()),
        bytes_received=received,
        mean_staleness=stats.staleness_total / max(1, stats.applied),
        final_accuracy=accuracy,
        final_loss=loss,
        curve=curve,
        model_sha256=sha256_hex(final_bytes),
    )


def _score(
    scorer: torch.nn.Module, state: dict[str, torch.Tensor], data: Dataset
) -> tuple[float, float]:
    """Evaluate a global model on the task's held-out split, as the evaluator role does."""
    scorer.load_state_dict(state)
    metrics = evaluate(scorer, data.x_test, data.y_test)
    return metrics["accuracy"], metrics["loss"]
