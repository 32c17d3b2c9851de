"""A RabbitMQ node of a test's own, which it may stop, SIGKILL and start again at will.

The shared node (`rabbit@localhost` on 5672) serves every other test running at the same
time, so fault tests never touch it. This one runs the same RabbitMQ 3.10 server with its own
node name, free AMQP and distribution ports, data and logs under a temporary directory, no
plugins (so nothing grabs 15672), and fedq's own `infra/rabbitmq/rabbitmq.conf`. `start()`
after `stop()` or `kill()` reuses the same data directory, so durable quorum queues and their
confirmed messages come back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
REPO_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "rabbitmq" / "rabbitmq.conf"
# The repository's 1 GB alarm threshold would block every publisher on a nearly full CI disk.
TEST_DISK_FREE_LIMIT = "disk_free_limit.absolute = 100MB"
_names = itertools.count()


def free_port() -> int:
    """Return a TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, awaiting their reaper, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class PrivateRabbitMQ:
    """One private RabbitMQ node: `start`, `stop` (clean), `kill` (SIGKILL), and its `url`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.node = f"fedq-fault-{os.getpid()}-{next(_names)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []
        self._env = self._environment()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        for name in ("home", "mnesia", "log"):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        lines = [
            line
            for line in REPO_CONFIG.read_text().splitlines()
            if not line.startswith("disk_free_limit")
        ]
        lines += [TEST_DISK_FREE_LIMIT, f"listeners.tcp.1 = 127.0.0.1:{self.port}"]
        config = self.directory / "rabbitmq.conf"
        config.write_text("\n".join(lines) + "\n")
        plugins = self.directory / "enabled_plugins"
        plugins.write_text("[].\n")
        # An empty env file: /etc/rabbitmq/rabbitmq-env.conf names the shared node.
        env_file = self.directory / "rabbitmq-env.conf"
        env_file.write_text("")
        return {
            **os.environ,
            # The Erlang cookie is created in, and read from, $HOME: one of the node's own.
            "HOME": str(self.directory / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = 60.0) -> float:
        """Boot the node (on its existing data, if any); return the seconds until AMQP answers."""
        assert self.process is None or self.process.poll() is not None, "already running"
        assert shutil.which(SERVER), "rabbitmq-server must be installed"
        began = time.monotonic()
        with (self.directory / "server.out").open("ab") as output:
            # A session of its own: kill() can then take the node's helper processes with it.
            self.process = subprocess.Popen(
                [SERVER],
                env=self._env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The AMQP listener opens only at the end of the boot: then the node takes clients.
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.node} exited while starting:\n{self.log_tail()}")
            if time.monotonic() - began > timeout:
                self.kill()
                raise RuntimeError(f"{self.node} did not start in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        seconds = time.monotonic() - began
        self.start_seconds.append(seconds)
        return seconds

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run `rabbitmqctl -n <this node> ARGS` and return its output."""
        return subprocess.run(
            [CTL, "-n", self.node, "-q", *args],
            env=self._env,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        ).stdout

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the node down cleanly (`rabbitmqctl stop`) and wait until it has exited."""
        assert self.process is not None
        self.ctl("stop", timeout=timeout)
        self.process.wait(timeout=timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the Erlang VM (and its helper processes) and wait until they are gone."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=timeout)
        # The VM is the wrapper script's child, not the Popen: it may outlive the wrapper for
        # a moment, still accepting connections, and a start() then would return at once.
        deadline = time.monotonic() + timeout
        while _group_alive(self.process.pid):
            assert time.monotonic() < deadline, f"{self.node} survived SIGKILL"
            time.sleep(0.02)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        path = self.directory / "server.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture(scope="session")
def _private_rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    # One node for the whole session: a first boot costs 5-20 s on a busy 2-core machine, and
    # tests share it safely, each with its own job id (hence its own queues).
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    if node.process is not None:
        node.kill()


@pytest.fixture
def private_rabbitmq(_private_rabbitmq_node: PrivateRabbitMQ) -> PrivateRabbitMQ:
    """The session's private RabbitMQ node, running; a test may stop, kill and start it."""
    if not _private_rabbitmq_node.running():
        _private_rabbitmq_node.start()  # a test that failed mid-outage left it down
    return _private_rabbitmq_node
