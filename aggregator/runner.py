"""Run the aggregator as a service: connect, consume until SIGTERM, close cleanly."""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry

from aggregator.edge_runner import serve_edge
from aggregator.metrics import AggregatorMetrics
from aggregator.service import Aggregator, AggregatorStats
from infra.connect import MemoryBackends, open_broker, open_store
from infra.errors import BackendUnavailable, JobNotFound
from infra.health import backend_problems, health_server
from infra.lifecycle import stop_on_signals
from infra.settings import AggregatorSettings
from schemas.codec import schema_nbytes

log = logging.getLogger(__name__)
# Under this model size torch's intra-op threads cost more than they save: every parallel
# region wakes the other threads and parks them again (futex round trips, 10% of the
# aggregator's CPU in `perf` at 1 MB) for tensors too small to share. Drains on 2 cores
# (`ingest-drain`, two alternating pairs): 1 MB updates 363-371 -> 425-432 updates/s with one
# thread, 10 MB 57.5-61.0 -> 51.7-56.1 (so from some size on, torch's default is kept).
SMALL_MODEL_BYTES = 4 * 2**20


def torch_threads_for(model_bytes: int, configured: int | None) -> int | None:
    """Return the intra-op threads to set for a model of `model_bytes`: the configured count
    if any, one for a small model, else None (torch's default, one per core)."""
    if configured is not None:
        return configured
    return 1 if model_bytes < SMALL_MODEL_BYTES else None


async def serve(
    settings: AggregatorSettings, memory: MemoryBackends | None = None
) -> AggregatorStats:
    """Run one aggregator for `settings.job` until SIGTERM/SIGINT, fencing, or idle drain."""
    if memory is None:
        # A service owns its process (in-process runs share theirs and set it themselves).
        await _set_torch_threads(settings)
    if settings.upstream is not None:
        # Edge mode: this job's updates go upstream in partial updates; nothing commits here.
        return await serve_edge(settings, memory)
    registry = CollectorRegistry()
    broker = await open_broker(settings, memory)
    store = open_store(settings, settings.job, memory)
    try:
        aggregator = Aggregator(
            job=settings.job,
            broker=broker,
            store=store,
            prefetch=settings.prefetch,
            idle_timeout=settings.idle_exit_seconds,
            metrics=AggregatorMetrics(registry, settings.job),
        )

        async def readiness() -> list[str]:
            problems = await backend_problems(store=store, broker=broker)
            if not aggregator.consuming:
                problems.append("aggregator: not consuming")
            return problems

        async with health_server(settings, registry, readiness), aggregator:
            # In-process (memory://) components belong to `fedq simulate`, which owns signals.
            with stop_on_signals(aggregator.stop, enabled=memory is None):
                stats = await aggregator.run()
    finally:
        await store.close()
        await broker.close()
    log.info(
        "aggregator stopped: %d received, %d applied, %d duplicates, rejected %s, %d versions",
        stats.received,
        stats.applied,
        stats.duplicates,
        stats.rejected,
        stats.versions,
    )
    return stats


async def _set_torch_threads(settings: AggregatorSettings) -> None:
    """Set torch's threads for this process before any worker thread starts (a thread keeps
    the count it started with): FEDQ_TORCH_THREADS, or one for a small model."""
    model_bytes = SMALL_MODEL_BYTES  # while the size is unknown, torch's default stands
    if settings.torch_threads is None:
        store = open_store(settings, settings.job, None)
        try:
            model_bytes = schema_nbytes((await store.get_config()).model_schema)
        except (JobNotFound, BackendUnavailable):
            pass  # the aggregator itself reports either a moment later
        finally:
            await store.close()
    threads = torch_threads_for(model_bytes, settings.torch_threads)
    if threads is not None:
        torch.set_num_threads(threads)
