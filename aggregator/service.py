"""The aggregator service: consume -> validate -> strategy -> commit -> ack.

Acks are late: a delivery is settled only after what it caused is durable (its version is
committed, or it is known to be a duplicate, or it was copied to the dead-letter queue).
A crash at any point therefore costs redeliveries, never updates, and the `applied` set in
Redis turns those redeliveries into no-ops.

A commit runs while the next updates are folded: once the new model is encoded, its write to
Redis goes on in a task, and the loop folds on top of the new version (`head`). One commit is
in flight at most, and the next one waits for it to be durable, so versions stay in order and
a fenced commit stops the loop before anything built on it is committed. Once durable, a
version's acks, blob deletions and announcement go on in a task of their own, after those of
the version before, so the next commit does not wait for them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.strategies import Contribution, Receipt, Strategy, build_strategy
from aggregator.validation import (
    check_age,
    check_payload,
    check_signature,
    check_signed,
    check_sizes,
    check_user,
    parse_header,
)
from infra.errors import BackendUnavailable, VersionConflict
from infra.logs import bind, log_context
from infra.protocols import Broker, Delivery, DeliveryStream, ModelStore
from infra.retry import retry_unavailable
from schemas import JobConfig, Rejection, RejectReason, UpdateHeader, VersionMeta
from schemas.codec import decode, decode_validated, encode_buffer, sha256_hex
from schemas.digests import running_hash
from schemas.safetensors_format import ByteBuffer, has_no_views

log = logging.getLogger(__name__)
T = TypeVar("T")
Model = dict[str, torch.Tensor]
# Where a validated update goes instead of the strategy (edge mode, aggregator/edge.py).
UpdateSink = Callable[[UpdateHeader, Delivery, Contribution], Awaitable[None]]
_BASE_CACHE_SIZE = 3
# Below this many bytes, hashing, decoding and folding an update (or encoding a model) take
# less time than the hop to a worker thread and back, so they run on the event loop.
_THREAD_MIN_BYTES = 256 * 1024
# How long, and up to how many bytes in hand, a batch waits for more deliveries (_gather_more).
_GATHER_SECONDS = 0.002
_GATHER_BYTES = 512 * 1024


class Fenced(Exception):
    """Another aggregator committed the version this one was about to commit."""


@dataclass
class AggregatorStats:
    """Counters of one aggregator run (the durable counts live in the store)."""

    received: int = 0
    applied: int = 0
    staleness_total: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    versions: int = 0


class Aggregator:
    """Fold one job's updates into its global model and commit each new version.

    Use as an async context manager, then `await run()`; `stop()` (e.g. from SIGTERM) ends
    the loop after the update in hand, leaving buffered updates unacked for redelivery.
    """

    def __init__(
        self,
        *,
        job: str,
        broker: Broker,
        store: ModelStore,
        prefetch: int | None = None,
        idle_timeout: float | None = None,
        retry_seconds: float = 1.0,
        metrics: AggregatorMetrics | None = None,
        sink: UpdateSink | None = None,
    ) -> None:
        self.job = job
        self.broker = broker
        self.store = store
        self.stats = AggregatorStats()
        # Without a registry from the caller, count into a private one nobody scrapes.
        self.metrics = (
            metrics if metrics is not None else AggregatorMetrics(CollectorRegistry(), job)
        )
        # True while `run` consumes (actively, or as a single-active-consumer standby).
        self.consuming = False
        self._prefetch = prefetch
        self._idle_timeout = idle_timeout
        self._retry_seconds = retry_seconds
        # With a sink, the sink settles each validated update; this aggregator commits nothing.
        self._sink = sink
        self._stopping = asyncio.Event()
        self._pending: dict[str, Delivery] = {}
        # The headers of the pending updates: their sizes and which came by claim-check.
        self._pending_headers: dict[str, UpdateHeader] = {}
        self._base_cache: dict[int, Model] = {}
        # `applied` flags of the deliveries at hand, read in one SMISMEMBER; only valid while
        # the version is `_hint_version`, since a commit adds its contributors to the set.
        self._applied_hint: dict[str, bool] = {}
        self._hint_version = -1
        # The commit in flight, if any, and the settling of the last durable version (its
        # acks, blobs and announcement); see the module docstring.
        self._committing: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None
        # Scratch buffers kept from one update to the next: the last committed version's
        # bytes, into which the next version is encoded, and the last claim-check payload's,
        # into which the next one is read. Memory already faulted in is several times faster
        # to write than a fresh model-sized bytearray (bench/large.py).
        self._spare_model_bytes: bytearray | None = None
        self._spare_blob: bytearray | None = None
        self.metrics.buffered.set_function(lambda: len(self._pending))
        self.metrics.consuming.set_function(lambda: float(self.consuming))
        self.config: JobConfig
        self.strategy: Strategy
        self.model: Model
        # The newest version committed (durable in the store)...
        self.version: int
        # ...and the one the model in memory builds on: `version`, or the commit in flight.
        self.head: int

    async def __aenter__(self) -> Aggregator:
        self.config = await self.store.get_config()
        self.strategy = build_strategy(self.config.strategy)
        await self._load_latest()
        await self.broker.declare_job(self.job)
        self.metrics.buffer_size.set(self.config.strategy.buffer_size)
        log.info(
            "aggregator for job %s starts at version %d with %s",
            self.job,
            self.version,
            self.config.strategy.name,
        )
        return self

    async def _load_latest(self) -> None:
        """Take the store's latest version as the global model, forgetting decoded bases."""
        self.version, model_bytes = await self._retry(self.store.latest)
        self.head = self.version
        self.model = await asyncio.to_thread(decode, model_bytes)
        self._base_cache.clear()
        self.metrics.version.set(self.version)

    async def _catch_up(self) -> None:
        """Reload the model if another aggregator committed since this one last looked.

        A standby loads the model when it starts and may only become the active consumer
        much later. With nothing buffered, nothing depends on the old version, so moving to
        the latest one is safe; with a buffer, a newer version is a conflict (fencing).
        """
        if self._pending:
            return
        if await self._retry(self.store.current_version) != self.version:
            previous = self.version
            await self._load_latest()
            self.strategy.reset()
            log.info(
                "job %s moved on from version %d to %d elsewhere: reloaded",
                self.job,
                previous,
                self.version,
            )

    async def __aexit__(self, *exc_info: object) -> None:
        for task in (self._committing, self._settling):
            if task is not None:
                # Only after a failure: its deliveries stay unacked and come back to be deduped.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._committing = self._settling = None
        # Buffered deliveries are left unacked: closing the consumer returns them to the queue.
        self._pending.clear()
        self._pending_headers.clear()
        self.strategy.reset()

    @property
    def prefetch(self) -> int:
        """Unacked deliveries to allow: a whole buffer must fit, or the buffer can never fill."""
        floor = self.config.strategy.buffer_size + 1
        return max(self._prefetch or 2 * floor, floor)

    def stop(self) -> None:
        """Ask the loop to end after the update in hand."""
        self._stopping.set()

    async def run(self) -> AggregatorStats:
        """Consume until stopped, fenced, or idle for `idle_timeout` seconds (drain mode)."""
        deliveries = self.broker.consume(
            self.job, prefetch=self.prefetch, idle_timeout=self._idle_timeout
        )
        # Read ahead into a local queue, so the deliveries already prefetched can be taken
        # together and checked against `applied` in one round trip instead of one each.
        inbox: asyncio.Queue[Delivery | _End] = asyncio.Queue()
        reader = asyncio.ensure_future(_read_into(deliveries, inbox))
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        self.consuming = True
        try:
            while not self._stopping.is_set():
                first = await self._next(inbox, stop_wait)
                if first is None:
                    break
                items = [first]
                await self._gather_more(inbox, items)
                await self.handle_batch([d for d in items if not isinstance(d, _End)])
                ends = [d for d in items if isinstance(d, _End)]
                if ends:
                    if ends[0].error is not None:
                        raise ends[0].error
                    break
        finally:
            self.consuming = False
            stop_wait.cancel()
            try:
                # Before the reader goes: cancelling it closes the consumer's channel, which
                # the acks of the versions still settling need.
                await self.settle_commit()
            finally:
                # Deliveries still in the inbox are unacked: closing the stream gives them back.
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await deliveries.aclose()
        return self.stats

    async def _gather_more(
        self, inbox: asyncio.Queue[Delivery | _End], items: list[Delivery | _End]
    ) -> None:
        """Take what the inbox holds, and wait a moment for more small deliveries, so that one
        `applied` read covers several.

        Small updates arrive one at a time, and each batch costs a round trip to Redis (0.14 to
        0.19 ms of CPU in redis-py here): 100 KB updates from four publishers came in batches
        of 2.4, and with this wait of at most 2 ms in batches of 4.2 (`bench/ingest.py`, 1,248
        and 720 reads for 3,000 updates). Never for more than a buffer, past what the prefetch
        window can still send, or past half a megabyte in hand: a 1 MB update, or a claim-check
        one, never waits; its handling dwarfs a read.
        """
        deadline = asyncio.get_running_loop().time() + _GATHER_SECONDS
        while True:
            while not inbox.empty():
                items.append(inbox.get_nowait())
            if (
                len(items) >= self.config.strategy.buffer_size
                or len(items) + len(self._pending) >= self.prefetch
                or self._stopping.is_set()
                or isinstance(items[-1], _End)
                or _bytes_in_hand(items) >= _GATHER_BYTES
            ):
                return
            try:
                async with asyncio.timeout_at(deadline):
                    items.append(await inbox.get())
            except TimeoutError:
                return

    async def _next(
        self, inbox: asyncio.Queue[Delivery | _End], stop: asyncio.Future[Any]
    ) -> Delivery | _End | None:
        """Return the inbox's next item, or None on a stop; a commit that fails meanwhile
        raises here, so a fenced aggregator stops at once rather than at its next delivery."""
        if not inbox.empty():
            # Already there (gathered while the last batch was handled): no wait to set up.
            await self._raise_if_commit_failed()
            return inbox.get_nowait()
        taking = asyncio.ensure_future(inbox.get())
        try:
            while not taking.done() and not stop.done():
                waits: set[asyncio.Future[Any]] = {taking, stop}
                waits.update(t for t in (self._committing, self._settling) if t is not None)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                await self._raise_if_commit_failed()
        finally:
            if not taking.done():
                taking.cancel()
        return taking.result() if taking.done() and not taking.cancelled() else None

    async def _raise_if_commit_failed(self) -> None:
        """Settle the commit or settling task that has ended, raising what it raised (Fenced)."""
        if self._committing is not None and self._committing.done():
            await self._wait_durable()
        if self._settling is not None and self._settling.done():
            await self._wait_settled()

    async def handle_batch(self, batch: list[Delivery]) -> None:
        """Handle deliveries in order, reading their `applied` flags together.

        The last commit may still be in flight on return: `settle_commit` waits for it.
        """
        while batch and not self._stopping.is_set():
            ids = [_raw_update_id(delivery) for delivery in batch]
            known = [i for i in ids if i is not None]
            # The version before the read, not after: a commit that lands while the read is
            # on its way (on another connection, before or after it) must make it stale.
            read_at = self.version
            flags = await self._retry(functools.partial(self.store.applied, known))
            self._applied_hint = dict(zip(known, flags, strict=True))
            self._hint_version = read_at
            # Flags that a commit overtook (it landed while they were being read) are stale:
            # read them again for the rest of the batch. Other commits keep them valid
            # (_keep_hint_valid).
            while batch and self.version == self._hint_version and not self._stopping.is_set():
                await self._handle(batch.pop(0))
                await self._raise_if_commit_failed()
        self._applied_hint = {}

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery to its end: applied (its version committed), buffered,
        skipped or dead-lettered."""
        await self._handle(delivery)
        await self.settle_commit()

    async def settle_commit(self) -> None:
        """Wait for the commit in flight, if any, and its deliveries' settling; raise what
        they raised (Fenced, an outage)."""
        await self._wait_durable()
        await self._wait_settled()

    async def _wait_durable(self) -> None:
        """Wait for the commit in flight, if any, to be durable; raise what it raised."""
        if self._committing is not None:
            committing, self._committing = self._committing, None
            await committing

    async def _wait_settled(self) -> None:
        """Wait for the last durable version's settling, if any; raise what it raised."""
        if self._settling is not None:
            settling, self._settling = self._settling, None
            await settling

    async def _handle(self, delivery: Delivery) -> None:
        self.stats.received += 1
        self.metrics.received.inc()
        self.metrics.received_bytes.inc(len(delivery.body))
        # Until the header is validated, the raw message id (and the device id, in the
        # per-field form) is all there is: the `fedq-update` document is parsed only once.
        device = delivery.headers.get("device_id")
        with log_context(
            job=self.job,
            version=self.version,
            update_id=delivery.message_id,
            device_id=device if isinstance(device, str) else None,
        ):
            try:
                await self._catch_up()
                await self._fold(delivery)
            except Rejection as rejection:
                await self._dead_letter(delivery, rejection)

    async def _fold(self, delivery: Delivery) -> None:
        header = parse_header(delivery.headers, self.job)
        bind(version=self.head, update_id=header.update_id, device_id=header.device_id)
        check_user(header, delivery.user_id, self.config)
        await self._authenticate(header)
        if await self._is_duplicate(header.update_id, delivery):
            return
        # After the duplicate check: a late redelivery of an applied update is acked, not
        # reported as a replay.
        check_age(header, self.config, time.time())
        verdict = self.strategy.admit(
            base_version=header.base_version, version=self.head, device_id=header.device_id
        )
        if verdict is not None:
            raise Rejection(*verdict)
        check_sizes(header, delivery.body, self.config)
        if header.payload == "inline":
            receipts = await self._fold_payload(header, delivery, delivery.body)
        else:
            blob, blob_digest = await self._blob(header)
            try:
                receipts = await self._fold_payload(header, delivery, blob, blob_digest)
            finally:
                self._keep_spare_blob(blob)
        if receipts is not None:
            await self._commit(receipts)

    async def _fold_payload(
        self,
        header: UpdateHeader,
        delivery: Delivery,
        payload: ByteBuffer,
        payload_digest: str | None = None,
    ) -> list[Receipt] | None:
        """Check, decode and fold an admitted update's payload (whose digest is computed
        here unless given); return a new version's receipts, if it completes one."""
        if self._sink is None and not self._needs_base(header):
            # The common case needs nothing more from Redis: hash, decode and fold in one
            # thread-pool hop, which keeps the payload's hash off the event loop too.
            def decode_and_add() -> list[Receipt] | None:
                tensors = self._checked_tensors(header, payload, payload_digest)
                return self._timed_add(self._make_contribution(header, tensors))

            return await self._add(header, delivery, decode_and_add)
        tensors = await asyncio.to_thread(self._checked_tensors, header, payload, payload_digest)
        contribution = await self._contribution(header, tensors)
        if self._sink is not None:
            await self._sink(header, delivery, contribution)
            return None
        if self.strategy.needs_base_model and self.head not in self._base_cache:
            # `add` changes the model in place; later stale updates still need this version.
            self._remember_base(self.head, {k: v.clone() for k, v in self.model.items()})
        return await self._add(header, delivery, lambda: self._timed_add(contribution))

    def _needs_base(self, header: UpdateHeader) -> bool:
        return self.strategy.needs_base_model or header.kind == "weights"

    def _checked_tensors(
        self, header: UpdateHeader, payload: ByteBuffer, payload_digest: str | None
    ) -> Model:
        """Check the payload's size and digest, then decode and validate it (in a thread)."""
        check_payload(header, payload, payload_digest)
        return decode_validated(
            payload, self.config.model_schema, header.codec, partial=header.keys == "partial"
        )

    async def _add(
        self, header: UpdateHeader, delivery: Delivery, add: Callable[[], list[Receipt] | None]
    ) -> list[Receipt] | None:
        """Run `add` (which folds the update), holding the delivery meanwhile; in a thread
        unless the update is small."""
        self._pending[header.update_id] = delivery
        self._pending_headers[header.update_id] = header
        try:
            return await _off_loop_if_big(header.payload_bytes, add)
        except BaseException:
            del self._pending[header.update_id]
            del self._pending_headers[header.update_id]
            raise

    def _timed_add(self, contribution: Contribution) -> list[Receipt] | None:
        """Fold a contribution into the model (in a thread), timing the fold alone."""
        with self.metrics.fold_seconds.time():
            return self.strategy.add(self.model, contribution)

    async def _authenticate(self, header: UpdateHeader) -> None:
        """Refuse an update not signed by its device's registered key, if the job says so."""
        if not self.config.require_signatures:
            return
        check_signed(header)
        # Looked up per update, not cached: a revocation takes effect on the next update.
        public_key = await self._retry(lambda: self.store.device_key(header.device_id))
        check_signature(header, public_key)

    async def _is_duplicate(self, update_id: str, delivery: Delivery) -> bool:
        already_applied = self._applied_hint.get(update_id)
        if already_applied is None or self._hint_version != self.version:
            [already_applied] = await self._retry(lambda: self.store.applied([update_id]))
        if already_applied:
            self.stats.duplicates += 1
            self.metrics.duplicates.inc()
            log.info("update %s already applied: acking the duplicate", update_id)
            await _settle(delivery.ack())
            return True
        held = self._pending.get(update_id)
        if held is not None:
            # Same update delivered again while buffered (a republish, or a redelivery after
            # a reconnect made the old delivery tag stale): keep the newest, settle the old.
            self.stats.duplicates += 1
            self.metrics.duplicates.inc()
            self._pending[update_id] = delivery
            await _settle(held.ack())
            return True
        return False

    async def _blob(self, header: UpdateHeader) -> tuple[ByteBuffer, str]:
        """Fetch an update's claim-check blob and its digest (in the header's algorithm),
        hashed as it arrived."""
        spare, self._spare_blob = self._spare_blob, None
        algorithm, _ = header.payload_digest

        async def fetch() -> tuple[ByteBuffer | None, str]:
            # A fresh digest per attempt: a retried read starts from the first byte.
            digest = running_hash(algorithm, header.payload_bytes)
            blob = await self.store.get_blob(header.device_id, header.update_id, spare, digest)
            return blob, digest.hexdigest()

        blob, blob_digest = await self._retry(fetch)
        if blob is not spare:
            # Not used (another length, or a value small enough for one GET): keep it.
            self._spare_blob = spare
        if blob is None:
            raise Rejection(RejectReason.BLOB_MISSING, f"no claim-check blob {header.update_id}")
        self.metrics.received_bytes.inc(len(blob))
        return blob, blob_digest

    def _keep_spare_blob(self, blob: ByteBuffer) -> None:
        """Keep a folded payload's buffer for the next one, unless a tensor still uses it
        (a robust buffer, a sink or a base cache may keep the decoded views)."""
        if isinstance(blob, bytearray) and has_no_views(blob):
            self._spare_blob = blob

    async def _contribution(self, header: UpdateHeader, tensors: Model) -> Contribution:
        base = await self._base_model(header.base_version) if self._needs_base(header) else None
        return self._make_contribution(header, tensors, base)

    def _make_contribution(
        self, header: UpdateHeader, tensors: Model, base: Model | None = None
    ) -> Contribution:
        delta = tensors
        if header.kind == "weights":
            assert base is not None
            # Only floating tensors are folded; the others keep the global value anyway.
            delta = {n: t - base[n] if t.is_floating_point() else t for n, t in tensors.items()}
        receipt = Receipt(
            update_id=header.update_id,
            device_id=header.device_id,
            staleness=self.head - header.base_version,
            num_samples=header.num_samples,
        )
        return Contribution(
            receipt=receipt,
            base_version=header.base_version,
            delta=delta,
            base_model=base,
            partial=header.keys == "partial",
        )

    async def _base_model(self, version: int) -> Model:
        if version == self.head:
            return self.model
        cached = self._base_cache.get(version)
        if cached is not None:
            return cached
        data = await self._retry(lambda: self.store.get_model(version))
        if data is None:
            raise Rejection(RejectReason.TOO_STALE, f"base version {version} is no longer kept")
        model = await asyncio.to_thread(decode, data)
        self._remember_base(version, model)
        return model

    def _remember_base(self, version: int, model: Model) -> None:
        """Cache a few decoded base versions; bounded, since each one is a whole model."""
        self._base_cache[version] = model
        for old in sorted(self._base_cache)[:-_BASE_CACHE_SIZE]:
            del self._base_cache[old]

    async def _commit(self, receipts: list[Receipt]) -> None:
        """Encode the new version and start committing it; the loop goes on meanwhile."""
        # One commit in flight, and so one encoded model in memory, at a time.
        await self._wait_durable()
        started = time.perf_counter()
        # One bytearray, written in one pass: no second copy of a big model on the way out;
        # hashed in the same hop, since hashing a big model would stall the event loop.
        spare, self._spare_model_bytes = self._spare_model_bytes, None
        model_bytes, model_sha256 = await _off_loop_if_big(
            sum(t.numel() * t.element_size() for t in self.model.values()),
            lambda: _encode_and_hash(self.model, spare),
        )
        meta = VersionMeta(
            version=self.head + 1,
            created_at=time.time(),
            sha256=model_sha256,
            model_bytes=len(model_bytes),
            contributors=[r.update_id for r in receipts],
            devices=[r.device_id for r in receipts],
            staleness=[r.staleness for r in receipts],
            num_samples=sum(r.num_samples for r in receipts),
            update_bytes=sum(self._pending_headers[r.update_id].payload_bytes for r in receipts),
        )
        self.head = meta.version
        self._committing = asyncio.create_task(self._finish_commit(model_bytes, meta, started))

    async def _finish_commit(
        self, model_bytes: bytearray, meta: VersionMeta, started: float
    ) -> None:
        """Make the version durable, then start settling its deliveries."""
        try:
            await self._retry(lambda: self.store.commit(meta.version - 1, model_bytes, meta))
        except VersionConflict:
            raise Fenced(
                f"version {meta.version} of job {self.job} was committed elsewhere"
            ) from None
        # The store keeps no reference to the bytes (ModelStore.commit): the next version
        # is encoded into them.
        self._spare_model_bytes = model_bytes
        self._keep_hint_valid(meta)
        self.version = meta.version
        self.stats.versions += 1
        self.stats.applied += len(meta.contributors)
        self.stats.staleness_total += sum(meta.staleness)
        self._count_commit(meta)
        bind(version=meta.version)
        log.info(
            "committed version %d of job %s from %d updates (staleness %s)",
            meta.version,
            self.job,
            len(meta.contributors),
            meta.staleness,
            extra={"contributors": meta.contributors, "staleness": meta.staleness},
        )
        # Popped only now: a redelivery meanwhile replaced its entry, and this acks the newest.
        deliveries = [self._pending.pop(update_id) for update_id in meta.contributors]
        headers = [self._pending_headers.pop(update_id) for update_id in meta.contributors]
        # Only claim-check updates have a blob to delete: a version of inline ones settles
        # without a Redis call.
        blobs = [(h.device_id, h.update_id) for h in headers if h.payload == "blob"]
        self._settling = asyncio.create_task(
            self._settle_version(self._settling, deliveries, blobs, meta, started)
        )

    def _keep_hint_valid(self, meta: VersionMeta) -> None:
        """Carry the `applied` flags read at the version before over to this one.

        This commit is the only change to `applied` since then: a commit by anyone else in
        between would have fenced it. Marking its contributors is all it takes, instead of
        reading the rest of the batch's flags again.
        """
        if self._hint_version != meta.version - 1:
            return
        for update_id in meta.contributors:
            if update_id in self._applied_hint:
                self._applied_hint[update_id] = True
        self._hint_version = meta.version

    async def _settle_version(
        self,
        previous: asyncio.Task[None] | None,
        deliveries: list[Delivery],
        blobs: list[tuple[str, str]],
        meta: VersionMeta,
        started: float,
    ) -> None:
        """Ack a durable version's deliveries and delete its blobs, then announce it once the
        version before it is announced (so announcements stay in order)."""
        # The acks need only this version durable: waiting for the last announcement's
        # confirm too would hold the prefetch window, and with it the next deliveries.
        await asyncio.gather(*(_settle(delivery.ack()) for delivery in deliveries))
        await self._retry(lambda: self.store.delete_blobs(blobs))
        if previous is not None:
            await previous
        await self.broker.announce_version(self.job, meta.version)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _count_commit(self, meta: VersionMeta) -> None:
        self.metrics.version.set(meta.version)
        self.metrics.versions.inc()
        self.metrics.applied.inc(len(meta.staleness))
        for staleness in meta.staleness:
            self.metrics.staleness.observe(staleness)

    async def _dead_letter(self, delivery: Delivery, rejection: Rejection) -> None:
        reason = rejection.reason.value
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        self.metrics.dead_lettered(reason)
        log.warning(
            "dead-lettering message %s of job %s: %s",
            delivery.message_id,
            self.job,
            # A string, not the exception: a handler that keeps records (a buffer, pytest's
            # capture) would keep its traceback's frames, and with them the message body.
            str(rejection),
            extra={"reason": reason},
        )
        # Like an ack, a failed dead-lettering only costs a redelivery (and a second verdict).
        await _settle(delivery.dead_letter(reason, rejection.detail))
        await self._retry(lambda: self.store.count_rejection(reason))

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Wait out a backend outage; nothing is acked around it."""
        return await retry_unavailable(
            operation, first_delay=self._retry_seconds, give_up=self._stopping
        )


async def _off_loop_if_big(nbytes: int, work: Callable[[], T]) -> T:
    """Run `work` on `nbytes` in a worker thread, or on the event loop under
    `_THREAD_MIN_BYTES`, where the hop would cost more than the work."""
    if nbytes < _THREAD_MIN_BYTES:
        return work()
    return await asyncio.to_thread(work)


def _encode_and_hash(model: Model, into: bytearray | None) -> tuple[bytearray, str]:
    model_bytes = encode_buffer(model, into=into)
    return model_bytes, sha256_hex(model_bytes)


@dataclass(frozen=True)
class _End:
    """The delivery stream ended: exhausted (error None) or failed with `error`."""

    error: BaseException | None = None


async def _read_into(deliveries: DeliveryStream, inbox: asyncio.Queue[Delivery | _End]) -> None:
    """Move deliveries into `inbox` as they come, then an `_End`."""
    try:
        async for delivery in deliveries:
            inbox.put_nowait(delivery)
    except Exception as exc:  # handed to the loop, which raises it after what came before
        inbox.put_nowait(_End(exc))
    else:
        inbox.put_nowait(_End())


def _bytes_in_hand(items: list[Delivery | _End]) -> int:
    """Return the payload bytes of the deliveries in hand, an empty body (a claim-check,
    whose payload waits in Redis) counting as big."""
    return sum(len(d.body) or _GATHER_BYTES for d in items if not isinstance(d, _End))


def _raw_update_id(delivery: Delivery) -> str | None:
    """Return the update id the message claims (validated later), if it is a string: its
    AMQP message id, which the wire contract makes the update id. A message whose header
    says otherwise only misses the batch's hint and is looked up alone."""
    update_id = delivery.message_id
    return update_id if update_id is not None and len(update_id) <= 64 else None


async def _settle(settling: Awaitable[None]) -> None:
    """Ack a delivery whose effect is durable; a failed ack only costs a redelivery."""
    try:
        await settling
    except BackendUnavailable as exc:
        log.warning("ack failed (%s): the update will be redelivered and skipped", exc)
