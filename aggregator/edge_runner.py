"""Run an edge aggregator: validate an edge job's updates, forward them, mirror the root."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry

from aggregator.edge import EdgeForwarder, EdgeStats
from aggregator.metrics import AggregatorMetrics
from aggregator.mirror import check_edge_job, check_same_model, mirror_forever, mirror_once
from aggregator.service import Aggregator, AggregatorStats
from device_agent.runner import read_private_key
from infra.connect import MemoryBackends, open_broker, open_store
from infra.forward_ledger import ForwardLedger, MemoryForwardLedger, RedisForwardLedger
from infra.health import backend_problems, health_server
from infra.lifecycle import stop_on_signals
from infra.protocols import Broker, ModelStore
from infra.settings import AggregatorSettings

log = logging.getLogger(__name__)


class EdgeAggregator:
    """An edge job's aggregator: its validated updates go upstream in partial updates.

    Use as an async context manager, then `await run()`, like `Aggregator`.
    """

    def __init__(
        self,
        *,
        job: str,
        upstream: str,
        broker: Broker,
        store: ModelStore,
        upstream_store: ModelStore,
        ledger: ForwardLedger,
        device_id: str | None = None,
        signing_key: str | None = None,
        prefetch: int | None = None,
        idle_timeout: float | None = None,
        flush_seconds: float = 10.0,
        retry_seconds: float = 1.0,
        metrics: AggregatorMetrics | None = None,
    ) -> None:
        self.job = job
        self.upstream = upstream
        self.broker = broker
        self.store = store
        self.upstream_store = upstream_store
        self.ledger = ledger
        self.device_id = device_id or f"edge-{job}"
        self._signing_key = signing_key
        self._prefetch = prefetch
        self._idle_timeout = idle_timeout
        # In drain mode the last group must go out before the consumer stops.
        self._flush_seconds = (
            flush_seconds if idle_timeout is None else min(flush_seconds, idle_timeout / 2)
        )
        self._retry_seconds = retry_seconds
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self.forwarder: EdgeForwarder
        self.aggregator: Aggregator | None = None

    @property
    def consuming(self) -> bool:
        """True while the edge job's queue is consumed."""
        return self.aggregator is not None and self.aggregator.consuming

    async def __aenter__(self) -> EdgeAggregator:
        edge_config = await self.store.get_config()
        root_config = await self.upstream_store.get_config()
        check_edge_job(edge_config, root_config)
        await check_same_model(self.upstream_store, self.store)
        await mirror_once(self.upstream_store, self.store)
        self.forwarder = EdgeForwarder(
            upstream=root_config,
            broker=self.broker,
            upstream_store=self.upstream_store,
            ledger=self.ledger,
            device_id=self.device_id,
            buffer_size=edge_config.strategy.buffer_size,
            flush_seconds=self._flush_seconds,
            signing_key=self._signing_key,
            retry_seconds=self._retry_seconds,
            give_up=self._stopping,
        )
        self.aggregator = aggregator = Aggregator(
            job=self.job,
            broker=self.broker,
            store=self.store,
            prefetch=self._prefetch,
            idle_timeout=self._idle_timeout,
            retry_seconds=self._retry_seconds,
            metrics=self._metrics,
            sink=self.forwarder.accept,
        )
        await aggregator.__aenter__()
        log.info(
            "edge aggregator for job %s forwards groups of %d to job %s as device %s",
            self.job,
            edge_config.strategy.buffer_size,
            self.upstream,
            self.device_id,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.forwarder.drop()
        await self._inner().__aexit__(*exc_info)

    @property
    def aggregator_stats(self) -> AggregatorStats:
        """The edge job's receive-side counters (received, duplicates, dead-lettered)."""
        return self._inner().stats

    def _inner(self) -> Aggregator:
        if self.aggregator is None:
            raise RuntimeError("enter the EdgeAggregator context first")
        return self.aggregator

    def stop(self) -> None:
        """Ask the edge to stop after the update in hand; held groups are redelivered."""
        self._stopping.set()
        if self.aggregator is not None:
            self.aggregator.stop()

    async def run(self) -> EdgeStats:
        """Consume, forward and mirror until stopped, idle (drain mode), or a helper fails."""
        aggregator = self._inner()
        consuming = asyncio.ensure_future(aggregator.run())
        helpers = [
            asyncio.ensure_future(
                mirror_forever(
                    self.upstream_store,
                    self.store,
                    self._stopping,
                    retry_seconds=self._retry_seconds,
                )
            ),
            asyncio.ensure_future(self._flush_forever()),
        ]
        try:
            await asyncio.wait([consuming, *helpers], return_when=asyncio.FIRST_COMPLETED)
            if not consuming.done():
                aggregator.stop()  # a helper failed: stop consuming, then report it
            await consuming
            for helper in helpers:
                if helper.done():
                    helper.result()  # re-raises the helper's error
        finally:
            self._stopping.set()
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
        return self.forwarder.stats

    async def _flush_forever(self) -> None:
        tick = min(1.0, self._flush_seconds / 4)
        while not self._stopping.is_set():
            await asyncio.sleep(tick)
            await self.forwarder.flush_due()


async def serve_edge(
    settings: AggregatorSettings, memory: MemoryBackends | None = None
) -> AggregatorStats:
    """Run the edge aggregator of `settings.job` under `settings.upstream` until SIGTERM."""
    assert settings.upstream is not None
    signing_key = (
        None if settings.device_key_file is None else read_private_key(settings.device_key_file)
    )
    registry = CollectorRegistry()
    broker = await open_broker(settings, memory)
    store = open_store(settings, settings.job, memory)
    upstream_store = open_store(settings, settings.upstream, memory)
    ledger: ForwardLedger = (
        MemoryForwardLedger()
        if memory is not None
        else RedisForwardLedger.from_url(settings.redis_url, settings.job)
    )
    try:
        edge = EdgeAggregator(
            job=settings.job,
            upstream=settings.upstream,
            broker=broker,
            store=store,
            upstream_store=upstream_store,
            ledger=ledger,
            device_id=settings.device_id or None,
            signing_key=signing_key,
            prefetch=settings.prefetch,
            idle_timeout=settings.idle_exit_seconds,
            flush_seconds=settings.edge_flush_seconds,
            metrics=AggregatorMetrics(registry, settings.job),
        )

        async def readiness() -> list[str]:
            problems = await backend_problems(store=store, broker=broker)
            problems += await backend_problems(store=upstream_store)
            if not edge.consuming:
                problems.append("edge aggregator: not consuming")
            return problems

        async with health_server(settings, registry, readiness), edge:
            with stop_on_signals(edge.stop, enabled=memory is None):
                stats = await edge.run()
    finally:
        await ledger.close()
        await upstream_store.close()
        await store.close()
        await broker.close()
    log.info(
        "edge aggregator stopped: %d updates forwarded in %d partials, %d duplicates",
        stats.forwarded_updates,
        stats.partials,
        stats.duplicates,
    )
    return edge.aggregator_stats
