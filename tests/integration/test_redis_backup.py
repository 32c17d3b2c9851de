"""The backup and restore of docs/operations.md, on a private redis-server (never the shared one).

BGSAVE, copy dump.rdb, restore it into an empty data directory the documented way, and the
job is back at the backed-up version with its model, applied ids and device tallies.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra.redis_store import RedisModelStore
from schemas import JobConfig, StrategyConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from tests.integration.helpers import INITIAL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """One private redis-server process on a free port, in its own data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> redis.Redis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed"
        self.directory.mkdir(exist_ok=True)
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            [binary, *where, "--save", "", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    return client
            except (redis.exceptions.BusyLoadingError, redis.ConnectionError):
                pass
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis flushes its AOF and exits
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    pair = Server(tmp_path / "live"), Server(tmp_path / "restored")
    yield pair
    for server in pair:
        server.stop()


def _until(client: redis.Redis, field: str, value: int) -> None:
    for _ in range(200):
        if client.info("persistence")[field] == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{field} never became {value}")


async def _commit(store: RedisModelStore, version: int) -> VersionMeta:
    model = encode({name: tensor + version for name, tensor in INITIAL.items()})
    meta = VersionMeta(
        version=version,
        created_at=time.time(),
        sha256=sha256_hex(model),
        model_bytes=len(model),
        contributors=[str(uuid.uuid4())],
        devices=["dev-0"],
        staleness=[0],
    )
    if version == 0:
        config = JobConfig(
            job=store.job,
            task="tiny",
            strategy=StrategyConfig(),
            model_schema=schema_of(INITIAL),
            created_at=time.time(),
        )
        await store.create_job(config, model, meta.model_copy(update={"contributors": []}))
    else:
        await store.commit(version - 1, model, meta)
    return meta


async def test_a_bgsave_snapshot_restores_the_job_as_it_was(
    servers: tuple[Server, Server], job_id: str
) -> None:
    live, restored = servers
    # Arrange: version 1 committed, then the snapshot, then version 2
    client = live.start("--appendonly", "yes")
    store = RedisModelStore.from_url(f"redis://127.0.0.1:{live.port}/0", job_id, timeout=5)
    await _commit(store, 0)
    backed_up = await _commit(store, 1)
    client.bgsave()
    _until(client, "rdb_bgsave_in_progress", 0)
    assert client.info("persistence")["rdb_last_bgsave_status"] == "ok"
    backup = live.directory / "backup.rdb"
    shutil.copy(live.directory / "dump.rdb", backup)
    await _commit(store, 2)
    await store.close()
    client.close()
    live.stop()
    # Act: restore as documented: the RDB into an empty directory, loaded with AOF off,
    # then AOF switched on (which writes it from the data) and a normal restart
    restored.directory.mkdir()
    shutil.copy(backup, restored.directory / "dump.rdb")
    client = restored.start("--appendonly", "no")
    client.config_set("appendonly", "yes")
    _until(client, "aof_rewrite_in_progress", 0)
    _until(client, "aof_rewrite_scheduled", 0)
    client.close()
    restored.stop()
    (restored.directory / "dump.rdb").unlink()
    client = restored.start("--appendonly", "yes")
    client.close()
    # Assert: version 1 with its model, applied ids and tallies; version 2 is gone
    store = RedisModelStore.from_url(f"redis://127.0.0.1:{restored.port}/0", job_id, timeout=5)
    try:
        version, model = await store.latest()
        assert version == 1
        assert sha256_hex(model) == backed_up.sha256
        assert await store.applied(backed_up.contributors) == [True]
        [tally] = await store.device_tallies()
        assert tally.applied == 1
    finally:
        await store.close()
