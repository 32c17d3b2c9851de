"""The edge aggregator's ledger: which device updates went upstream, and in which partial.

An edge acks its device updates only after the partial update that carries them is
confirmed upstream. Before publishing, it records the plan (member ids -> partial id); after
the confirm, it marks the members forwarded. A crash before the mark leaves every member
unacked, so all of them come back and are regrouped under the planned id (the upstream
aggregator dedupes it); a crash after the mark turns their redeliveries into acked skips.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.errors import BackendUnavailable
from infra.keys import JobKeys
from infra.redis_client import redis_client

T = TypeVar("T")

Plan = tuple[str, list[str]]


class ForwardLedger(Protocol):
    """Plans and forwarded marks of one edge job's device updates."""

    async def forwarded(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each device update already went upstream (in a confirmed partial)."""
        ...

    async def plan(self, partial_id: str, members: Sequence[str]) -> None:
        """Record that `members` are about to go upstream as the partial `partial_id`."""
        ...

    async def plan_of(self, update_id: str) -> Plan | None:
        """Return (partial id, all its member ids) of the plan holding `update_id`, if any."""
        ...

    async def mark_forwarded(self, partial_id: str, members: Sequence[str]) -> None:
        """Mark the members forwarded and drop their plan, in one step."""
        ...

    async def close(self) -> None: ...


class RedisForwardLedger:
    """The ledger in the edge job's own Redis keys (`fedq:{E}:edge:*`)."""

    def __init__(self, client: aioredis.Redis, job: str) -> None:
        self._client = client
        self._keys = JobKeys(job)

    @classmethod
    def from_url(cls, url: str, job: str, *, timeout: float = 30.0) -> RedisForwardLedger:
        """Connect to `url`; the values are small, so the timeouts are a cache's."""
        # Through redis_client, so an edge job takes the same URLs (Sentinel too) as the store.
        client = redis_client(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 10.0),
            retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), retries=5),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        return cls(client, job)

    async def forwarded(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each device update already went upstream (in a confirmed partial)."""
        if not update_ids:
            return []
        found = await _guard(self._client.smismember(self._keys.forwarded, list(update_ids)))
        return [bool(x) for x in found]

    async def plan(self, partial_id: str, members: Sequence[str]) -> None:
        """Record that `members` are about to go upstream as the partial `partial_id`."""
        mapping = {f"m:{m}": partial_id for m in members}
        mapping[f"p:{partial_id}"] = ",".join(members)
        await _guard(self._client.hset(self._keys.forward_plans, mapping=mapping))  # type: ignore[arg-type]

    async def plan_of(self, update_id: str) -> Plan | None:
        """Return (partial id, all its member ids) of the plan holding `update_id`, if any."""
        plans = self._keys.forward_plans
        partial = await _guard(self._client.hget(plans, f"m:{update_id}"))
        if partial is None:
            return None
        partial_id = _text(partial)
        members = await _guard(self._client.hget(plans, f"p:{partial_id}"))
        if members is None:
            return None
        return partial_id, _text(members).split(",")

    async def mark_forwarded(self, partial_id: str, members: Sequence[str]) -> None:
        """Mark the members forwarded and drop their plan, in one step."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.sadd(self._keys.forwarded, *members)
            pipe.hdel(self._keys.forward_plans, f"p:{partial_id}", *(f"m:{m}" for m in members))
            await _guard(pipe.execute())

    async def close(self) -> None:
        """Close the client."""
        await self._client.aclose()


class MemoryForwardLedger:
    """The in-process peer of the Redis ledger (one process's edge, `memory://`)."""

    def __init__(self) -> None:
        self._forwarded: set[str] = set()
        self._plans: dict[str, str] = {}
        self._members: dict[str, list[str]] = {}

    async def forwarded(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each device update already went upstream (in a confirmed partial)."""
        return [u in self._forwarded for u in update_ids]

    async def plan(self, partial_id: str, members: Sequence[str]) -> None:
        """Record that `members` are about to go upstream as the partial `partial_id`."""
        self._plans.update(dict.fromkeys(members, partial_id))
        self._members[partial_id] = list(members)

    async def plan_of(self, update_id: str) -> Plan | None:
        """Return (partial id, all its member ids) of the plan holding `update_id`, if any."""
        partial_id = self._plans.get(update_id)
        if partial_id is None or partial_id not in self._members:
            return None
        return partial_id, list(self._members[partial_id])

    async def mark_forwarded(self, partial_id: str, members: Sequence[str]) -> None:
        """Mark the members forwarded and drop their plan, in one step."""
        self._forwarded.update(members)
        self._members.pop(partial_id, None)
        for m in members:
            self._plans.pop(m, None)

    async def close(self) -> None:
        """Nothing to close."""


async def _guard(call: Awaitable[T]) -> T:
    """Report a lost Redis link as BackendUnavailable, as the store does."""
    try:
        return await call
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise BackendUnavailable(f"redis: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
