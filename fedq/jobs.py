"""Create a job and read its status: the operations behind `fedq job` and `fedq status`."""

from __future__ import annotations

import time
from typing import Any

from device_agent.tasks import get_task
from infra.errors import JobNotFound
from infra.protocols import Broker, DeviceTally, ModelStore
from schemas import JobConfig, StrategyConfig, TrainingConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex


def initial_job(
    job: str,
    task_name: str,
    strategy: StrategyConfig,
    training: TrainingConfig,
    *,
    require_signatures: bool = False,
    max_update_age_seconds: float | None = None,
    bind_device_users: bool = False,
) -> tuple[JobConfig, bytes, VersionMeta]:
    """Build the job config, the task's initial model bytes and version 0's meta."""
    task = get_task(task_name)
    state = task.build_model(training.seed).state_dict()
    model_bytes = encode(state)
    now = time.time()
    config = JobConfig(
        job=job,
        task=task_name,
        strategy=strategy,
        training=training,
        model_schema=schema_of(state),
        created_at=now,
        require_signatures=require_signatures,
        max_update_age_seconds=max_update_age_seconds,
        bind_device_users=bind_device_users,
    )
    meta = VersionMeta(
        version=0, created_at=now, sha256=sha256_hex(model_bytes), model_bytes=len(model_bytes)
    )
    return config, model_bytes, meta


async def create_job(
    store: ModelStore,
    broker: Broker,
    config: JobConfig,
    model: bytes,
    meta: VersionMeta,
    *,
    log_stream: bool = True,
) -> None:
    """Declare the job's queues, then store its config and version 0 (JobExists if present).

    With `log_stream` every update is also kept in the stream `fedq.log.{J}`, which
    `fedq record` reads.
    """
    await broker.declare_job(config.job, log_stream=log_stream)
    await store.create_job(config, model, meta)


async def job_status(store: ModelStore, broker: Broker | None = None) -> dict[str, Any]:
    """Summarize a job: version, accuracy, update counts, rate, staleness by device, queue."""
    config = await store.get_config()
    version = await store.current_version()
    latest_eval = await store.latest_eval()
    rejections = await store.rejection_counts()
    status: dict[str, Any] = {
        "job": config.job,
        "task": config.task,
        "strategy": config.strategy.name,
        "version": version,
        "accuracy": latest_eval[1].get("accuracy") if latest_eval else None,
        "evaluated_version": latest_eval[0] if latest_eval else None,
        "applied_updates": await store.applied_count(),
        "dead_lettered": sum(rejections.values()),
        "dead_lettered_by_reason": rejections,
        "versions_per_minute": await store.recent_versions(60.0),
        "last_version_age_seconds": await _age_of(store, version),
        **staleness_summary(await store.device_tallies()),
    }
    if broker is not None:
        ready, consumers = await broker.queue_depth(config.job)
        status["queue"] = {"ready": ready, "consumers": consumers}
    return status


async def _age_of(store: ModelStore, version: int) -> float | None:
    meta = await store.get_meta(version)
    return None if meta is None else round(max(time.time() - meta.created_at, 0.0), 1)


def staleness_summary(tallies: list[DeviceTally]) -> dict[str, Any]:
    """Return the mean and max staleness over all applied updates, and each device's share."""
    applied = sum(t.applied for t in tallies)
    return {
        "staleness_mean": round(sum(t.staleness_sum for t in tallies) / applied, 3)
        if applied
        else None,
        "staleness_max": max((t.staleness_max for t in tallies), default=None),
        "devices": [
            {
                "device_id": t.device_id,
                "applied": t.applied,
                "staleness_mean": round(t.staleness_mean, 3),
                "staleness_max": t.staleness_max,
            }
            for t in tallies
        ],
    }


__all__ = ["JobNotFound", "create_job", "initial_job", "job_status"]
