"""Run the aggregator as a service: connect, consume until SIGTERM, close cleanly."""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry

from aggregator.edge_runner import serve_edge
from aggregator.metrics import AggregatorMetrics
from aggregator.service import Aggregator, AggregatorStats
from infra.connect import MemoryBackends, open_broker, open_store
from infra.health import backend_problems, health_server
from infra.lifecycle import stop_on_signals
from infra.settings import AggregatorSettings

log = logging.getLogger(__name__)


async def serve(
    settings: AggregatorSettings, memory: MemoryBackends | None = None
) -> AggregatorStats:
    """Run one aggregator for `settings.job` until SIGTERM/SIGINT, fencing, or idle drain."""
    if memory is None and settings.torch_threads is not None:
        # A service owns its process (in-process runs share theirs and set it themselves).
        torch.set_num_threads(settings.torch_threads)
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
