"""A real federation of processes on the local RabbitMQ and Redis: the global model learns.

One aggregator, one evaluator and four agents on non-IID MNIST-1D shards, one of them five
times slower, all started exactly as the containers start them (`python -m ...` with FEDQ_*
variables). The slow agent must not hold the others back, and every update sent must be
applied exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from tests.conftest import AMQP_URL, REDIS_URL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

UPDATES_PER_AGENT = 25
SLOW_AGENT = "dev-3"
# Measured: this setup reached 0.77 after its 100 updates (33 versions); 0.65 leaves room
# while still far above the 0.1 of chance and the ~0.15 of the initial model.
ACCURACY_THRESHOLD = 0.65


def _env(job: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FEDQ_JOB": job,
        "FEDQ_AMQP_URL": AMQP_URL,
        "FEDQ_REDIS_URL": REDIS_URL,
        "FEDQ_LOG_LEVEL": "INFO",
        **extra,
    }


def _start(module: str, job: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    # The child keeps its own descriptor of the log; the parent's copy closes at once.
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=_env(job, **extra),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


async def test_processes_learn_with_a_slow_device(job_id: str, tmp_path: Path) -> None:
    # Arrange: create the job exactly as the compose job-init step does
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "fedq",
            "job",
            "create",
            "--job",
            job_id,
            "--task",
            "mnist1d-cnn",
            "--strategy",
            "fedbuff",
            "--buffer-size",
            "3",
            "--num-devices",
            "4",
            "--staleness",
            "polynomial",
            # The slow device's updates must all count: fast devices move the version on
            # by ~25 while it trains once.
            "--max-staleness",
            "100",
            "--staleness-a",
            "0.5",
        ],
        env=_env(job_id),
        check=True,
        capture_output=True,
    )
    store = RedisModelStore.from_url(REDIS_URL, job_id)
    broker = await AmqpBroker.connect(AMQP_URL)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        processes["aggregator"] = _start("aggregator", job_id, tmp_path / "aggregator.log")
        processes["evaluator"] = _start(
            "device_agent", job_id, tmp_path / "evaluator.log", FEDQ_ROLE="evaluator"
        )
        for index in range(4):
            device = f"dev-{index}"
            processes[device] = _start(
                "device_agent",
                job_id,
                tmp_path / f"{device}.log",
                FEDQ_ROLE="agent",
                FEDQ_DEVICE_ID=device,
                FEDQ_UPDATES=str(UPDATES_PER_AGENT),
                FEDQ_SLOWDOWN="5" if device == SLOW_AGENT else "1",
            )
        # Act: wait for every agent to send all its updates
        agents = [p for name, p in processes.items() if name.startswith("dev-")]
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in agents) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling other processes, not a task
            await asyncio.sleep(1)
        assert [p.poll() for p in agents] == [0] * 4, _logs(tmp_path)
        # Let the aggregator fold what is queued (a partial buffer stays unacked) and the
        # evaluator catch up, then stop both gracefully.
        await _until_quiet(store, broker, job_id)
        assert _stop(processes.pop("aggregator")) == 0, _logs(tmp_path)
        assert _stop(processes.pop("evaluator")) == 0, _logs(tmp_path)

        # Assert: versions are a gapless sequence and every update was applied exactly once
        version = await store.current_version()
        metas = [await store.get_meta(v) for v in range(1, version + 1)]
        assert all(m is not None for m in metas)
        contributors = [u for m in metas if m for u in m.contributors]
        assert len(contributors) == len(set(contributors)) == await store.applied_count()
        ready = await _ready_after_requeue(
            broker, job_id, 4 * UPDATES_PER_AGENT - len(contributors)
        )
        assert len(contributors) + ready == 4 * UPDATES_PER_AGENT
        assert ready < 3  # only a partial FedBuff buffer may wait for more updates
        assert await broker.drain_dead_letters(job_id) == []

        # Assert: the slow device never held the others back, and its updates were applied
        # with the staleness they had
        slow = [
            s
            for m in metas
            if m
            for d, s in zip(m.devices, m.staleness, strict=True)
            if d == SLOW_AGENT
        ]
        fast = [d for m in metas if m for d in m.devices if d != SLOW_AGENT]
        assert len(slow) >= UPDATES_PER_AGENT - 2
        assert max(slow) > 0
        assert len(fast) >= 3 * UPDATES_PER_AGENT - 2

        # Assert: the evaluated accuracy rises past the threshold
        accuracies = [m.eval["accuracy"] for m in metas if m and m.eval]
        initial = await store.get_meta(0)
        assert initial is not None and initial.eval is not None
        assert len(accuracies) >= version // 2
        assert accuracies[-1] >= ACCURACY_THRESHOLD, accuracies
        assert accuracies[-1] > initial.eval["accuracy"] + 0.3, accuracies
    finally:
        for process in processes.values():
            _stop(process)
        await store.delete_job()
        await broker.delete_job(job_id)
        await store.close()
        await broker.close()


async def _ready_after_requeue(broker: AmqpBroker, job: str, expected: int) -> int:
    """Read the ready count once the stopped aggregator's unacked buffer is back in the queue."""
    ready = 0
    for _ in range(20):
        ready, _ = await broker.queue_depth(job)
        if ready >= expected:
            break
        await asyncio.sleep(0.25)
    return ready


async def _until_quiet(store: RedisModelStore, broker: AmqpBroker, job: str) -> None:
    """Wait until the version stops moving and the evaluator has scored the latest one."""
    last, still = -1, 0
    for _ in range(60):
        version = await store.current_version()
        evaluated = await store.latest_eval()
        if version == last and evaluated is not None and evaluated[0] == version:
            still += 1
            if still >= 3:
                return
        else:
            last, still = version, 0
        await asyncio.sleep(0.5)


def _logs(directory: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(directory.glob("*.log"))
    )
