"""Run a device agent or the evaluator as a process: connect, loop until SIGTERM, close."""

from __future__ import annotations

import logging
import re
import socket
import stat
from pathlib import Path

from prometheus_client import CollectorRegistry

from device_agent.agent import DeviceAgent
from device_agent.evaluator import Evaluator
from device_agent.metrics import AgentMetrics
from infra.connect import MemoryBackends, open_broker, open_store
from infra.health import backend_problems, health_server
from infra.lifecycle import stop_on_signals
from infra.settings import AgentSettings
from schemas.signing import InvalidKey, public_key_of

log = logging.getLogger(__name__)


def default_device_id() -> str:
    """Derive a device id from the hostname, which differs for every container replica."""
    host = re.sub(r"[^A-Za-z0-9_.:@-]", "-", socket.gethostname()).strip("-.") or "device"
    return host[:128]


def read_private_key(path: Path) -> str:
    """Read a device's base64 private key file, refusing one that is not a valid key."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Not fatal (a mounted secret may show other modes), but worth an operator's look.
        log.warning("key file %s is readable by group or others (mode %o)", path, mode & 0o777)
    try:
        key = path.read_text(encoding="ascii").strip()
    except UnicodeDecodeError:
        raise InvalidKey(f"{path} is not base64 text") from None
    public_key_of(key)  # raises InvalidKey now rather than at the first update
    return key


async def serve_agent(settings: AgentSettings, memory: MemoryBackends | None = None) -> int:
    """Train and publish until SIGTERM or `settings.updates`; return updates sent."""
    device_id = settings.device_id or default_device_id()
    signing_key = (
        None if settings.device_key_file is None else read_private_key(settings.device_key_file)
    )
    registry = CollectorRegistry()
    broker = await open_broker(settings, memory)
    store = open_store(settings, settings.job, memory)

    async def readiness() -> list[str]:
        return await backend_problems(store=store, broker=broker)

    try:
        async with (
            health_server(settings, registry, readiness),
            DeviceAgent(
                device_id=device_id,
                broker=broker,
                store=store,
                updates=settings.updates,
                num_devices=settings.num_devices,
                dirichlet=settings.dirichlet,
                slowdown=settings.slowdown,
                codec=settings.codec,
                metrics=AgentMetrics(registry, settings.job, device_id),
                signing_key=signing_key,
                trainable_only=settings.trainable_only,
                send_keys=[k for k in settings.send_keys.split(",") if k] or None,
            ) as agent,
        ):
            with stop_on_signals(agent.stop, enabled=memory is None):
                return await agent.run()
    finally:
        await store.close()
        await broker.close()


async def serve_evaluator(settings: AgentSettings, memory: MemoryBackends | None = None) -> int:
    """Evaluate every new version until SIGTERM or `settings.max_versions`."""
    store = open_store(settings, settings.job, memory)

    async def readiness() -> list[str]:
        return await backend_problems(store=store)

    try:
        evaluator = Evaluator(store=store, max_versions=settings.max_versions)
        # The evaluator has no metrics of its own yet: the endpoint serves probes and
        # process metrics only.
        async with health_server(settings, CollectorRegistry(), readiness):
            with stop_on_signals(evaluator.stop, enabled=memory is None):
                return await evaluator.run()
    finally:
        await store.close()
