"""Edge mode: forward groups of K device updates upstream as one partial update each.

An edge job E has its own queue and keys; its devices train on E's model, which mirrors the
root job's (`aggregator/mirror.py`), so a device's `base_version` is a root version. The
edge groups updates that share a base version, folds each group into one partial update
(`combine_partial`: the sample-weighted mean delta, the summed sample count), publishes it to
the root's queue as a device of the root, and acks the device updates only after the root's
broker confirmed it. The partial's id is a uuid5 of its members' ids and is planned in the
ledger before the publish, so a crash anywhere re-forwards the same id and the root applies
it once (see `infra/forward_ledger.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aggregator.strategies import Contribution
from aggregator.strategies.hierarchical import combine_partial, partial_update_id
from device_agent.sender import send_update
from infra.errors import BackendUnavailable
from infra.forward_ledger import ForwardLedger
from infra.protocols import Broker, Delivery, ModelStore
from infra.retry import retry_unavailable
from schemas import JobConfig, UpdateHeader
from schemas.codec import encode
from schemas.digests import blake3_hex
from schemas.signing import sign

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Group:
    """Device updates on their way into one partial update."""

    base_version: int
    started: float
    # Set for a group re-formed from a plan: its id and its members are already decided.
    partial_id: str | None = None
    expected: frozenset[str] | None = None
    members: dict[str, tuple[Delivery, Contribution]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.expected <= self.members.keys()


@dataclass
class EdgeStats:
    """Counters of one edge run."""

    forwarded_updates: int = 0
    partials: int = 0
    duplicates: int = 0


class EdgeForwarder:
    """The sink of an edge job's aggregator: group, fold, publish upstream, then ack."""

    def __init__(
        self,
        *,
        upstream: JobConfig,
        broker: Broker,
        upstream_store: ModelStore,
        ledger: ForwardLedger,
        device_id: str,
        buffer_size: int,
        flush_seconds: float,
        signing_key: str | None = None,
        retry_seconds: float = 1.0,
        give_up: asyncio.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.broker = broker
        self.upstream_store = upstream_store
        self.ledger = ledger
        self.device_id = device_id
        self.buffer_size = buffer_size
        self.flush_seconds = flush_seconds
        self.stats = EdgeStats()
        self._signing_key = signing_key
        self._retry_seconds = retry_seconds
        # Set when the edge stops: an outage then ends the forward instead of another retry.
        self._give_up = give_up
        self._clock = clock
        # One open group at a time, for the newest base version; plus groups from plans.
        self._open: _Group | None = None
        self._planned: dict[str, _Group] = {}
        # The sink and the flush timer both forward; one at a time keeps groups consistent.
        self._lock = asyncio.Lock()

    async def accept(
        self, header: UpdateHeader, delivery: Delivery, contribution: Contribution
    ) -> None:
        """Take one validated device update; forward its group when the group is due."""
        update_id = header.update_id
        async with self._lock:
            [done] = await self._retry(lambda: self.ledger.forwarded([update_id]))
            if done:
                self.stats.duplicates += 1
                log.info("update %s already forwarded upstream: acking it", update_id)
                await _settle(delivery.ack())
                return
            if await self._replace_held(update_id, delivery, contribution):
                return
            plan = await self._retry(lambda: self.ledger.plan_of(update_id))
            if plan is not None:
                await self._add_planned(plan, delivery, contribution)
                return
            base = contribution.base_version
            if self._open is not None and self._open.base_version != base:
                # Only updates from one base share a staleness upstream: close the old group.
                group, self._open = self._open, None
                await self._forward(group)
            if self._open is None:
                self._open = _Group(base_version=base, started=self._clock())
            self._open.members[update_id] = (delivery, contribution)
            if len(self._open.members) >= self.buffer_size:
                group, self._open = self._open, None
                await self._forward(group)

    async def _replace_held(
        self, update_id: str, delivery: Delivery, contribution: Contribution
    ) -> bool:
        """Keep the newest delivery of an update already held, settling the older one."""
        for group in [self._open, *self._planned.values()]:
            if group is not None and update_id in group.members:
                held, _ = group.members[update_id]
                group.members[update_id] = (delivery, contribution)
                self.stats.duplicates += 1
                await _settle(held.ack())
                return True
        return False

    async def _add_planned(
        self, plan: tuple[str, list[str]], delivery: Delivery, contribution: Contribution
    ) -> None:
        partial_id, members = plan
        group = self._planned.get(partial_id)
        if group is None:
            group = _Group(
                base_version=contribution.base_version,
                started=self._clock(),
                partial_id=partial_id,
                expected=frozenset(members),
            )
            self._planned[partial_id] = group
        group.members[contribution.receipt.update_id] = (delivery, contribution)
        if group.complete:
            del self._planned[partial_id]
            await self._forward(group)

    async def flush_due(self) -> None:
        """Forward every group that has waited `flush_seconds` (a trickle, or a lost member)."""
        async with self._lock:
            now = self._clock()
            for partial_id, group in list(self._planned.items()):
                if now - group.started >= self.flush_seconds:
                    del self._planned[partial_id]
                    await self._forward(group)
            if self._open is not None and now - self._open.started >= self.flush_seconds:
                group, self._open = self._open, None
                await self._forward(group)

    def drop(self) -> None:
        """Forget held groups (their deliveries go back to the queue when it closes)."""
        self._open = None
        self._planned.clear()

    async def _forward(self, group: _Group) -> None:
        """Plan, publish upstream and confirm, mark forwarded, then ack every member."""
        ids = sorted(group.members)
        # A planned id is kept even for fewer members: upstream it dedupes the first try.
        partial_id = group.partial_id or partial_update_id(ids)
        await self._retry(lambda: self.ledger.plan(partial_id, ids))
        parts = [(group.members[i][1].delta, group.members[i][1].receipt.num_samples) for i in ids]
        delta, num_samples = await asyncio.to_thread(combine_partial, parts)
        payload = await asyncio.to_thread(encode, delta)
        header = self._header(partial_id, group.base_version, num_samples, payload, len(ids))
        await self._retry(
            lambda: send_update(self.broker, self.upstream_store, self.upstream, header, payload)
        )
        await self._retry(lambda: self.ledger.mark_forwarded(partial_id, ids))
        for update_id in ids:
            await _settle(group.members[update_id][0].ack())
        self.stats.partials += 1
        self.stats.forwarded_updates += len(ids)
        log.info(
            "forwarded %d updates from base %d to job %s as %s (%d samples)",
            len(ids),
            group.base_version,
            self.upstream.job,
            partial_id,
            num_samples,
        )

    def _header(
        self, partial_id: str, base_version: int, num_samples: int, payload: bytes, count: int
    ) -> UpdateHeader:
        header = UpdateHeader(
            job=self.upstream.job,
            update_id=partial_id,
            device_id=self.device_id,
            base_version=base_version,
            num_samples=num_samples,
            payload="blob" if len(payload) > self.upstream.inline_limit_bytes else "inline",
            payload_blake3=blake3_hex(payload),
            payload_bytes=len(payload),
            train_metrics={"edge_updates": float(count)},
            sent_at=time.time(),
        )
        if self._signing_key is not None:
            # The edge is a device of the root: it signs with its own registered key.
            header = sign(header, self._signing_key)
        return header

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_unavailable(
            operation, first_delay=self._retry_seconds, give_up=self._give_up
        )


async def _settle(settling: Awaitable[None]) -> None:
    """Ack a forwarded update; a failed ack costs a redelivery, which the ledger skips."""
    try:
        await settling
    except BackendUnavailable as exc:
        log.warning("ack failed (%s): the update will be redelivered and skipped", exc)
