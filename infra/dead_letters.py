"""List, requeue and purge a job's dead letters without losing any (`fedq dead`).

Nothing here hands a dead letter back to its queue. `fedq.dead.{J}` is a quorum queue, and a
quorum queue counts every message given back to it (a nack with requeue, and on RabbitMQ
3.10, measured, a closed channel too) towards its delivery limit; RabbitMQ 4.x sets a default
limit of 20, and the dead queue has no dead-letter exchange of its own, so a message listed
20 times would be dropped. Instead one pass reads the messages the queue holds now, republishes
(mandatory, confirmed) each one it keeps to the dead exchange and each one it requeues to the
updates exchange, and only then acks everything it read. A failure part-way therefore leaves
duplicates, never a loss: the aggregator skips an update that is already applied, and a kept
letter shows twice in the next listing.

This lives beside the brokers rather than in the Broker protocol so that it stays additive
while the protocol is being extended elsewhere; it uses the brokers' own channel, bound and
error helpers, so its failures read like theirs (JobNotFound, BackendUnavailable, PublishError).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from infra import keys
from infra.amqp_broker import AmqpBroker, _backend_errors, _dead_letter_of, _Message
from infra.memory_broker import MemoryBroker
from infra.protocols import Broker, DeadLetter

Action = Literal["keep", "requeue", "drop"]
Decide = Callable[[DeadLetter], Action]

# Headers the broker adds when it dead-letters or redelivers; a requeued update starts afresh.
_BROKER_HEADERS = ("x-death", "x-delivery-count")
_BROKER_PREFIXES = ("x-fedq-", "x-first-death-", "x-last-death-")


def requeue_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Return the headers a requeued update is published with: the original ones only."""
    return {
        key: value
        for key, value in headers.items()
        if key not in _BROKER_HEADERS and not key.startswith(_BROKER_PREFIXES)
    }


def keep_all(letter: DeadLetter) -> Action:
    """Keep every letter: a listing."""
    return "keep"


def matching(reason: str | None, action: Action) -> Decide:
    """Apply `action` to the letters with `reason` (all of them if None) and keep the rest."""

    def decide(letter: DeadLetter) -> Action:
        return action if reason is None or letter.reason == reason else "keep"

    return decide


async def rework_dead_letters(
    broker: Broker, job: str, decide: Decide, *, timeout: float = 10.0
) -> list[tuple[DeadLetter, Action]]:
    """Read every dead letter of the job once and keep, requeue or drop each as `decide` says.

    Returns the letters in queue order with what was done to each. `timeout` bounds reading
    each message and each republish, not the whole pass.
    """
    if isinstance(broker, AmqpBroker):
        return await _rework_amqp(broker, job, decide, timeout)
    if isinstance(broker, MemoryBroker):
        return await _rework_memory(broker, job, decide)
    raise TypeError(f"dead letters of {type(broker).__name__} are not supported")


async def peek_dead_letters(broker: Broker, job: str, *, timeout: float = 10.0) -> list[DeadLetter]:
    """Return the job's dead letters and leave them all in the queue, in the same order."""
    done = await rework_dead_letters(broker, job, keep_all, timeout=timeout)
    return [letter for letter, _ in done]


def _copy(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    return _Message(
        message.body,
        headers=dict(headers),
        message_id=message.message_id,
        content_type=message.content_type or keys.UPDATE_CONTENT_TYPE,
        type=message.type or "update",
        timestamp=message.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _rework_amqp(
    broker: AmqpBroker, job: str, decide: Decide, timeout: float
) -> list[tuple[DeadLetter, Action]]:
    name = keys.dead_queue(job)
    done: list[tuple[DeadLetter, Action]] = []
    with _backend_errors(f"rework dead letters of job {job!r}"):
        async with broker._temporary_channel() as channel:
            async with asyncio.timeout(broker.publish_timeout):
                queue = await broker._passive(channel, name, job)
            # Only what is there now: the copies we republish go behind these and must not be
            # read again in the same pass.
            count = queue.declaration_result.message_count or 0
            read: list[AbstractIncomingMessage] = []
            for _ in range(count):
                message = await queue.get(fail=False, timeout=timeout)
                if message is None:
                    break
                read.append(message)
            for message in read:
                letter = _dead_letter_of(message, name)
                action = decide(letter)
                if action == "keep":
                    await broker.publish_message(
                        keys.DEAD_EXCHANGE, job, _copy(message, message.headers), timeout=timeout
                    )
                elif action == "requeue":
                    copy = _copy(message, requeue_headers(letter.headers))
                    await broker.publish_message(keys.UPDATES_EXCHANGE, job, copy, timeout=timeout)
                done.append((letter, action))
            if read:
                # Every copy is confirmed: only now may the originals go.
                await read[-1].ack(multiple=True)
    return done


async def _rework_memory(
    broker: MemoryBroker, job: str, decide: Decide
) -> list[tuple[DeadLetter, Action]]:
    queues = broker._job(job)
    letters, queues.dead = queues.dead, []
    kept: list[DeadLetter] = []
    done: list[tuple[DeadLetter, Action]] = []
    try:
        for index, letter in enumerate(letters):
            action = decide(letter)
            if action == "requeue":
                try:
                    await broker.publish_raw(
                        job,
                        letter.body,
                        headers=requeue_headers(letter.headers),
                        message_id=letter.message_id,
                    )
                except BaseException:
                    # Not requeued: it and every letter not yet handled stay dead.
                    kept.extend(letters[index:])
                    raise
            elif action == "keep":
                kept.append(letter)
            done.append((letter, action))
    finally:
        # Letters dead-lettered meanwhile (by a requeue's consumer) go behind the kept ones.
        queues.dead = kept + queues.dead
    return done
