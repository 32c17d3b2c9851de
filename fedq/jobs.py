"""Create a job and read its status: the operations behind `fedq job` and `fedq status`."""

from __future__ import annotations

import time
from typing import Any

from device_agent.tasks import get_task
from infra.errors import JobNotFound
from infra.protocols import Broker, ModelStore
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
    """Summarize a job: version, latest accuracy, applied and dead-lettered counts, queue."""
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
    }
    if broker is not None:
        ready, consumers = await broker.queue_depth(config.job)
        status["queue"] = {"ready": ready, "consumers": consumers}
    return status


__all__ = ["JobNotFound", "create_job", "initial_job", "job_status"]
