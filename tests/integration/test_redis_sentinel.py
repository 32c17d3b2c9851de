"""The store through `redis+sentinel://`: a private master, replica and Sentinel on free ports.

Never the shared Redis on 6379: this test kills its own master to force a failover.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from infra.connect import open_store
from infra.errors import BackendUnavailable
from infra.protocols import ModelStore
from infra.settings import ConnectionSettings
from schemas import JobConfig, StrategyConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from tests.integration.helpers import INITIAL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
MASTER_SET = "fedqtest"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class SentinelSetup:
    """A master, its replica and one Sentinel watching them, all this test's own."""

    directory: Path
    master_port: int = field(default_factory=_free_port)
    replica_port: int = field(default_factory=_free_port)
    sentinel_port: int = field(default_factory=_free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{MASTER_SET}/0"

    def _start(self, name: str, *args: str, port: int) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed"
        workdir = self.directory / name
        workdir.mkdir(exist_ok=True)
        self.processes[name] = subprocess.Popen(
            [binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(lambda: _answers(port), f"{name} did not start")

    def start(self) -> None:
        # No diskless-sync delay: the replica attaches at once instead of after 5 s.
        self._start(
            "master", "--save", "", "--repl-diskless-sync-delay", "0", port=self.master_port
        )
        self._start(
            "replica",
            "--save",
            "",
            "--replicaof",
            "127.0.0.1",
            str(self.master_port),
            port=self.replica_port,
        )
        replica = redis.Redis(port=self.replica_port)
        _wait_until(
            lambda: replica.info("replication")["master_link_status"] == "up", "no replication"
        )
        replica.close()
        # The Sentinel starts after the replica is attached, so its first INFO finds it.
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"sentinel monitor {MASTER_SET} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_SET} 500\n"
            f"sentinel failover-timeout {MASTER_SET} 5000\n"
        )
        self._start("sentinel", str(conf), "--sentinel", port=self.sentinel_port)
        sentinel = redis.Redis(port=self.sentinel_port)
        _wait_until(
            lambda: bool(sentinel.sentinel_slaves(MASTER_SET)),
            "the Sentinel did not find the replica",
        )
        sentinel.close()

    def master_port_now(self) -> int:
        """The master's port as the Sentinel reports it."""
        sentinel = redis.Redis(port=self.sentinel_port)
        try:
            address = sentinel.sentinel_get_master_addr_by_name(MASTER_SET)
            assert isinstance(address, tuple | list), address
            return int(address[1])
        finally:
            sentinel.close()

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(condition: object, message: str, timeout: float = 15.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(message)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def _version(job: str, version: int, value: float) -> tuple[bytes, VersionMeta]:
    model = encode({name: tensor + value for name, tensor in INITIAL.items()})
    meta = VersionMeta(
        version=version, created_at=time.time(), sha256=sha256_hex(model), model_bytes=len(model)
    )
    return model, meta


async def _create(store: ModelStore, job: str) -> None:
    config = JobConfig(
        job=job,
        task="tiny",
        strategy=StrategyConfig(),
        model_schema=schema_of(INITIAL),
        created_at=time.time(),
    )
    model, meta = _version(job, 0, 0.0)
    await store.create_job(config, model, meta)


async def _commit_retrying(store: ModelStore, job: str, version: int, within: float) -> float:
    """Commit `version` as the aggregator would: retry while the store is unavailable."""
    started = time.monotonic()
    model, meta = _version(job, version, float(version))
    while True:
        try:
            await store.commit(version - 1, model, meta)
            return time.monotonic() - started
        except BackendUnavailable:
            if time.monotonic() - started > within:
                raise
            await asyncio.sleep(0.2)


async def test_a_job_is_created_and_committed_through_the_sentinel_url(
    sentinel_setup: SentinelSetup, job_id: str
) -> None:
    # Arrange
    store = open_store(ConnectionSettings(redis_url=sentinel_setup.url), job_id)
    try:
        # Act
        await _create(store, job_id)
        await _commit_retrying(store, job_id, 1, within=0)
        # Assert: the data is on the master the Sentinel names
        assert await store.current_version() == 1
        assert (await store.latest())[1] == _version(job_id, 1, 1.0)[0]
        direct = redis.Redis(port=sentinel_setup.master_port)
        assert direct.get(f"fedq:{{{job_id}}}:version") == b"1"
        direct.close()
    finally:
        await store.close()


async def test_the_store_keeps_working_after_a_failover(
    sentinel_setup: SentinelSetup, job_id: str
) -> None:
    # Arrange: version 1 committed and replicated
    store = open_store(
        ConnectionSettings(redis_url=sentinel_setup.url, redis_timeout_seconds=2.0), job_id
    )
    try:
        await _create(store, job_id)
        await _commit_retrying(store, job_id, 1, within=0)
        master = redis.Redis(port=sentinel_setup.master_port)
        assert master.wait(1, 5000) == 1
        master.close()
        # Act: the master dies; the Sentinel promotes the replica
        sentinel_setup.kill("master")
        waited = await _commit_retrying(store, job_id, 2, within=30)
        # Assert: the same store object committed on the promoted replica, nothing lost
        assert sentinel_setup.master_port_now() == sentinel_setup.replica_port
        assert await store.current_version() == 2
        assert await store.get_meta(1) is not None
        print(f"commit after killing the master succeeded after {waited:.1f}s")
    finally:
        await store.close()
