"""Publish, consume and dead-letter update messages on RabbitMQ through aio-pika."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ConsumerTag,
)
from aiormq.abc import DeliveredMessage
from pamqp import decode as amqp_decode
from pamqp import encode as amqp_encode
from pamqp.commands import Basic

from infra import keys
from infra.amqp_acks import ChannelAcks
from infra.amqp_body import read_bodies_into_bytearrays
from infra.errors import (
    AccessDenied,
    BackendUnavailable,
    JobNotFound,
    PublishError,
    PublishUnconfirmed,
)
from infra.protocols import DETAIL_HEADER, REASON_HEADER, DeadLetter, Delivery
from schemas import UpdateHeader
from schemas.safetensors_format import ByteBuffer
from schemas.wire import update_headers

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 5
DETAIL_LIMIT = 500
# A content header must fit in one frame (frame_max, 128 KiB by default): refuse bigger header
# tables here instead of letting the broker close the connection on a frame error.
MAX_HEADER_BYTES = 64 * 1024
MAX_KEY_BYTES = 128
ANNOUNCE_TIMEOUT = 5.0
RECONNECT_POLL = 0.1
# Backoff between republishes of a nacked or unconfirmed message, within the publish deadline.
REPUBLISH_FIRST_DELAY = 0.1
REPUBLISH_MAX_DELAY = 2.0

# The link to the broker is down or the channel/delivery it belongs to is gone: worth a retry.
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,  # includes TimeoutError, raised by the bounded waits below
)
# Anything that can go wrong on a best-effort send or close: the link, or a refusal.
_ANY_AMQP_ERRORS: tuple[type[BaseException], ...] = (aiormq.exceptions.AMQPError, *_LINK_ERRORS)
_RESUBSCRIBE_ERRORS: tuple[type[BaseException], ...] = (JobNotFound, *_ANY_AMQP_ERRORS)
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, struct.error)


def encode_headers(headers: Mapping[str, Any]) -> bytes:
    """Encode headers as an AMQP field table, with Python floats as 64-bit doubles.

    pamqp encodes a float as a 32-bit 'f', which moves a `sent_at` timestamp by up to a minute
    and rounds every metric; the 'd' (double) type, which RabbitMQ supports, keeps them exact.
    """
    parts = []
    for key, value in sorted(headers.items()):
        if not isinstance(key, str) or len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(f"header name {key!r} is not a string of at most 128 bytes")
        parts.append(amqp_encode.short_string(key) + _encode_value(value))
    table = b"".join(parts)
    return struct.pack(">I", len(table)) + table


def _encode_value(value: Any) -> bytes:
    if isinstance(value, float):
        if not math.isfinite(value):
            # Erlang has no NaN or infinity: RabbitMQ answers such a header by closing the
            # connection, and a republish loop would follow. Refuse it here instead.
            raise ValueError(f"header value {value} is not finite")
        return b"d" + struct.pack(">d", value)
    if isinstance(value, dict):
        return b"F" + encode_headers(value)
    if isinstance(value, list):
        items = b"".join(_encode_value(item) for item in value)
        return b"A" + struct.pack(">I", len(items)) + items
    return amqp_encode.encode_table_value(value)


def checked_header_table(headers: Mapping[str, Any]) -> bytes:
    """Encode headers as a field table; PublishError if AMQP cannot carry them in one frame."""
    try:
        encoded = encode_headers(headers)
    except _ENCODE_ERRORS as exc:
        raise PublishError(f"headers are not an AMQP field table: {exc}") from exc
    if len(encoded) > MAX_HEADER_BYTES:
        raise PublishError(f"headers take {len(encoded)} bytes, over {MAX_HEADER_BYTES}")
    return encoded


def roundtrip_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Return the headers as a consumer will receive them; raise PublishError if not encodable."""
    return amqp_decode.field_table(checked_header_table(headers))[1]


class _Properties(Basic.Properties):
    """Basic properties whose headers go out as the message's own table (floats as doubles)."""

    # Set by `_Message.properties`, the only maker: the table `encode_headers` made once.
    header_table: bytes

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return self.header_table
        return super().encode_property(name, value)


class _Message(aio_pika.Message):
    """An outgoing message that marshals its headers with `encode_headers`, once.

    The table is made (and checked) on first use and kept: the check before publishing, the
    marshalling and any republish all share it, which matters on the agents' hot path.
    """

    _table: bytes | None = None

    def header_table(self) -> bytes:
        """Return the headers' checked encoding; PublishError if they cannot be sent."""
        if self._table is None:
            self._table = checked_header_table(self.headers)
        return self._table

    @property
    def properties(self) -> Basic.Properties:
        base = super().properties
        properties = _Properties(**{name: getattr(base, name) for name in base.__slots__})
        properties.header_table = self.header_table()
        return properties


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


# Where reading a job's log stream starts: "first", "last", "next", an offset, or a time.
StreamStart = str | int | datetime
# The header RabbitMQ adds to every message it delivers from a stream.
STREAM_OFFSET_HEADER = "x-stream-offset"


@dataclass(frozen=True)
class LoggedMessage:
    """One message read back from a job's log stream, as it was published."""

    offset: int
    message_id: str | None
    headers: Mapping[str, Any] = field(default_factory=dict)
    body: bytes = b""
    # The AMQP timestamp property in seconds since the epoch, if the publisher set one.
    timestamp: float | None = None


def broker_dead_letter_reason(headers: Mapping[str, Any]) -> str:
    """Name why RabbitMQ itself dead-lettered a message (`delivery_limit` for a quorum queue)."""
    reason = _text(headers.get("x-first-death-reason"))
    if reason is None:
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = _text(deaths[0].get("reason"))
    return reason or "unknown"


@contextmanager
def _backend_errors(what: str) -> Iterator[None]:
    """Turn a lost link into BackendUnavailable, so callers never see aio-pika errors."""
    try:
        yield
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise AccessDenied(f"{what}: the broker user lacks the permission: {exc}") from exc
    except (
        aiormq.exceptions.AuthenticationError,
        aiormq.exceptions.ProbableAuthenticationError,
    ) as exc:
        # Before the link errors it subclasses: a wrong password is not worth retrying.
        raise AccessDenied(f"{what}: the broker refused the login: {exc!r}") from exc
    except _LINK_ERRORS as exc:
        raise BackendUnavailable(f"{what}: {exc!r}") from exc


class AmqpBroker:
    """The Broker on RabbitMQ: one robust connection, one confirming publisher channel.

    `publish` waits at most `timeout` for each confirm; across a nack, a missing confirm or a
    lost connection it republishes the same message until max(timeout, publish_timeout) has
    passed since the call began, then raises BackendUnavailable (PublishUnconfirmed for a nack
    or a missing confirm); an unroutable or refused message is a PublishError at once. Other
    operations are bounded by `publish_timeout` too, since a robust channel waits for the
    connection without limit.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        publish_timeout: float,
        user_id: str = "guest",
    ) -> None:
        self._connection = connection
        self._channel = channel
        self.publish_timeout = publish_timeout
        # The connection's user: RabbitMQ refuses a message whose user_id property differs,
        # so a consumer can trust the user_id of every update published through `publish`.
        self.user_id = user_id
        self._closed = False
        self._consumers: weakref.WeakSet[AmqpConsumer] = weakref.WeakSet()

    @classmethod
    async def connect(
        cls, url: str, *, publish_timeout: float = 60.0, connection_name: str = "fedq"
    ) -> AmqpBroker:
        """Connect (reconnecting by itself later on) and open the publishing channel.

        `connection_name` shows in RabbitMQ's connection list, so operators see who is who.
        """
        with _backend_errors(f"cannot connect to {_safe_url(url)}"):
            async with asyncio.timeout(publish_timeout):
                connection = await aio_pika.connect_robust(
                    url, client_properties={"connection_name": connection_name}
                )
                try:
                    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
                    await channel.initialize()
                except BaseException:
                    await connection.close()
                    raise
        return cls(connection, channel, publish_timeout, broker_user(url))

    def _temporary_channel(self) -> AbstractRobustChannel:
        # Topology and inspection use a channel of their own: a refused declare closes it, and
        # a closed channel is never restored, so a deleted queue is not re-declared later.
        return self._connection.channel(publisher_confirms=False)

    async def declare_job(self, job: str, *, log_stream: bool = False) -> None:
        """Create (idempotently) the job's update queue, dead-letter queue and bindings."""
        updates_args = {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": keys.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": job,
        }
        async with (
            self._operation(f"declare job {job!r}"),
            self._temporary_channel() as channel,
        ):
            updates = await channel.declare_exchange(
                keys.UPDATES_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            dead = await channel.declare_exchange(
                keys.DEAD_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            await channel.declare_exchange(
                keys.VERSIONS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            queue = await self._declare(channel, keys.updates_queue(job), updates_args)
            await queue.bind(updates, routing_key=job)
            queue = await self._declare(channel, keys.dead_queue(job), {"x-queue-type": "quorum"})
            await queue.bind(dead, routing_key=job)
            if log_stream:
                stream_args = {"x-queue-type": "stream", "x-max-age": "7D"}
                queue = await self._declare(channel, keys.log_stream(job), stream_args)
                await queue.bind(updates, routing_key=job)

    @staticmethod
    async def _declare(
        channel: AbstractRobustChannel, name: str, arguments: dict[str, Any]
    ) -> AbstractQueue:
        try:
            return await channel.declare_queue(
                name, durable=True, arguments=arguments, robust=False
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ValueError(f"queue {name} exists with other arguments: {exc}") from exc

    async def delete_job(self, job: str) -> None:
        """Remove the job's queues (tests and `fedq job delete`)."""
        names = (keys.updates_queue(job), keys.dead_queue(job), keys.log_stream(job))
        async with self._operation(f"delete job {job!r}"):
            for name in names:
                # One channel per queue: a refused delete closes its channel.
                async with self._temporary_channel() as channel:
                    try:
                        await channel.queue_delete(name, if_unused=False, if_empty=False)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        log.debug("queue %s was already gone", name)

    async def publish(self, header: UpdateHeader, body: bytes, *, timeout: float = 30.0) -> None:
        """Publish an update persistently and wait for the broker's confirm."""
        message = _Message(
            body,
            headers=update_headers(header),
            message_id=header.update_id,
            content_type=keys.UPDATE_CONTENT_TYPE,
            type="update",
            timestamp=datetime.fromtimestamp(header.sent_at, UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
        )
        await self.publish_message(keys.UPDATES_EXCHANGE, header.job, message, timeout=timeout)

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
        message = _Message(
            body,
            headers=dict(headers),
            message_id=message_id,
            content_type=keys.UPDATE_CONTENT_TYPE,
            type="update",
            timestamp=datetime.now(UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
        )
        await self.publish_message(keys.UPDATES_EXCHANGE, job, message, timeout=timeout)

    async def publish_message(
        self, exchange: str, routing_key: str, message: aio_pika.Message, *, timeout: float
    ) -> None:
        """Publish mandatory and confirmed, republishing the same message across reconnects."""
        # Refuse unencodable headers before they hit the wire.
        if isinstance(message, _Message):
            message.header_table()
        else:
            checked_header_table(message.headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, self.publish_timeout)
        target = await self._channel.get_exchange(exchange, ensure=False)
        what = f"message {message.message_id} to {exchange}/{routing_key}"
        unconfirmed = 0
        while True:
            if self._closed:
                raise BackendUnavailable("the broker connection is closed")
            try:
                await target.publish(message, routing_key, mandatory=True, timeout=timeout)
                return
            except aiormq.exceptions.PublishError as exc:
                raise PublishError(f"{what} is unroutable: is the job declared?") from exc
            except (aiormq.exceptions.DeliveryError, TimeoutError) as exc:
                # Worth another try: the same message id dedupes a copy the broker did take.
                unconfirmed += 1
                await _before_republish(exc, what, unconfirmed, deadline - loop.time(), timeout)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise PublishError(f"{what}: exchange missing: is the job declared?") from exc
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise PublishError(f"{what} was refused: no write permission: {exc}") from exc
            except aiormq.exceptions.ChannelClosed as exc:
                # E.g. PRECONDITION_FAILED for a user_id that is not the connection's user:
                # final, so report it rather than republish (the channel reopens by itself).
                raise PublishError(f"{what} was refused: {exc}") from exc
            except _LINK_ERRORS as exc:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BackendUnavailable(f"{what}: broker unreachable: {exc!r}") from exc
                log.warning("publishing %s failed (%r); republishing after reconnect", what, exc)
                await self._wait_ready(remaining, what)

    async def _wait_ready(self, seconds: float, what: str) -> None:
        try:
            async with asyncio.timeout(seconds):
                # ready() returns at once until the close callbacks have run, and awaiting a set
                # event does not yield: sleep so the robust connection can notice and restore.
                await asyncio.sleep(RECONNECT_POLL)
                await self._channel.ready()
                while self._channel.is_closed:
                    await asyncio.sleep(RECONNECT_POLL)
                    await self._channel.ready()
        except TimeoutError as exc:
            raise BackendUnavailable(f"{what}: no reconnection within the deadline") from exc

    def consume(
        self, job: str, *, prefetch: int, idle_timeout: float | None = None
    ) -> AmqpConsumer:
        """Yield deliveries from the job's update queue with manual acks."""
        consumer = AmqpConsumer(self, job, prefetch, idle_timeout)
        self._consumers.add(consumer)
        return consumer

    async def announce_version(self, job: str, version: int) -> None:
        """Tell listeners on the versions fanout that `version` is committed (best effort)."""
        message = aio_pika.Message(
            json.dumps({"job": job, "version": version}).encode(),
            content_type="application/json",
            type="version",
            timestamp=datetime.now(UTC),
        )
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                exchange = await self._channel.get_exchange(keys.VERSIONS_EXCHANGE, ensure=False)
                await exchange.publish(message, job, mandatory=False)
        except _ANY_AMQP_ERRORS as exc:
            # Listeners also read the Redis versions stream; a missed announcement only delays them.
            log.warning("could not announce version %d of job %s: %r", version, job, exc)

    async def drain_dead_letters(self, job: str, *, timeout: float = 2.0) -> list[DeadLetter]:
        """Remove and return every message now in the job's dead-letter queue.

        Messages are acked together at the end, so a failure part-way returns them all to the
        queue. After `timeout` the drain asks for no more and returns what it has read; a
        get already asked for is waited for (within the operation's own bound), never cut
        off: aiormq closes a channel whose call is cancelled, and the next channel opened at
        once can reuse its number before the broker has let go of it, which closes the
        whole connection ("second 'channel.open' seen").
        """
        letters: list[DeadLetter] = []
        name = keys.dead_queue(job)
        async with (
            self._operation(f"drain dead letters of job {job!r}"),
            self._temporary_channel() as channel,
        ):
            queue = await self._passive(channel, name, job)
            # What is there now; an empty queue, the common case, needs no get at all (a
            # get on a quorum queue whose node was just killed and restarted was seen to
            # go unanswered while the declare was answered at once).
            waiting = queue.declaration_result.message_count or 0
            deadline = asyncio.get_running_loop().time() + timeout
            last: AbstractIncomingMessage | None = None
            for _ in range(waiting):
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("draining %s stopped after %ss", name, timeout)
                    break
                message = await queue.get(fail=False, timeout=None)
                if message is None:
                    break
                letters.append(_dead_letter_of(message, name))
                last = message
            if last is not None:
                await last.ack(multiple=True)
        return letters

    async def read_log(
        self,
        job: str,
        *,
        start: StreamStart = "first",
        idle_timeout: float = 2.0,
        prefetch: int = 256,
    ) -> AsyncIterator[LoggedMessage]:
        """Yield the job's log stream from `start` until no message comes for `idle_timeout`."""
        received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        with _backend_errors(f"read the log of job {job!r}"):
            async with self._temporary_channel() as channel:
                # A stream refuses consumers without a prefetch limit and without manual acks.
                await channel.set_qos(prefetch_count=prefetch)
                try:
                    queue = await channel.declare_queue(
                        keys.log_stream(job), passive=True, robust=False
                    )
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    raise JobNotFound(
                        f"job {job!r} has no log stream {keys.log_stream(job)}"
                    ) from exc
                await queue.consume(
                    received.put, no_ack=False, arguments={"x-stream-offset": start}
                )
                while True:
                    try:
                        async with asyncio.timeout(idle_timeout):
                            message = await received.get()
                    except TimeoutError:
                        return  # caught up: a stream never ends by itself
                    yield _logged_of(message)
                    # On a stream an ack only grants credit for the next deliveries.
                    await message.ack()

    async def queue_depth(self, job: str) -> tuple[int, int]:
        """Return (ready messages, consumers) of the job's update queue."""
        async with (
            self._operation(f"inspect job {job!r}"),
            self._temporary_channel() as channel,
        ):
            queue = await self._passive(channel, keys.updates_queue(job), job)
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    def is_connected(self) -> bool:
        """Whether the connection is up now: false while the robust connection reconnects."""
        return not self._closed and self._connection.connected.is_set()

    @staticmethod
    async def _passive(channel: AbstractRobustChannel, name: str, job: str) -> AbstractQueue:
        try:
            # robust=False: a robust channel would answer from its cache, with stale counts.
            return await channel.declare_queue(name, passive=True, robust=False)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise JobNotFound(f"job {job!r} has no queue {name}: declare it first") from exc

    @asynccontextmanager
    async def _operation(self, what: str) -> AsyncIterator[None]:
        """Bound an operation in time and report a lost link as BackendUnavailable."""
        if self._closed:
            raise BackendUnavailable(f"{what}: the broker connection is closed")
        with _backend_errors(what):
            async with asyncio.timeout(self.publish_timeout):
                # Right after a lost link, opening a channel fails at once ("closed"): wait for
                # the robust connection to come back first, within the same time bound.
                await self._connection.connected.wait()
                yield

    async def close(self) -> None:
        """Stop every consumer and close the connection."""
        if self._closed:
            return
        self._closed = True
        for consumer in list(self._consumers):
            consumer.stop()
        with _backend_errors("close the broker connection"):
            await self._connection.close()


async def _before_republish(
    exc: BaseException, what: str, tries: int, remaining: float, timeout: float
) -> None:
    """Back off before republishing a nacked or unconfirmed message; past the deadline, raise."""
    problem = (
        f"was not confirmed within {timeout}s"
        if isinstance(exc, TimeoutError)
        else "was nacked by the broker"
    )
    if remaining <= 0:
        raise PublishUnconfirmed(f"{what} {problem} ({tries} tries)") from exc
    # A nack comes at once (a full reject-publish queue, a node restarting, a leader election):
    # back off so the broker has time to recover instead of nacking a tight loop.
    delay = min(REPUBLISH_FIRST_DELAY * 2 ** (tries - 1), REPUBLISH_MAX_DELAY, remaining)
    log.warning("%s %s; republishing in %.1fs", what, problem, delay)
    await asyncio.sleep(delay)


def broker_user(url: str) -> str:
    """Return the user a URL logs in as (aio-pika's default is guest)."""
    return unquote(urlsplit(url).username or "") or "guest"


def _safe_url(url: str) -> str:
    """Drop the password from a URL before it goes into a message."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _dead_letter_of(message: AbstractIncomingMessage, queue: str) -> DeadLetter:
    headers = dict(message.headers)
    reason = _text(headers.pop(REASON_HEADER, None))
    detail = _text(headers.pop(DETAIL_HEADER, None)) or ""
    if reason is None:
        reason = broker_dead_letter_reason(headers)
        origin = _text(headers.get("x-first-death-queue")) or queue
        detail = f"dead-lettered by the broker from {origin}"
    return DeadLetter(reason, detail, message.message_id, headers, message.body)


def _logged_of(message: AbstractIncomingMessage) -> LoggedMessage:
    headers = dict(message.headers)
    offset = headers.pop(STREAM_OFFSET_HEADER, -1)
    stamp = message.timestamp
    return LoggedMessage(
        offset=offset if isinstance(offset, int) else -1,
        message_id=message.message_id,
        headers=headers,
        body=message.body,
        timestamp=stamp.timestamp() if isinstance(stamp, datetime) else None,
    )


def dead_letter_headers(
    original: Mapping[str, Any], reason: str, detail: str
) -> tuple[dict[str, Any], bool]:
    """Return the headers of a dead-letter copy, and whether the original ones could be kept."""
    marks = {
        REASON_HEADER: reason.encode("utf-8", "replace").decode(),
        DETAIL_HEADER: detail[:DETAIL_LIMIT].encode("utf-8", "replace").decode(),
    }
    headers = {**original, **marks}
    try:
        roundtrip_headers(headers)
    except PublishError:
        return marks, False
    return headers, True


class AmqpDelivery:
    """One received update message; settles through its consumer's channel.

    It wraps aiormq's message as it came off the wire: aio-pika's IncomingMessage copies
    every property into an object of its own, in a task of its own, about a quarter of the
    CPU that consuming a 100 KB message costs (bench/consume_cost.py).
    """

    def __init__(
        self, broker: AmqpBroker, job: str, message: DeliveredMessage, acks: ChannelAcks
    ) -> None:
        self._broker = broker
        self._job = job
        self._message = message
        self._acks = acks
        acks.delivered(self._tag)
        self._properties = message.header.properties
        self._settled = False
        self._copied = False

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._properties.headers or {}

    @property
    def body(self) -> ByteBuffer:
        # A bytearray (infra/amqp_body.py), which the aggregator decodes in place.
        return self._message.body

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @property
    def user_id(self) -> str | None:
        return self._properties.user_id

    @property
    def _tag(self) -> int:
        tag = self._message.delivery_tag
        assert tag is not None, "a consumed message always has a delivery tag"
        return tag

    def _check_unsettled(self) -> None:
        if self._settled:
            raise RuntimeError(f"delivery {self.message_id} is already settled")

    async def ack(self) -> None:
        """Settle: the update's effect is durable (committed, or known duplicate)."""
        self._check_unsettled()
        with _backend_errors(f"ack {self.message_id}: it will be redelivered"):
            await self._acks.ack(self._tag)
        self._settled = True

    async def requeue(self) -> None:
        """Settle: give the message back to the queue for a later delivery."""
        self._check_unsettled()
        with _backend_errors(f"requeue {self.message_id}: it will be redelivered"):
            await self._acks.settle_alone(
                self._tag, lambda: self._message.channel.basic_nack(self._tag, requeue=True)
            )
        self._settled = True

    async def dead_letter(self, reason: str, detail: str) -> None:
        """Settle: copy the message to the job's dead-letter queue with the reason, then ack."""
        self._check_unsettled()
        if not self._copied:
            # A retry after a failed ack must not add a second copy.
            headers, kept = dead_letter_headers(self.headers, reason, detail)
            if not kept:
                log.warning("dead-lettering %s without its unusable headers", self.message_id)
            copy = _Message(
                self._message.body,
                headers=headers,
                message_id=self._properties.message_id,
                content_type=self._properties.content_type,
                type=self._properties.message_type,
                timestamp=self._properties.timestamp,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await self._broker.publish_message(
                keys.DEAD_EXCHANGE, self._job, copy, timeout=self._broker.publish_timeout
            )
            self._copied = True
        await self.ack()


@dataclass(frozen=True)
class _End:
    """Queued behind the messages a consumer still has: stop there, or fail with `error`."""

    error: BackendUnavailable | None = None


class AmqpConsumer:
    """An async iterator of deliveries on a channel of its own, closed when iteration ends.

    Ending (idle timeout, `aclose`, a cancelled `__anext__`, or the broker closing) cancels the
    consumer and closes the channel, so every unacked message goes back to the queue. After a
    reconnect it consumes again by itself; if the queue is gone by then, or the broker cancels
    the consumer (queue deleted), iteration fails with BackendUnavailable.
    """

    def __init__(
        self, broker: AmqpBroker, job: str, prefetch: int, idle_timeout: float | None
    ) -> None:
        self._broker = broker
        self._job = job
        self._prefetch = prefetch
        self._idle_timeout = idle_timeout
        self._buffer: asyncio.Queue[DeliveredMessage | _End] = asyncio.Queue()
        self._channel: AbstractRobustChannel | None = None
        # The aiormq channel under the robust one, replaced on every reconnect, and its acks.
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._acks: ChannelAcks | None = None
        self._tag: ConsumerTag | None = None
        self._closing: asyncio.Future[None] | None = None

    def __aiter__(self) -> AmqpConsumer:
        return self

    async def __anext__(self) -> Delivery:
        if self._closing is not None:
            raise StopAsyncIteration
        try:
            if self._channel is None:
                await self._start()
            return await self._next()
        except BaseException:
            # Idle, cancelled or failed: give every unacked message back before going.
            await self.aclose()
            raise

    async def _start(self) -> None:
        async with self._broker._operation(f"consume job {self._job!r}"):
            self._channel = self._broker._connection.channel(publisher_confirms=False)
            await self._channel.initialize()
            # The robust channel re-applies this QoS whenever it reopens.
            await self._channel.set_qos(prefetch_count=self._prefetch)
            await self._subscribe(self._channel)
            self._channel.reopen_callbacks.add(self._resubscribe)

    async def _subscribe(self, channel: AbstractRobustChannel) -> None:
        name = keys.updates_queue(self._job)
        try:
            # robust=False: aio-pika would re-declare it on reconnect, and a queue deleted in
            # the meantime would then fail the whole connection's recovery, again and again.
            await channel.declare_queue(name, passive=True, robust=False)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise JobNotFound(f"job {self._job!r} has no queue {name}") from exc
        # On the aiormq channel itself, to skip aio-pika's per-delivery message and task.
        underlay = await channel.get_underlay_channel()
        read_bodies_into_bytearrays(underlay)
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        # Before consuming: a delivery may come before basic_consume returns.
        self._acks = ChannelAcks(underlay)
        consuming = await underlay.basic_consume(name, self._on_message, no_ack=False)
        self._underlay, self._tag = underlay, consuming.consumer_tag

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._buffer.put_nowait(message)

    async def _resubscribe(self, channel: AbstractRobustChannel | None, /) -> None:
        """Consume again on the channel the robust connection has just reopened."""
        if self._closing is not None or channel is None:
            return
        try:
            await self._subscribe(channel)
        except _RESUBSCRIBE_ERRORS as exc:
            lost = BackendUnavailable(f"cannot consume job {self._job!r} again: {exc!r}")
            self._buffer.put_nowait(_End(lost))

    def _on_cancel(self, frame: Basic.Cancel) -> None:
        if frame.consumer_tag == self._tag:
            # The broker cancelled us, typically because the queue was deleted.
            lost = BackendUnavailable(f"the broker cancelled the consumer of job {self._job!r}")
            self._buffer.put_nowait(_End(lost))

    def stop(self) -> None:
        """End the iteration once the messages already received are yielded."""
        self._buffer.put_nowait(_End())

    async def _next(self) -> Delivery:
        loop = asyncio.get_running_loop()
        deadline = None if self._idle_timeout is None else loop.time() + self._idle_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await self._buffer.get()
            except TimeoutError:
                raise StopAsyncIteration from None
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                raise StopAsyncIteration
            acks = self._acks
            if item.channel.is_closed or acks is None or item.channel is not acks.channel:
                # Received before a reconnect: the broker has already requeued it.
                continue
            return AmqpDelivery(self._broker, self._job, item, acks)

    async def aclose(self) -> None:
        """Cancel the consumer and close its channel (idempotent)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        channel, underlay, tag = self._channel, self._underlay, self._tag
        if channel is None:
            return
        channel.reopen_callbacks.discard(self._resubscribe)
        if channel.is_closed:
            return
        try:
            async with asyncio.timeout(self._broker.publish_timeout):
                if underlay is not None and not underlay.is_closed and tag is not None:
                    await underlay.basic_cancel(tag)
                await channel.close()
        except _ANY_AMQP_ERRORS as exc:
            # The link is gone, and with it the channel: the broker requeues by itself.
            log.info("closing the consumer of %s: %r", self._job, exc)
