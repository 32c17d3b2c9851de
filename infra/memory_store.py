"""The in-process `ModelStore` peer: the same semantics as Redis, held in one hub object.

`fedq simulate` and the contract tests use it. A `MemoryStoreHub` holds every job of one
process (there is no module-level state); each `MemoryModelStore` is a view of one job.
Each operation yields to the event loop once, like a network round trip, and then runs
without awaiting, so it is atomic on the loop the way a Lua script is on the Redis server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from infra.errors import DeviceExists, JobExists, JobNotFound, VersionConflict
from infra.protocols import DeviceRecord, DeviceTally, tallies_from_fields
from schemas import JobConfig, VersionMeta
from schemas.digests import RunningHash
from schemas.safetensors_format import ByteBuffer


@dataclass
class _JobState:
    """Everything Redis would hold under `fedq:{J}:*` for one job."""

    # JSON, as Redis stores it: a caller cannot mutate what was committed.
    config_json: str | None = None
    versions_kept: int = 0
    version: int = 0
    models: dict[int, bytes] = field(default_factory=dict)
    metas: dict[int, str] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    # update id -> (payload, monotonic expiry time)
    # (device id, update id) -> (bytes, expiry)
    blobs: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)
    latest_eval: tuple[int, dict[str, float]] | None = None
    rejections: Counter[str] = field(default_factory=Counter)
    devices: dict[str, int] = field(default_factory=dict)
    device_keys: dict[str, str] = field(default_factory=dict)
    revoked_devices: set[str] = field(default_factory=set)
    # The Redis tallies hash: `applied:D`, `staleness_sum:D`, `staleness_max:D`.
    device_tallies: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


async def _checkpoint() -> None:
    """Yield to the event loop once, as every call to a networked store does."""
    # Without it a caller polling this store in a loop would starve every other task,
    # and concurrent callers would never interleave the way they do against Redis.
    await asyncio.sleep(0)


class MemoryStoreHub:
    """The state of every job in one process, shared by the stores that view it."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._jobs: dict[str, _JobState] = {}
        self.clock = clock

    def state(self, job: str) -> _JobState:
        """Return a job's state for writing, creating it (as a Redis key appears on first write)."""
        return self._jobs.setdefault(job, _JobState())

    def peek(self, job: str) -> _JobState:
        """Return a job's state for reading; an unknown job reads as empty and is not created."""
        return self._jobs.get(job) or _JobState()

    def drop(self, job: str) -> _JobState | None:
        """Forget a job's state and return what it was."""
        return self._jobs.pop(job, None)


class MemoryModelStore:
    """A `ModelStore` for one job, held in a `MemoryStoreHub`."""

    def __init__(self, hub: MemoryStoreHub, job: str) -> None:
        self.job = job
        self._hub = hub

    async def close(self) -> None:
        """Do nothing: the hub outlives its stores."""

    def _existing(self) -> _JobState:
        state = self._hub.peek(self.job)
        if state.config_json is None:
            raise JobNotFound(self.job)
        return state

    # -- job lifecycle -----------------------------------------------------------------

    async def create_job(self, config: JobConfig, model: ByteBuffer, meta: VersionMeta) -> None:
        """Store the config and version 0; raise JobExists if the job is already there."""
        await _checkpoint()
        if config.job != self.job:
            raise ValueError(f"config is for job {config.job!r}, this store is {self.job!r}")
        if meta.version != 0:
            raise ValueError(f"the first version must be 0, not {meta.version}")
        state = self._hub.state(self.job)
        if state.config_json is not None:
            raise JobExists(self.job)
        state.config_json = config.model_dump_json()
        state.versions_kept = config.versions_kept
        state.version = 0
        state.models[0] = bytes(model)
        state.metas[0] = meta.model_dump_json()

    async def delete_job(self) -> None:
        """Remove every key of the job."""
        await _checkpoint()
        state = self._hub.drop(self.job)
        if state is not None:
            # Wake waiters on the dropped state so they see the job is gone.
            state.config_json = None
            async with state.changed:
                state.changed.notify_all()

    async def get_config(self) -> JobConfig:
        """Return the job's config; raise JobNotFound if there is none."""
        await _checkpoint()
        config_json = self._existing().config_json
        assert config_json is not None  # _existing() checked it
        return JobConfig.model_validate_json(config_json)

    async def current_version(self) -> int:
        """Return the latest committed version; raise JobNotFound if there is none."""
        await _checkpoint()
        return self._existing().version

    # -- versions ----------------------------------------------------------------------

    async def get_model(self, version: int) -> bytes | None:
        """Return a version's safetensors bytes, or None once it has been pruned."""
        await _checkpoint()
        return self._hub.peek(self.job).models.get(version)

    async def get_meta(self, version: int) -> VersionMeta | None:
        """Return a version's metadata, or None if the version was never committed."""
        await _checkpoint()
        raw = self._hub.peek(self.job).metas.get(version)
        return None if raw is None else VersionMeta.model_validate_json(raw)

    async def latest(self) -> tuple[int, bytes]:
        """Return the latest version and its bytes, consistently, even while commits race."""
        await _checkpoint()
        state = self._existing()
        return state.version, state.models[state.version]

    async def commit(self, expected_version: int, model: ByteBuffer, meta: VersionMeta) -> None:
        """Atomically move the job from `expected_version` to `meta.version` (= expected + 1)."""
        await _checkpoint()
        new_version = expected_version + 1
        if meta.version != new_version:
            raise ValueError(f"meta.version {meta.version} != expected_version + 1")
        state = self._existing()
        if state.version != expected_version:
            raise VersionConflict(f"job {self.job}: version is no longer {expected_version}")
        state.models[new_version] = bytes(model)
        state.metas[new_version] = meta.model_dump_json()
        state.applied.update(meta.contributors)
        for device, staleness in zip(meta.devices, meta.staleness, strict=True):
            tallies = state.device_tallies
            tallies[f"applied:{device}"] += 1
            tallies[f"staleness_sum:{device}"] += staleness
            most = f"staleness_max:{device}"
            tallies[most] = max(tallies.get(most, 0), staleness)
        state.version = new_version
        state.models.pop(new_version - state.versions_kept, None)
        async with state.changed:
            state.changed.notify_all()

    async def wait_for_version(self, after: int, timeout: float) -> int:
        """Return the current version as soon as it exceeds `after`, or when `timeout` ends."""
        await _checkpoint()
        state = self._existing()
        if state.version <= after:
            # A timeout is not an error here: the caller then gets the current version.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), state.changed:
                    await state.changed.wait_for(
                        lambda: state.config_json is None or state.version > after
                    )
        return await self.current_version()

    # -- applied ids -------------------------------------------------------------------

    async def applied(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each update id is already part of a committed version."""
        await _checkpoint()
        applied = self._hub.peek(self.job).applied
        return [update_id in applied for update_id in update_ids]

    async def applied_count(self) -> int:
        """Return how many update ids committed versions contain."""
        await _checkpoint()
        return len(self._hub.peek(self.job).applied)

    async def device_tallies(self) -> list[DeviceTally]:
        """Return each contributing device's applied updates and staleness, sorted by id."""
        await _checkpoint()
        return tallies_from_fields(self._hub.peek(self.job).device_tallies)

    async def recent_versions(self, seconds: float) -> int:
        """Return how many versions (after 0) were committed in the last `seconds`."""
        await _checkpoint()
        state = self._hub.peek(self.job)
        since = time.time() - seconds
        count = 0
        # Newest first, stopping at the window's edge: the cost is the window, not the job.
        for version in range(state.version, 0, -1):
            raw = state.metas.get(version)
            if raw is None or VersionMeta.model_validate_json(raw).created_at < since:
                break
            count += 1
        return count

    # -- claim-check blobs -------------------------------------------------------------

    async def put_blob(
        self, device_id: str, update_id: str, data: ByteBuffer, ttl_seconds: int
    ) -> None:
        """Store a device's claim-check payload that expires after `ttl_seconds`."""
        await _checkpoint()
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1, not {ttl_seconds}")
        expires = self._hub.clock() + ttl_seconds
        self._hub.state(self.job).blobs[device_id, update_id] = (bytes(data), expires)

    async def get_blob(
        self,
        device_id: str,
        update_id: str,
        into: bytearray | None = None,
        digest: RunningHash | None = None,
    ) -> bytes | None:
        """Return a claim-check payload, or None once it expired or was deleted (`into` is
        not used: the stored bytes are returned as they are; `digest` is fed them)."""
        await _checkpoint()
        blobs = self._hub.peek(self.job).blobs
        entry = blobs.get((device_id, update_id))
        if entry is None:
            return None
        data, expires = entry
        if self._hub.clock() >= expires:
            del blobs[device_id, update_id]
            return None
        if digest is not None:
            digest.update(data)
        return data

    async def delete_blobs(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Remove claim-check payloads given as (device id, update id); missing ones are fine."""
        await _checkpoint()
        stored = self._hub.peek(self.job).blobs
        for device_id, update_id in blobs:
            stored.pop((device_id, update_id), None)

    # -- evaluation and counters -------------------------------------------------------

    async def record_eval(self, version: int, metrics: Mapping[str, float]) -> None:
        """Write evaluation metrics into a version's meta and remember the latest evaluated."""
        await _checkpoint()
        state = self._hub.peek(self.job)
        raw = state.metas.get(version)
        if raw is None:
            raise LookupError(f"job {self.job} has no version {version}")
        meta = VersionMeta.model_validate_json(raw)
        # model_copy does not validate: round-trip so bad metrics raise here.
        updated = VersionMeta.model_validate(
            meta.model_copy(update={"eval": dict(metrics)}).model_dump()
        )
        assert updated.eval is not None  # just set from `metrics`
        state.metas[version] = updated.model_dump_json()
        # Same version counts as newer: a re-evaluation keeps both places in step.
        if state.latest_eval is None or version >= state.latest_eval[0]:
            state.latest_eval = (version, dict(updated.eval))

    async def latest_eval(self) -> tuple[int, dict[str, float]] | None:
        """Return (version, metrics) of the newest evaluated version, if any."""
        await _checkpoint()
        latest = self._hub.peek(self.job).latest_eval
        return None if latest is None else (latest[0], dict(latest[1]))

    async def count_rejection(self, reason: str) -> None:
        """Add one to the counter of updates rejected for `reason`."""
        await _checkpoint()
        self._hub.state(self.job).rejections[reason] += 1

    async def rejection_counts(self) -> dict[str, int]:
        """Return the rejection counters by reason."""
        await _checkpoint()
        return dict(self._hub.peek(self.job).rejections)

    async def claim_device_index(self, device_id: str) -> int:
        """Give each distinct device id a stable index 0, 1, 2, ... (first come first served)."""
        await _checkpoint()
        devices = self._hub.state(self.job).devices
        return devices.setdefault(device_id, len(devices))

    # -- device registry ---------------------------------------------------------------

    async def register_device(
        self, device_id: str, public_key: str, *, replace: bool = False
    ) -> None:
        """Register a device's base64 Ed25519 public key (and lift any revocation)."""
        await _checkpoint()
        state = self._hub.state(self.job)
        current = state.device_keys.get(device_id)
        revoked = device_id in state.revoked_devices
        if current is not None and not replace and (current != public_key or revoked):
            raise DeviceExists(f"device {device_id} of job {self.job} has another or revoked key")
        state.device_keys[device_id] = public_key
        state.revoked_devices.discard(device_id)

    async def device_key(self, device_id: str) -> str | None:
        """Return the device's public key, or None if it is unknown or revoked."""
        await _checkpoint()
        state = self._hub.peek(self.job)
        if device_id in state.revoked_devices:
            return None
        return state.device_keys.get(device_id)

    async def revoke_device(self, device_id: str) -> bool:
        """Stop the device's key from authenticating updates; False if it is not registered."""
        await _checkpoint()
        state = self._hub.peek(self.job)
        if device_id not in state.device_keys:
            return False
        self._hub.state(self.job).revoked_devices.add(device_id)
        return True

    async def list_devices(self) -> list[DeviceRecord]:
        """Return every registered device, revoked ones included, sorted by id."""
        await _checkpoint()
        state = self._hub.peek(self.job)
        return [
            DeviceRecord(device, key, device in state.revoked_devices)
            for device, key in sorted(state.device_keys.items())
        ]
