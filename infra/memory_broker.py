"""Run the Broker in process, with the queue semantics fedq relies on from RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra import keys
from infra.amqp_broker import (
    DELIVERY_LIMIT,
    DETAIL_LIMIT,
    LoggedMessage,
    StreamStart,
    roundtrip_headers,
)
from infra.errors import BackendUnavailable, JobNotFound, PublishError
from infra.protocols import DeadLetter, Delivery
from schemas import UpdateHeader
from schemas.wire import update_headers


@dataclass
class _Message:
    message_id: str
    headers: dict[str, Any]
    body: bytes
    # Times handed back unsettled; like a quorum queue's delivery count.
    returns: int = 0
    user_id: str | None = None


@dataclass
class _JobQueues:
    job: str
    ready: deque[_Message] = field(default_factory=deque)
    dead: list[DeadLetter] = field(default_factory=list)
    # In arrival order: the first one is the single active consumer.
    consumers: list[MemoryConsumer] = field(default_factory=list)
    # Every message published, when the job was declared with its log stream.
    stream: list[_Message] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def dispatch(self) -> None:
        """Push ready messages to the active consumer, up to its prefetch, and wake waiters."""
        if self.consumers:
            self.consumers[0].fill(self.ready)
        # Waiters hold the old event; a fresh one makes the next wait block again.
        self.changed.set()
        self.changed = asyncio.Event()

    def give_back(self, message: _Message) -> None:
        """Return an unsettled message to the front, or dead-letter it past the limit."""
        message.returns += 1
        if message.returns > DELIVERY_LIMIT:
            self.dead.append(
                DeadLetter(
                    "delivery_limit",
                    f"dead-lettered by the broker from {keys.updates_queue(self.job)}",
                    message.message_id,
                    dict(message.headers),
                    message.body,
                )
            )
        else:
            self.ready.appendleft(message)


class MemoryBroker:
    """The Broker in one process: per-job queues of messages, no network.

    It is shared by every component of a `fedq simulate` run, so `close` keeps its state.
    `user_id` plays the connection's user: every message it publishes carries it.
    """

    def __init__(self, *, user_id: str | None = None) -> None:
        self._jobs: dict[str, _JobQueues] = {}
        self.announcements: list[tuple[str, int]] = []
        self.user_id = user_id

    def _job(self, job: str) -> _JobQueues:
        try:
            return self._jobs[job]
        except KeyError:
            raise JobNotFound(f"job {job!r} has no queues: declare it first") from None

    async def declare_job(self, job: str, *, log_stream: bool = False) -> None:
        """Create (idempotently) the job's update queue, dead-letter queue and bindings."""
        queues = self._jobs.setdefault(job, _JobQueues(job))
        if log_stream and queues.stream is None:
            queues.stream = []

    async def delete_job(self, job: str) -> None:
        """Remove the job's queues (tests and `fedq job delete`)."""
        queues = self._jobs.pop(job, None)
        if queues is not None:
            for consumer in queues.consumers:
                consumer.cancelled = True
            queues.dispatch()

    async def publish(self, header: UpdateHeader, body: bytes, *, timeout: float = 30.0) -> None:
        """Publish an update and return once it is queued."""
        await self.publish_raw(
            header.job, body, headers=update_headers(header), message_id=header.update_id
        )

    async def publish_raw(
        self,
        job: str,
        body: bytes,
        *,
        headers: Mapping[str, Any],
        message_id: str | None,
        timeout: float = 30.0,
    ) -> None:
        """Publish arbitrary headers and body to a job's routing key (tests, replay, fuzzing)."""
        # Through the AMQP codec, so a consumer sees exactly what RabbitMQ would hand over.
        received = roundtrip_headers(headers)
        queues = self._jobs.get(job)
        if queues is None:
            raise PublishError(f"message {message_id} is unroutable: is the job declared?")
        # aiormq gives a message without an id a random one: do the same.
        message = _Message(
            message_id or uuid.uuid4().hex, received, bytes(body), user_id=self.user_id
        )
        queues.ready.append(message)
        if queues.stream is not None:
            queues.stream.append(message)
        queues.dispatch()

    def consume(
        self, job: str, *, prefetch: int, idle_timeout: float | None = None
    ) -> MemoryConsumer:
        """Yield deliveries from the job's update queue with manual acks."""
        return MemoryConsumer(self, job, prefetch, idle_timeout)

    async def announce_version(self, job: str, version: int) -> None:
        """Record the announcement in `announcements`."""
        self.announcements.append((job, version))

    async def drain_dead_letters(self, job: str, *, timeout: float = 2.0) -> list[DeadLetter]:
        """Remove and return every message now in the job's dead-letter queue."""
        queues = self._job(job)
        letters, queues.dead = queues.dead, []
        return letters

    async def queue_depth(self, job: str) -> tuple[int, int]:
        """Return (ready messages, consumers) of the job's update queue."""
        queues = self._job(job)
        # Like a quorum queue, count only the active consumer, not single-active standbys.
        return len(queues.ready), min(len(queues.consumers), 1)

    def is_connected(self) -> bool:
        """Always true: there is no link to lose in one process."""
        return True

    def logged(self, job: str) -> list[tuple[str, dict[str, Any], bytes]]:
        """Return (message id, headers, body) of every update the job's log stream recorded."""
        recorded = self._job(job).stream or []
        return [(m.message_id, dict(m.headers), m.body) for m in recorded]

    async def read_log(
        self,
        job: str,
        *,
        start: StreamStart = "first",
        idle_timeout: float = 2.0,
        prefetch: int = 256,
    ) -> AsyncIterator[LoggedMessage]:
        """Yield the job's log stream from `start` (only "first" or an offset) to its end."""
        if not isinstance(start, int) and start != "first":
            raise ValueError(
                f"the in-process log stream starts only at first or an offset: {start}"
            )
        recorded = self._job(job).stream
        if recorded is None:
            raise JobNotFound(f"job {job!r} has no log stream {keys.log_stream(job)}")
        for offset in range(start if isinstance(start, int) else 0, len(recorded)):
            message = recorded[offset]
            yield LoggedMessage(offset, message.message_id, dict(message.headers), message.body)

    async def close(self) -> None:
        """Do nothing: other components of the process may still use the same queues."""


class MemoryDelivery:
    """One update message handed out by a MemoryConsumer."""

    def __init__(self, consumer: MemoryConsumer, message: _Message) -> None:
        self._consumer = consumer
        self._message = message
        self.redelivered = message.returns > 0
        self._settled = False

    @property
    def message_id(self) -> str | None:
        return self._message.message_id

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._message.headers

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def user_id(self) -> str | None:
        return self._message.user_id

    def _settle(self) -> _JobQueues:
        if self._settled:
            raise RuntimeError(f"delivery {self.message_id} is already settled")
        queues = self._consumer.release(self)
        self._settled = True
        return queues

    async def ack(self) -> None:
        """Settle: the update's effect is durable (committed, or known duplicate)."""
        self._settle().dispatch()

    async def requeue(self) -> None:
        """Settle: give the message back to the queue for a later delivery."""
        queues = self._settle()
        queues.give_back(self._message)
        queues.dispatch()

    async def dead_letter(self, reason: str, detail: str) -> None:
        """Settle: copy the message to the job's dead-letter queue with the reason, then ack."""
        queues = self._settle()
        message = self._message
        letter = DeadLetter(
            reason, detail[:DETAIL_LIMIT], message.message_id, dict(message.headers), message.body
        )
        queues.dead.append(letter)
        queues.dispatch()


class MemoryConsumer:
    """An async iterator of one consumer's deliveries; ending it gives back what it holds."""

    def __init__(
        self, broker: MemoryBroker, job: str, prefetch: int, idle_timeout: float | None
    ) -> None:
        self._broker = broker
        self._job = job
        self._prefetch = prefetch
        self._idle_timeout = idle_timeout
        self._queues: _JobQueues | None = None
        # Pushed to this consumer but not yet yielded, as in a client's prefetch buffer.
        self._buffer: deque[_Message] = deque()
        self._unacked: list[MemoryDelivery] = []
        self._closed = False
        self.cancelled = False

    def __aiter__(self) -> MemoryConsumer:
        return self

    async def __anext__(self) -> Delivery:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:
            # Idle, cancelled or failed: give every unacked message back before going.
            await self.aclose()
            raise

    async def _next(self) -> MemoryDelivery:
        if self._queues is None:
            self._queues = self._broker._job(self._job)
            self._queues.consumers.append(self)
            self._queues.dispatch()
        queues = self._queues
        # One deadline per call: changes that bring nothing for this consumer don't extend it.
        loop = asyncio.get_running_loop()
        deadline = None if self._idle_timeout is None else loop.time() + self._idle_timeout
        while True:
            if self.cancelled:
                raise BackendUnavailable(f"the queue of job {self._job!r} was deleted")
            if self._buffer:
                delivery = MemoryDelivery(self, self._buffer.popleft())
                self._unacked.append(delivery)
                return delivery
            try:
                async with asyncio.timeout_at(deadline):
                    await queues.changed.wait()
            except TimeoutError:
                raise StopAsyncIteration from None

    def fill(self, ready: deque[_Message]) -> None:
        """Take messages from the queue while unsettled ones stay under the prefetch."""
        while ready and len(self._buffer) + len(self._unacked) < self._prefetch:
            self._buffer.append(ready.popleft())

    def release(self, delivery: MemoryDelivery) -> _JobQueues:
        """Forget a delivery that is being settled; refuse it once the consumer has ended."""
        if self._closed or self._queues is None:
            raise BackendUnavailable(
                f"the consumer of {delivery.message_id} has ended: it was given back"
            )
        self._unacked.remove(delivery)
        return self._queues

    async def aclose(self) -> None:
        """Stop consuming and give unacked messages back to the front of the queue."""
        if self._closed:
            return
        self._closed = True
        queues = self._queues
        if queues is None:
            return
        if self in queues.consumers:
            queues.consumers.remove(self)
        held = [delivery._message for delivery in self._unacked] + list(self._buffer)
        self._unacked.clear()
        self._buffer.clear()
        # Back to the front in the order they were delivered, as RabbitMQ does.
        for message in reversed(held):
            queues.give_back(message)
        queues.dispatch()
