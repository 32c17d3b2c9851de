"""Open the broker and the store a URL names: real RabbitMQ/Redis, or the in-process peers."""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.amqp_broker import AmqpBroker
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.protocols import Broker, ModelStore
from infra.redis_store import RedisModelStore
from infra.settings import ConnectionSettings

MEMORY_SCHEME = "memory://"


@dataclass
class MemoryBackends:
    """The in-process broker and store state shared by every component of one process."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    hub: MemoryStoreHub = field(default_factory=MemoryStoreHub)


def _memory(url: str, memory: MemoryBackends | None) -> MemoryBackends | None:
    if not url.startswith(MEMORY_SCHEME):
        return None
    if memory is None:
        raise ValueError(
            f"{url} names the in-process backend, which only components of one process share:"
            " use `fedq simulate`, or give real amqp:// and redis:// URLs"
        )
    return memory


async def open_broker(settings: ConnectionSettings, memory: MemoryBackends | None = None) -> Broker:
    """Connect to the broker `settings.amqp_url` names."""
    backends = _memory(settings.amqp_url, memory)
    if backends is not None:
        return backends.broker
    return await AmqpBroker.connect(
        settings.amqp_url, publish_timeout=settings.publish_timeout_seconds
    )


def open_store(
    settings: ConnectionSettings, job: str, memory: MemoryBackends | None = None
) -> ModelStore:
    """Open the store `settings.redis_url` names, scoped to one job."""
    backends = _memory(settings.redis_url, memory)
    if backends is not None:
        return MemoryModelStore(backends.hub, job)
    return RedisModelStore.from_url(settings.redis_url, job, timeout=settings.redis_timeout_seconds)
