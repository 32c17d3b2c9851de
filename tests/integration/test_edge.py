"""Edge aggregators (hierarchical mode) on the real RabbitMQ and Redis.

Two edge jobs under one root: the root's model must equal the flat FedBuff aggregation of
the same device updates, and an edge that crashes anywhere between planning a partial
update and acking its members must not make the root count any device update twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from aggregator.edge_runner import EdgeAggregator
from aggregator.mirror import EdgeMismatch, mirror_once
from fedq.cli import app
from infra.forward_ledger import ForwardLedger, RedisForwardLedger
from infra.protocols import Broker
from schemas import StalenessConfig, StrategyConfig, UpdateHeader, VersionMeta
from schemas.codec import decode, encode, sha256_hex
from schemas.signing import generate_key_pair
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import INITIAL, Backends, drain, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _fedbuff(k: int) -> StrategyConfig:
    return StrategyConfig(
        name="fedbuff",
        buffer_size=k,
        max_staleness=100,
        staleness=StalenessConfig(name="constant"),
        weighting="samples",
    )


def _device_updates(count: int) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Known deltas with distinct sample counts (seeded, so every run sees the same)."""
    generator = torch.Generator().manual_seed(7)
    return [
        (
            {"w": torch.randn(4, generator=generator), "b": torch.randn(1, generator=generator)},
            3 + 5 * i,
        )
        for i in range(count)
    ]


async def _publish(
    backends: Backends, parts: Sequence[tuple[dict[str, torch.Tensor], int]]
) -> list[str]:
    """Publish device updates from base version 0; return their ids."""
    job = backends.config.job
    ids = []
    for i, (delta, n) in enumerate(parts):
        headers, body, update_id = update(job, delta, num_samples=n, device_id=f"dev-{i}")
        await backends.broker.publish_raw(job, body, headers=headers, message_id=update_id)
        ids.append(update_id)
    return ids


async def _model(backends: Backends) -> dict[str, torch.Tensor]:
    _, data = await backends.store.latest()
    return decode(data)


@contextlib.asynccontextmanager
async def _ledger(job: str) -> AsyncIterator[RedisForwardLedger]:
    ledger = RedisForwardLedger.from_url(REDIS_URL, job)
    try:
        yield ledger
    finally:
        await ledger.close()


def _edge(
    edge: Backends,
    root: Backends,
    ledger: ForwardLedger,
    *,
    broker: Broker | None = None,
    **options: Any,
) -> EdgeAggregator:
    return EdgeAggregator(
        job=edge.config.job,
        upstream=root.config.job,
        broker=broker or edge.broker,
        store=edge.store,
        upstream_store=root.store,
        ledger=ledger,
        idle_timeout=1.5,
        retry_seconds=0.1,
        **options,
    )


async def _run_edge(edge: EdgeAggregator) -> EdgeAggregator:
    async with edge:
        await edge.run()
    return edge


async def test_two_edges_under_a_root_give_the_flat_fedbuff_model(job_id: str) -> None:
    # Arrange: a root that takes 4 partials per version and requires signatures, two edges
    # that fold 3 device updates each, and a flat job that folds all 12 device updates at once
    parts = _device_updates(12)
    keys = {edge: generate_key_pair() for edge in ("e1", "e2")}
    async with (
        job_backends("real", f"{job_id}-root", _fedbuff(4), require_signatures=True) as root,
        job_backends("real", f"{job_id}-e1", _fedbuff(3)) as e1,
        job_backends("real", f"{job_id}-e2", _fedbuff(3)) as e2,
        job_backends("real", f"{job_id}-flat", _fedbuff(12)) as flat,
        _ledger(e1.config.job) as ledger1,
        _ledger(e2.config.job) as ledger2,
    ):
        for name, (_, public) in keys.items():
            await root.store.register_device(f"edge-{name}", public)
        await _publish(e1, parts[:6])
        await _publish(e2, parts[6:])
        await _publish(flat, parts)

        # Act: both edges and the root run at once; the flat job is aggregated alone
        edges = [
            _edge(e, root, ledger, device_id=f"edge-{name}", signing_key=keys[name][0])
            for name, e, ledger in (("e1", e1, ledger1), ("e2", e2, ledger2))
        ]
        _, _, root_aggregator = await asyncio.gather(
            _run_edge(edges[0]), _run_edge(edges[1]), drain(root, idle=3.0)
        )
        await drain(flat)

        # Assert: one root version from the 4 partials, equal to the flat aggregation
        assert await root.store.current_version() == 1
        assert await flat.store.current_version() == 1
        expected, actual = await _model(flat), await _model(root)
        for name in INITIAL:
            torch.testing.assert_close(actual[name], expected[name])
        meta = await root.store.get_meta(1)
        assert meta is not None
        assert sorted(meta.devices) == ["edge-e1", "edge-e1", "edge-e2", "edge-e2"]
        assert meta.num_samples == sum(n for _, n in parts)
        assert root_aggregator.stats.rejected == {}
        assert [e.forwarder.stats.partials for e in edges] == [2, 2]
        for e in (e1, e2):
            assert await e.broker.queue_depth(e.config.job) == (0, 0)
            assert await e.broker.drain_dead_letters(e.config.job) == []
            # The edge job mirrors the root's new version for its devices' next round
            assert await mirror_once(root.store, e.store) == 1
            edge_meta, root_meta = await e.store.get_meta(1), await root.store.get_meta(1)
            assert edge_meta is not None and root_meta is not None
            assert edge_meta.sha256 == root_meta.sha256


class _Crash(Exception):
    """The edge process dies here."""


class _CrashAfterPublish:
    """The real broker, but the edge dies right after the first upstream confirm."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def publish(self, header: UpdateHeader, body: bytes, *, timeout: float = 30.0) -> None:
        await self._broker.publish(header, body, timeout=timeout)
        raise _Crash("after the upstream confirm, before the ledger mark and the acks")


class _CrashInLedger:
    """The real ledger, but the edge dies right after the first `step` call."""

    def __init__(self, ledger: ForwardLedger, step: str) -> None:
        self._ledger = ledger
        self._step = step

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._ledger, name)
        if name != self._step:
            return real

        async def crash(*args: Any) -> None:
            await real(*args)
            raise _Crash(f"after {name}")

        return crash


@pytest.mark.parametrize("crash", ["after_plan", "after_publish", "after_mark"])
async def test_an_edge_crash_between_publish_and_ack_counts_nothing_twice(
    crash: str, job_id: str
) -> None:
    # Arrange: 6 device updates on one edge (2 partials of 3), a root taking 2 partials
    parts = _device_updates(6)
    async with (
        job_backends("real", f"{job_id}-root", _fedbuff(2)) as root,
        job_backends("real", f"{job_id}-e", _fedbuff(3)) as edge,
        job_backends("real", f"{job_id}-flat", _fedbuff(6)) as flat,
        _ledger(edge.config.job) as ledger,
    ):
        await _publish(edge, parts)
        await _publish(flat, parts)
        faulty: dict[str, dict[str, Any]] = {
            "after_plan": {"ledger": _CrashInLedger(ledger, "plan")},
            "after_publish": {"broker": _CrashAfterPublish(edge.broker)},
            "after_mark": {"ledger": _CrashInLedger(ledger, "mark_forwarded")},
        }
        crashing = faulty[crash]

        # Act: the edge dies at the first partial; a fresh edge takes over the same job
        with pytest.raises(_Crash):
            await _run_edge(_edge(edge, root, crashing.pop("ledger", ledger), **crashing))
        restarted = await _run_edge(_edge(edge, root, ledger))
        root_aggregator = await drain(root)
        await drain(flat)

        # Assert: the root folded 2 partials into 1 version, equal to the flat aggregation
        assert await root.store.current_version() == 1
        assert await root.store.applied_count() == 2
        expected, actual = await _model(flat), await _model(root)
        for name in INITIAL:
            torch.testing.assert_close(actual[name], expected[name])
        # the republished partial was deduped by the root, or skipped by the ledger
        assert root_aggregator.stats.duplicates == (1 if crash == "after_publish" else 0)
        assert restarted.forwarder.stats.duplicates == (3 if crash == "after_mark" else 0)
        assert await edge.broker.queue_depth(edge.config.job) == (0, 0)
        assert await root.broker.queue_depth(root.config.job) == (0, 0)


async def test_an_edge_job_ahead_of_its_root_is_refused(job_id: str) -> None:
    # Arrange: the edge job was aggregated on its own to a version the root does not have
    async with (
        job_backends("real", f"{job_id}-root", _fedbuff(2)) as root,
        job_backends("real", f"{job_id}-e", _fedbuff(3)) as edge,
        _ledger(edge.config.job) as ledger,
    ):
        other = {name: t + 1.0 for name, t in INITIAL.items()}
        data = encode(other)
        meta = VersionMeta(
            version=1, created_at=1.0, sha256=sha256_hex(data), model_bytes=len(data)
        )
        await edge.store.commit(0, data, meta)

        # Act / Assert: refused with a message naming the cause, nothing consumed
        with pytest.raises(EdgeMismatch, match="ahead of root"):
            await _run_edge(_edge(edge, root, ledger))


@pytest.mark.timeout(90)
async def test_python_m_aggregator_with_fedq_upstream_runs_an_edge(
    job_id: str, tmp_path: Path
) -> None:
    # Arrange: 4 device updates on an edge job with K=2, a root taking 2 partials
    parts = _device_updates(4)
    async with (
        job_backends("real", f"{job_id}-root", _fedbuff(2)) as root,
        job_backends("real", f"{job_id}-e", _fedbuff(2)) as edge,
        job_backends("real", f"{job_id}-flat", _fedbuff(4)) as flat,
    ):
        await _publish(edge, parts)
        await _publish(flat, parts)
        env = {
            **os.environ,
            "FEDQ_JOB": edge.config.job,
            "FEDQ_UPSTREAM": root.config.job,
            "FEDQ_AMQP_URL": AMQP_URL,
            "FEDQ_REDIS_URL": REDIS_URL,
            "FEDQ_IDLE_EXIT_SECONDS": "2",
        }
        log = tmp_path / "edge.log"

        # Act: the container entrypoint, configured only by the environment
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aggregator", env=env, stdout=output, stderr=output
            )
            returncode = await asyncio.wait_for(process.wait(), timeout=45)
        await drain(root)
        await drain(flat)

        # Assert
        assert returncode == 0, log.read_text()
        assert "forwarded 2 updates" in log.read_text()
        assert await root.store.current_version() == 1
        expected, actual = await _model(flat), await _model(root)
        for name in INITIAL:
            torch.testing.assert_close(actual[name], expected[name])
        meta = await root.store.get_meta(1)
        assert meta is not None
        assert meta.devices == [f"edge-{edge.config.job}"] * 2


def test_fedq_aggregator_upstream_refuses_an_edge_job_of_another_task(job_id: str) -> None:
    # Arrange: a root job and an "edge" job of a different task (another model schema)
    cli, urls = CliRunner(), ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
    jobs = {"root": "digits-mlp", "edge": "mnist1d-cnn"}
    try:
        for name, task in jobs.items():
            created = cli.invoke(
                app, ["job", "create", "--job", f"{job_id}-{name}", "--task", task, *urls]
            )
            assert created.exit_code == 0, created.output

        # Act
        result = cli.invoke(
            app,
            ["aggregator", "--job", f"{job_id}-edge", "--upstream", f"{job_id}-root", *urls],
        )

        # Assert: one line naming the cause, no traceback
        assert result.exit_code == 1
        assert "edge job refused" in result.output
        assert "different model schemas" in result.output
        assert "Traceback" not in result.output
    finally:
        for name in jobs:
            cli.invoke(app, ["job", "delete", "--job", f"{job_id}-{name}", *urls])


def _edge_process(
    edge: str, root: str, log: Path, idle_exit: float | None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FEDQ_JOB": edge,
        "FEDQ_UPSTREAM": root,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_EDGE_FLUSH_SECONDS": "0.5",
    }
    if idle_exit is not None:
        env["FEDQ_IDLE_EXIT_SECONDS"] = str(idle_exit)
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator"], env=env, stdout=output, stderr=subprocess.STDOUT
        )


async def _wait_for_line(log: Path, text: str, after: int, timeout: float = 40.0) -> None:
    """Wait until `text` appears in the log past byte offset `after`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while text not in log.read_text()[after:]:
        assert asyncio.get_running_loop().time() < deadline, log.read_text()
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_a_sigkilled_edge_loses_nothing_and_counts_nothing_twice(
    job_id: str, tmp_path: Path
) -> None:
    # Arrange: N identical one-sample updates c on an edge (K=4, flush 0.5 s); a root making
    # one version per partial, so V versions must hold exactly N samples and x0 + V*c
    n_updates, step = 32, 0.01
    c = {"w": torch.full((4,), step), "b": torch.tensor([step])}
    log = tmp_path / "edge.log"
    rng = random.Random(3)
    async with (
        job_backends("real", f"{job_id}-root", _fedbuff(1)) as root,
        job_backends("real", f"{job_id}-e", _fedbuff(4)) as edge,
    ):

        async def devices() -> None:
            for _ in range(n_updates):
                await _publish(edge, [(c, 1)])
                await asyncio.sleep(0.15)

        # Act: the edge is SIGKILLed just after a forward while devices publish; a restarted
        # one drains the rest (the exact crash points are the in-process test above)
        log.touch()
        process = _edge_process(edge.config.job, root.config.job, log, None)
        await _wait_for_line(log, "mirrors root version", 0)
        publishing = asyncio.ensure_future(devices())
        await _wait_for_line(log, "forwarded", 0)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        await publishing
        final = _edge_process(edge.config.job, root.config.job, log, idle_exit=2.0)
        try:
            await asyncio.to_thread(final.wait, 60)
        finally:
            if final.poll() is None:
                final.kill()
        await drain(root)

        # Assert
        assert final.returncode == 0, log.read_text()
        version = await root.store.current_version()
        metas = [await root.store.get_meta(v) for v in range(1, version + 1)]
        assert sum(m.num_samples for m in metas if m is not None) == n_updates
        assert await root.store.applied_count() == version
        model = await _model(root)
        for name in INITIAL:
            torch.testing.assert_close(model[name], INITIAL[name] + version * step)
        assert await edge.broker.queue_depth(edge.config.job) == (0, 0)
        assert await root.broker.queue_depth(root.config.job) == (0, 0)
        assert await edge.broker.drain_dead_letters(edge.config.job) == []
