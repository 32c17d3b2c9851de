"""The small interfaces the services are written against; real and in-memory peers implement them.

The aggregator and the device agents only ever see these Protocols; `infra.connect` picks
the implementation from a URL (`amqp://`, `redis://` or `memory://`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas import JobConfig, UpdateHeader, VersionMeta
from schemas.digests import RunningHash
from schemas.safetensors_format import ByteBuffer

# Header names added to a dead-lettered message (the original headers are kept alongside).
REASON_HEADER = "x-fedq-reason"
DETAIL_HEADER = "x-fedq-detail"


class Delivery(Protocol):
    """One update message handed to the aggregator; it must end in exactly one settle call."""

    @property
    def message_id(self) -> str | None: ...
    @property
    def headers(self) -> Mapping[str, Any]:
        """Raw AMQP headers, not yet validated (bytes values are left as they arrived)."""
        ...

    @property
    def body(self) -> ByteBuffer:
        """The payload: bytes, or a bytearray the consumer may decode in place."""
        ...

    @property
    def redelivered(self) -> bool: ...
    @property
    def user_id(self) -> str | None:
        """The publisher's user as the broker validated it (AMQP user_id), if it set one."""
        ...

    async def ack(self) -> None:
        """Settle: the update's effect is durable (committed, or known duplicate)."""
        ...

    async def dead_letter(self, reason: str, detail: str) -> None:
        """Settle: copy the message to the job's dead-letter queue with the reason, then ack."""
        ...

    async def requeue(self) -> None:
        """Settle: give the message back to the queue for a later delivery."""
        ...


class DeliveryStream(Protocol):
    """The deliveries of one consumer; `aclose` stops consuming and returns unacked ones."""

    def __aiter__(self) -> DeliveryStream: ...
    async def __anext__(self) -> Delivery: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class DeadLetter:
    """A message read back from a job's dead-letter queue."""

    reason: str
    detail: str
    message_id: str | None
    headers: Mapping[str, Any] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class DeviceRecord:
    """One entry of a job's device registry."""

    device_id: str
    public_key: str
    revoked: bool


@dataclass(frozen=True)
class DeviceTally:
    """What one device contributed to committed versions, kept up to date by each commit."""

    device_id: str
    applied: int
    staleness_sum: int
    staleness_max: int

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.applied if self.applied else 0.0


def tallies_from_fields(fields: Mapping[str, int]) -> list[DeviceTally]:
    """Build tallies from `applied:D`, `staleness_sum:D`, `staleness_max:D` counters."""
    by_device: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        # The counter names hold no ":", so the first one ends it (device ids may hold ":").
        counter, _, device = name.partition(":")
        by_device.setdefault(device, {})[counter] = value
    return [
        DeviceTally(
            device_id=device,
            applied=counters.get("applied", 0),
            staleness_sum=counters.get("staleness_sum", 0),
            staleness_max=counters.get("staleness_max", 0),
        )
        for device, counters in sorted(by_device.items())
    ]


class Broker(Protocol):
    """Topology, publishing and consuming of update messages, plus version announcements."""

    async def declare_job(self, job: str, *, log_stream: bool = False) -> None:
        """Create (idempotently) the job's update queue, dead-letter queue and bindings."""
        ...

    async def delete_job(self, job: str) -> None:
        """Remove the job's queues (tests and `fedq job delete`)."""
        ...

    async def publish(self, header: UpdateHeader, body: bytes, *, timeout: float = 30.0) -> None:
        """Publish an update persistently and wait for the broker's confirm.

        Raises PublishError if unroutable or refused; republishes across a nack, a missing
        confirm or a connection loss with the same message id until the publish deadline (then
        BackendUnavailable), so a duplicate at worst, never a loss.
        """
        ...

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
        ...

    def consume(
        self, job: str, *, prefetch: int, idle_timeout: float | None = None
    ) -> DeliveryStream:
        """Yield deliveries from the job's update queue with manual acks.

        With `idle_timeout`, stop after that many seconds without a message (drain mode);
        otherwise run until the consuming task is cancelled.
        """
        ...

    async def announce_version(self, job: str, version: int) -> None:
        """Tell listeners on the versions fanout that `version` is committed (best effort)."""
        ...

    async def drain_dead_letters(self, job: str, *, timeout: float = 2.0) -> list[DeadLetter]:
        """Remove and return every message now in the job's dead-letter queue."""
        ...

    async def queue_depth(self, job: str) -> tuple[int, int]:
        """Return (ready messages, consumers) of the job's update queue."""
        ...

    def is_connected(self) -> bool:
        """Whether the broker link is up now (readiness probes; no network round trip)."""
        ...

    async def close(self) -> None: ...


class ModelStore(Protocol):
    """One job's state: config, global versions, applied ids, blobs and evaluation results."""

    job: str

    async def create_job(self, config: JobConfig, model: ByteBuffer, meta: VersionMeta) -> None:
        """Store the config and version 0; raise JobExists if the job is already there."""
        ...

    async def delete_job(self) -> None:
        """Remove every key of the job."""
        ...

    async def get_config(self) -> JobConfig:
        """Return the job's config; raise JobNotFound if there is none."""
        ...

    async def current_version(self) -> int:
        """Return the latest committed version; raise JobNotFound if there is none."""
        ...

    async def get_model(self, version: int) -> ByteBuffer | None:
        """Return a version's safetensors bytes, or None once it has been pruned.

        A bytearray (big values) is the caller's own copy: the codec decodes it in place.
        """
        ...

    async def get_meta(self, version: int) -> VersionMeta | None: ...

    async def latest(self) -> tuple[int, ByteBuffer]:
        """Return the latest version and its bytes, consistently, even while commits race."""
        ...

    async def commit(self, expected_version: int, model: ByteBuffer, meta: VersionMeta) -> None:
        """Atomically move the job from `expected_version` to `meta.version` (= expected + 1).

        Records `meta.contributors` as applied, appends to the versions stream and prunes
        versions beyond the config's `versions_kept`. Raise VersionConflict (and change
        nothing visible) if the current version is not `expected_version`. Keep no reference
        to `model` after returning: the aggregator writes the next version into it.
        """
        ...

    async def applied(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each update id is already part of a committed version."""
        ...

    async def applied_count(self) -> int: ...

    async def device_tallies(self) -> list[DeviceTally]:
        """Return each contributing device's applied updates and staleness, sorted by id."""
        ...

    async def recent_versions(self, seconds: float) -> int:
        """Return how many versions (after 0) were committed in the last `seconds`."""
        ...

    async def put_blob(
        self, device_id: str, update_id: str, data: ByteBuffer, ttl_seconds: int
    ) -> None:
        """Store a device's claim-check payload that expires after `ttl_seconds`."""
        ...

    async def get_blob(
        self,
        device_id: str,
        update_id: str,
        into: bytearray | None = None,
        digest: RunningHash | None = None,
    ) -> ByteBuffer | None:
        """Return a claim-check payload, or None once it expired or was deleted.

        `into` is a scratch buffer the store may fill and return instead of allocating one
        (when its length is exactly the payload's); the caller must not use it otherwise.
        `digest`, if given, is fed the payload's bytes in order (when one is returned), so
        that the caller need not hash them again: a store may hash them while the rest
        are still on their way. A digest fed by a call that returned None is meaningless.
        """
        ...

    async def delete_blobs(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Remove claim-check payloads given as (device id, update id) pairs."""
        ...

    async def record_eval(self, version: int, metrics: Mapping[str, float]) -> None:
        """Write evaluation metrics into a version's meta and remember the latest evaluated."""
        ...

    async def latest_eval(self) -> tuple[int, dict[str, float]] | None:
        """Return (version, metrics) of the newest evaluated version, if any."""
        ...

    async def count_rejection(self, reason: str) -> None: ...

    async def rejection_counts(self) -> dict[str, int]: ...

    async def wait_for_version(self, after: int, timeout: float) -> int:
        """Return the current version as soon as it exceeds `after`, or when `timeout` ends."""
        ...

    async def claim_device_index(self, device_id: str) -> int:
        """Give each distinct device id a stable index 0, 1, 2, ... (first come first served)."""
        ...

    async def register_device(
        self, device_id: str, public_key: str, *, replace: bool = False
    ) -> None:
        """Register a device's base64 Ed25519 public key (and lift any revocation).

        Raise DeviceExists if the device already has a different or revoked key and
        `replace` is False; registering the same active key again is a no-op.
        """
        ...

    async def device_key(self, device_id: str) -> str | None:
        """Return the device's public key, or None if it is unknown or revoked."""
        ...

    async def revoke_device(self, device_id: str) -> bool:
        """Stop the device's key from authenticating updates; False if it is not registered."""
        ...

    async def list_devices(self) -> list[DeviceRecord]:
        """Return every registered device, revoked ones included, sorted by id."""
        ...

    async def close(self) -> None: ...
