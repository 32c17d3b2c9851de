"""Metrics and probes: an aggregator's /metrics after real traffic, and /readyz flipping.

The readiness flip here uses in-process doubles whose link can be cut: the real services are
shared with every other test running at the same time. test_readiness_flip.py stops and
starts a private RabbitMQ node under a running aggregator instead.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from aggregator.runner import serve
from device_agent.agent import DeviceAgent
from device_agent.metrics import AgentMetrics
from fedq.jobs import create_job, initial_job
from infra.errors import BackendUnavailable
from infra.health import HealthServer, backend_problems
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.settings import AggregatorSettings
from schemas import StalenessConfig, StrategyConfig, TrainingConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import Backends, delta, edit_fields, job_backends, update

pytestmark = pytest.mark.integration
FEDBUFF_2 = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=0, staleness=StalenessConfig(name="constant")
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_blocking(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get_blocking, f"http://127.0.0.1:{port}{path}")


def _samples(text: str, job: str) -> dict[str, float]:
    """Flatten one job's samples to `name` or `name{reason}` -> value."""
    flat = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("fedq_job") != job:
                continue
            reason = sample.labels.get("reason")
            flat[f"{sample.name}{{{reason}}}" if reason else sample.name] = sample.value
    return flat


async def _publish(backends: Backends, built: tuple[dict, bytes, str]) -> None:
    headers, body, update_id = built
    await backends.broker.publish_raw(
        backends.config.job, body, headers=headers, message_id=update_id
    )


async def _scrape_until_received(port: int, job: str, count: int) -> dict[str, float]:
    deadline = time.monotonic() + 20
    samples: dict[str, float] = {}
    while True:
        try:
            status, text = await _get(port, "/metrics")
        except urllib.error.URLError:
            status, text = 0, ""  # not listening yet: `serve` is still connecting
        if status == 200:
            samples = _samples(text, job)
            if samples.get("fedq_aggregator_updates_received_total") == count:
                return samples
        assert time.monotonic() < deadline, f"only got {samples}"
        await asyncio.sleep(0.1)


async def test_aggregator_metrics_count_what_was_published(job_id: str) -> None:
    async with job_backends("real", job_id, FEDBUFF_2) as backends:
        # Arrange: A, B -> v1; A again (duplicate); C, D -> v2; then four bad updates at v2
        first = update(job_id, delta(1.0))
        good = [first, update(job_id, delta(2.0)), first]
        good += [update(job_id, delta(3.0), base_version=1) for _ in range(2)]
        headers, body, update_id = update(job_id, delta(1.0), base_version=2)
        bad = [
            update(job_id, delta(1.0), base_version=2, payload_blake3="0" * 64),
            update(job_id, delta(1.0), base_version=2, payload_blake3="1" * 64),
            (edit_fields(headers, drop=("device_id",)), body, update_id),
            update(job_id, delta(1.0), base_version=0),
        ]
        for built in good + bad:
            await _publish(backends, built)
        port = _free_port()
        settings = AggregatorSettings(
            job=job_id,
            amqp_url=AMQP_URL,
            redis_url=REDIS_URL,
            metrics_port=port,
            metrics_host="127.0.0.1",
            idle_exit_seconds=1.5,
        )
        # Act
        serving = asyncio.create_task(serve(settings))
        try:
            samples = await _scrape_until_received(port, job_id, len(good) + len(bad))
            probes = [await _get(port, "/healthz"), await _get(port, "/readyz")]
        finally:
            stats = await serving
        # Assert
        assert samples["fedq_aggregator_updates_applied_total"] == 4
        assert samples["fedq_aggregator_updates_duplicate_total"] == 1
        assert samples["fedq_aggregator_versions_committed_total"] == 2
        assert samples["fedq_aggregator_version"] == 2
        assert samples["fedq_aggregator_buffer_updates"] == 0
        assert samples["fedq_aggregator_buffer_size"] == 2
        assert samples["fedq_aggregator_updates_dead_lettered_total{hash_mismatch}"] == 2
        assert samples["fedq_aggregator_updates_dead_lettered_total{malformed_header}"] == 1
        assert samples["fedq_aggregator_updates_dead_lettered_total{too_stale}"] == 1
        assert samples["fedq_aggregator_update_staleness_count"] == 4
        assert samples["fedq_aggregator_update_staleness_sum"] == 0
        assert samples["fedq_aggregator_fold_seconds_count"] == 4
        assert samples["fedq_aggregator_commit_seconds_count"] == 2
        assert samples["fedq_aggregator_received_bytes_total"] == sum(
            len(b) for _, b, _ in good + bad
        )
        assert probes == [(200, "ok\n"), (200, "ready\n")]
        assert stats.applied == 4 and sum(stats.rejected.values()) == len(bad)


class _CuttableBroker(MemoryBroker):
    """The in-process broker with a link that a test can cut."""

    connected = True

    def is_connected(self) -> bool:
        return self.connected


class _CuttableStore(MemoryModelStore):
    """The in-process store with a link that a test can cut."""

    reachable = True

    async def current_version(self) -> int:
        if not self.reachable:
            raise BackendUnavailable("redis: connection refused")
        return await super().current_version()


async def test_readyz_follows_the_broker_and_store_links(job_id: str) -> None:
    # Arrange: a job on cuttable in-process backends, probes on a free port
    broker, store = _CuttableBroker(), _CuttableStore(MemoryStoreHub(), job_id)
    config, model, meta = initial_job(job_id, "digits-mlp", StrategyConfig(), TrainingConfig())
    await create_job(store, broker, config, model, meta)

    async def readiness() -> list[str]:
        return await backend_problems(store=store, broker=broker)

    server = HealthServer(
        registry=CollectorRegistry(), readiness=readiness, port=0, host="127.0.0.1"
    )
    async with server:
        # Act / Assert: ready, then each link cut in turn, then ready again
        assert await _get(server.port, "/readyz") == (200, "ready\n")
        broker.connected = False
        status, body = await _get(server.port, "/readyz")
        assert (status, body) == (503, "broker: not connected\n")
        broker.connected, store.reachable = True, False
        status, body = await _get(server.port, "/readyz")
        assert status == 503 and body.startswith("store: BackendUnavailable")
        store.reachable = True
        assert await _get(server.port, "/readyz") == (200, "ready\n")
        # Liveness does not depend on the backends; unknown paths are 404
        broker.connected = False
        assert await _get(server.port, "/healthz") == (200, "ok\n")
        assert (await _get(server.port, "/nope"))[0] == 404


async def test_agent_round_is_counted(job_id: str) -> None:
    # Arrange: one device on the in-process backends, counting into a registry of ours
    broker, store = MemoryBroker(), MemoryModelStore(MemoryStoreHub(), job_id)
    training = TrainingConfig(num_devices=4, local_epochs=1)
    config, model, meta = initial_job(job_id, "digits-mlp", StrategyConfig(), training)
    await create_job(store, broker, config, model, meta)
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, job_id, "dev-a")
    labels = {"fedq_job": job_id, "device": "dev-a"}
    # Act
    async with DeviceAgent(
        device_id="dev-a", broker=broker, store=store, device_index=1, metrics=metrics, updates=1
    ) as agent:
        await agent.run()
    # Assert
    assert registry.get_sample_value("fedq_agent_updates_sent_total", labels) == 1
    assert registry.get_sample_value("fedq_agent_publish_seconds_count", labels) == 1
    assert registry.get_sample_value("fedq_agent_training_seconds_count", labels) == 1
    assert registry.get_sample_value("fedq_agent_last_version_seen", labels) == 0
