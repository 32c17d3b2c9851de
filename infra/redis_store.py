"""The Redis `ModelStore`: one job's versions, applied ids, blobs and evaluations.

Key names come from `infra.keys.JobKeys`; every multi-key change is one Lua script or a
WATCH/MULTI transaction, so a crash leaves the job at version v or v+1, never in between.
Redis errors that mean "cannot reach the server" leave this module as BackendUnavailable.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, NoScriptError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.errors import (
    AccessDenied,
    BackendUnavailable,
    DeviceExists,
    JobExists,
    JobNotFound,
    VersionConflict,
)
from infra.keys import JobKeys
from infra.protocols import DeviceRecord, DeviceTally, tallies_from_fields
from infra.redis_client import redis_client
from infra.redis_values import ValueIO
from infra.stream_follower import START, Mark, StreamFollower, StreamId
from schemas import JobConfig, VersionMeta
from schemas.digests import RunningHash
from schemas.safetensors_format import ByteBuffer

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

STREAM_MAXLEN = 10_000
# A crashed committer's temporary model key disappears by itself after this long.
TEMP_MODEL_TTL_SECONDS = 3600
# Models up to this size are written in the commit script's own round trip (`commit`).
INLINE_MODEL_BYTES = 1 * 2**20
# Reads of (version, model) that may each lose a race with pruning before one succeeds.
LATEST_ATTEMPTS = 20
# The longest single XREAD BLOCK when the client has no socket timeout to stay under.
MAX_BLOCK_SECONDS = 10.0
SCAN_BATCH = 500

# KEYS: config, version, model:0, meta:0, versions stream, temporary model
# ARGV: config json, meta json, sha256, created_at, stream maxlen, token
# Returns 1 created, 2 already created by this same call (a client retry), 0 job exists,
# -2 the temporary model expired before the script ran.
# Whether the newest entry of a versions stream was written by the call holding `token`:
# a client retry after a lost reply must see its own success, not a conflict.
_LAST_ENTRY_HAS_TOKEN_LUA = """
local function last_entry_has_token(stream, token)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not last then return false end
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'token' and fields[i + 1] == token then return true end
  end
  return false
end
"""

_CREATE_LUA = (
    _LAST_ENTRY_HAS_TOKEN_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if last_entry_has_token(KEYS[5], ARGV[6]) then return 2 end
  redis.call('DEL', KEYS[6])
  return 0
end
if redis.call('EXISTS', KEYS[6]) == 0 then return -2 end
redis.call('RENAME', KEYS[6], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '0')
redis.call('SET', KEYS[4], ARGV[2])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
  'version', '0', 'sha256', ARGV[3], 'created_at', ARGV[4], 'token', ARGV[6])
return 1
"""
)

# KEYS: version, temporary model, model:{v+1}, applied, meta:{v+1}, versions stream,
#       device tallies, [model:{v+1-versions_kept}]
# ARGV: expected, new version, meta json, sha256, created_at, token, stream maxlen,
#       contributor ids...
# The model waits at the temporary key: as an argument, its bytes would cost Redis a copy
# into a Lua string (115 us of Redis CPU per call at 100 KB against 1 for a SET).
# Returns 1 committed, 2 already committed by this same call (a client retry), 0 conflict,
# -1 no such job, -2 the temporary model expired before the script ran.
_COMMIT_LUA = (
    _LAST_ENTRY_HAS_TOKEN_LUA
    + """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('DEL', KEYS[2])
  return -1
end
if current ~= ARGV[1] then
  -- A retried call writes its temporary model again: nothing renames that copy.
  redis.call('DEL', KEYS[2])
  if current == ARGV[2] and last_entry_has_token(KEYS[6], ARGV[6]) then return 2 end
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('SET', KEYS[1], ARGV[2])
-- unpack() is bounded by the Lua C stack, so add contributors in chunks.
for i = 8, #ARGV, 1000 do
  redis.call('SADD', KEYS[4], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SET', KEYS[5], ARGV[3])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*',
  'version', ARGV[2], 'sha256', ARGV[4], 'created_at', ARGV[5], 'token', ARGV[6])
-- Per-device tallies for `fedq status`: O(contributors), like the SADD above, and it
-- spares status a scan of every meta:{v}.
local meta = cjson.decode(ARGV[3])
local devices = type(meta.devices) == 'table' and meta.devices or {}
local stalenesses = type(meta.staleness) == 'table' and meta.staleness or {}
for i, device in ipairs(devices) do
  local staleness = tonumber(stalenesses[i]) or 0
  redis.call('HINCRBY', KEYS[7], 'applied:' .. device, 1)
  redis.call('HINCRBY', KEYS[7], 'staleness_sum:' .. device, staleness)
  local most = tonumber(redis.call('HGET', KEYS[7], 'staleness_max:' .. device) or '-1')
  if staleness > most then redis.call('HSET', KEYS[7], 'staleness_max:' .. device, staleness) end
end
if KEYS[8] then redis.call('UNLINK', KEYS[8]) end
return 1
"""
)

# KEYS: devices hash; ARGV: device id. Returns the device's index, assigning the next one.
_CLAIM_DEVICE_LUA = """
local idx = redis.call('HGET', KEYS[1], ARGV[1])
if idx then return tonumber(idx) end
idx = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], idx)
return idx
"""


# KEYS: device keys hash, revoked set; ARGV: device id, public key, replace (1/0).
# Returns 1 registered (or already registered with this active key), 0 refused.
_REGISTER_DEVICE_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local revoked = redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
if current and ARGV[3] ~= '1' and (current ~= ARGV[2] or revoked) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: device keys hash, revoked set; ARGV: device id. Returns 1 revoked, 0 not registered.
_REVOKE_DEVICE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


def _unavailable_on_network_errors(
    fn: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn redis connection and timeout errors into BackendUnavailable, ACL refusals into
    AccessDenied (final: retrying a wrong password or a missing permission cannot help)."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except (AuthenticationError, NoPermissionError) as exc:
            raise AccessDenied(f"redis: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"redis: {exc}") from exc

    return wrapper


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisModelStore:
    """A `ModelStore` for one job, backed by Redis (binary responses, never decoded)."""

    def __init__(
        self,
        client: aioredis.Redis,
        job: str,
        *,
        owns_client: bool = False,
        values: ValueIO | None = None,
    ) -> None:
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("the Redis client must return bytes (decode_responses=False)")
        self.job = job
        self._client = client
        self._keys = JobKeys(job)
        self._owns_client = owns_client
        # Big values (models, blobs) go in chunks under deadlines sized to them: redis_values.
        self._values = values if values is not None else ValueIO(client)
        # The config never changes while the job exists: read once for every commit's pruning.
        self._versions_kept: int | None = None
        socket_timeout = kwargs.get("socket_timeout")
        # An XREAD BLOCK longer than the socket timeout would be cut off as a TimeoutError.
        self._max_block = (
            MAX_BLOCK_SECONDS
            if socket_timeout is None
            else min(MAX_BLOCK_SECONDS, float(socket_timeout) / 2)
        )
        self._create_script = client.register_script(_CREATE_LUA)
        self._commit_script = client.register_script(_COMMIT_LUA)
        self._claim_script = client.register_script(_CLAIM_DEVICE_LUA)
        self._register_device_script = client.register_script(_REGISTER_DEVICE_LUA)
        self._revoke_device_script = client.register_script(_REVOKE_DEVICE_LUA)
        self._follower = StreamFollower(self._read_versions_after)

    @classmethod
    def from_url(cls, url: str, job: str, *, timeout: float = 120.0) -> RedisModelStore:
        """Connect to `url` (redis://, rediss:// or redis+sentinel://) with big-model timeouts."""
        client = redis_client(
            url,
            # Many coroutines share one store (one process, many agents): past the pool's
            # size they queue for a connection rather than fail as if Redis were down.
            wait_for_pool=True,
            decode_responses=False,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 10.0),
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), retries=5),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        return cls(client, job, owns_client=True)

    async def close(self) -> None:
        """Close the client if this store created it (a passed-in client is the caller's)."""
        await self._follower.close()
        if self._owns_client:
            await self._client.aclose()

    # -- job lifecycle -----------------------------------------------------------------

    @_unavailable_on_network_errors
    async def create_job(self, config: JobConfig, model: ByteBuffer, meta: VersionMeta) -> None:
        """Store the config and version 0; raise JobExists if the job is already there."""
        if config.job != self.job:
            raise ValueError(f"config is for job {config.job!r}, this store is {self.job!r}")
        if meta.version != 0:
            raise ValueError(f"the first version must be 0, not {meta.version}")
        token = uuid.uuid4().hex
        temp = f"{self._keys.model(0)}:tmp:{token}"
        await self._values.write(temp, model, ex=TEMP_MODEL_TTL_SECONDS)
        keys = self._keys
        result = await self._create_script(
            keys=[
                keys.config,
                keys.version,
                keys.model(0),
                keys.meta(0),
                keys.versions_stream,
                temp,
            ],
            args=[
                config.model_dump_json(),
                meta.model_dump_json(),
                meta.sha256,
                repr(meta.created_at),
                STREAM_MAXLEN,
                token,
            ],
        )
        if result == 0:
            raise JobExists(self.job)
        if result == -2:
            raise BackendUnavailable("the temporary model key expired before create_job ran")

    @_unavailable_on_network_errors
    async def delete_job(self) -> None:
        """Remove every key of the job."""
        self._versions_kept = None
        batch: list[bytes | str] = []
        async for key in self._client.scan_iter(match=self._keys.pattern, count=1000):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                await self._client.unlink(*batch)
                batch = []
        if batch:
            await self._client.unlink(*batch)

    @_unavailable_on_network_errors
    async def get_config(self) -> JobConfig:
        """Return the job's config; raise JobNotFound if there is none."""
        raw = await self._client.get(self._keys.config)
        if raw is None:
            raise JobNotFound(self.job)
        return JobConfig.model_validate_json(raw)

    @_unavailable_on_network_errors
    async def current_version(self) -> int:
        """Return the latest committed version; raise JobNotFound if there is none."""
        raw = await self._client.get(self._keys.version)
        if raw is None:
            raise JobNotFound(self.job)
        return int(raw)

    # -- versions ----------------------------------------------------------------------

    @_unavailable_on_network_errors
    async def get_model(self, version: int) -> ByteBuffer | None:
        """Return a version's safetensors bytes, or None once it has been pruned."""
        # bytes, not str: __init__ refuses a client that decodes responses. A chunked
        # (big) model comes back as a bytearray the codec decodes in place.
        return await self._values.read(self._keys.model(version))

    @_unavailable_on_network_errors
    async def get_meta(self, version: int) -> VersionMeta | None:
        """Return a version's metadata, or None if the version was never committed."""
        raw = await self._client.get(self._keys.meta(version))
        return None if raw is None else VersionMeta.model_validate_json(raw)

    @_unavailable_on_network_errors
    async def latest(self) -> tuple[int, ByteBuffer]:
        """Return the latest version and its bytes, consistently, even while commits race."""
        for _ in range(LATEST_ATTEMPTS):
            version = await self.current_version()
            model = await self.get_model(version)
            # None means `versions_kept` commits landed between the two reads and pruned it.
            if model is not None:
                return version, model
        raise BackendUnavailable(f"no consistent latest model after {LATEST_ATTEMPTS} reads")

    @_unavailable_on_network_errors
    async def commit(self, expected_version: int, model: ByteBuffer, meta: VersionMeta) -> None:
        """Atomically move the job from `expected_version` to `meta.version` (= expected + 1).

        The script that checks the version also puts the bytes in place: a small model as
        one of its arguments, a bigger one from a unique temporary key written first and
        renamed; either way a loser never overwrites the winner's model.
        The script is idempotent per call: a client retry after a lost reply is recognised
        by its token in the versions stream instead of being reported as a conflict.
        """
        new_version = expected_version + 1
        if meta.version != new_version:
            raise ValueError(f"meta.version {meta.version} != expected_version + 1")
        if self._versions_kept is None:
            self._versions_kept = (await self.get_config()).versions_kept
        kept = self._versions_kept
        keys = self._keys
        token = uuid.uuid4().hex
        temp = f"{keys.model(new_version)}:tmp:{token}"
        # A small model is SET in the same pipeline as the script: one round trip, not two
        # (redis-py spends about 200 us of CPU on each). A big one would hold Redis for the
        # whole pipeline, so it goes first, chunked if need be.
        inline = len(model) <= min(INLINE_MODEL_BYTES, self._values.chunk_bytes)
        pruned = keys.model(new_version - kept) if new_version - kept >= 0 else None
        if not inline:
            if pruned is not None:
                # The version this commit prunes goes first, so that the new model is written
                # into the memory it frees: Redis holds `kept` models at most, not kept + 1,
                # and pages it already has are reused (fresh pages cost a fault each; 500 MB
                # committed in 0.5-0.9 s instead of 0.9-2.0 s). That version is past
                # max_staleness at the new head, which is the only one admitting updates
                # meanwhile; if the commit then fails, the next commit would prune it anyway.
                # kept >= 2 (keep_versions), so this is never the current version.
                await self._client.unlink(pruned)
            await self._values.write(temp, model, ex=TEMP_MODEL_TTL_SECONDS)
        script_keys = [
            keys.version,
            temp,
            keys.model(new_version),
            keys.applied,
            keys.meta(new_version),
            keys.versions_stream,
            keys.device_tallies,
        ]
        if pruned is not None:
            # Named in KEYS (not built inside Lua) so the script declares every key it touches.
            script_keys.append(pruned)
        args: list[str | int] = [
            expected_version,
            new_version,
            meta.model_dump_json(),
            meta.sha256,
            repr(meta.created_at),
            token,
            STREAM_MAXLEN,
            *meta.contributors,
        ]
        if inline:
            result = await self._set_and_commit(temp, model, script_keys, args)
        else:
            result = await self._commit_script(keys=script_keys, args=args)
        if result == 0:
            raise VersionConflict(f"job {self.job}: version is no longer {expected_version}")
        if result == -1:
            raise JobNotFound(self.job)
        if result == -2:
            raise BackendUnavailable("the temporary model key expired before commit ran")
        if result == 2:
            logger.info(
                "commit of %s v%d was retried and had already applied", self.job, new_version
            )

    async def _set_and_commit(
        self, temp: str, model: ByteBuffer, script_keys: list[str], args: list[str | int]
    ) -> Any:
        """SET the model at `temp` and run the commit script, in one round trip.

        Not through redis-py's Script in a pipeline: that asks SCRIPT EXISTS on every
        execute, a round trip more. EVALSHA alone, and the script loaded only if Redis has
        lost it (a restart, SCRIPT FLUSH).
        """
        script = self._commit_script
        for attempt in (1, 2):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(temp, model, ex=TEMP_MODEL_TTL_SECONDS)
                pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
                stored, result = await pipe.execute(raise_on_error=False)
            if isinstance(stored, Exception):
                raise stored
            if isinstance(result, NoScriptError) and attempt == 1:
                await self._client.script_load(script.script)
                continue
            if isinstance(result, Exception):
                raise result
            return result
        raise AssertionError("unreachable: the second attempt returns or raises")

    @_unavailable_on_network_errors
    async def wait_for_version(self, after: int, timeout: float) -> int:
        """Return the current version as soon as it exceeds `after`, or when `timeout` ends."""
        # One XREAD BLOCK per store, however many coroutines wait: stream_follower says why.
        if self._follower.following:
            # The read in flight returns any commit after the newest one it knows: no need to
            # look, which keeps a thousand waiters from costing two commands each.
            return await self._follower.wait_past(after, None, timeout)
        deadline = time.monotonic() + timeout
        # Read the stream's position before the version: a commit in between comes after it.
        seen = await self._last_stream_mark()
        current = await self.current_version()
        if current > after:
            return current
        newest = await self._follower.wait_past(after, seen, deadline - time.monotonic())
        return max(current, newest)

    async def _read_versions_after(self, last_id: StreamId) -> Mark | None:
        block_ms = int(self._max_block * 1000)
        reply = await self._client.xread(
            {self._keys.versions_stream: last_id}, count=100, block=block_ms
        )
        return _last_mark_in(reply)

    async def _last_stream_mark(self) -> Mark:
        entries = await self._client.xrevrange(self._keys.versions_stream, count=1)
        return (cast(bytes, entries[0][0]), _entry_version(entries[0])) if entries else START

    # -- applied ids -------------------------------------------------------------------

    @_unavailable_on_network_errors
    async def applied(self, update_ids: Sequence[str]) -> list[bool]:
        """Whether each update id is already part of a committed version."""
        if not update_ids:
            return []
        flags = await self._client.smismember(self._keys.applied, list(update_ids))
        return [bool(flag) for flag in flags]

    @_unavailable_on_network_errors
    async def applied_count(self) -> int:
        """Return how many update ids committed versions contain."""
        return int(await self._client.scard(self._keys.applied))

    @_unavailable_on_network_errors
    async def device_tallies(self) -> list[DeviceTally]:
        """Return each contributing device's applied updates and staleness, sorted by id."""
        raw = await self._client.hgetall(self._keys.device_tallies)
        return tallies_from_fields({_text(name): int(value) for name, value in raw.items()})

    @_unavailable_on_network_errors
    async def recent_versions(self, seconds: float) -> int:
        """Return how many versions (after 0) were committed in the last `seconds`."""
        # Stream ids are the Redis server's clock in ms: no skew with the committers' clocks.
        now_seconds, now_micros = await self._client.time()
        since_ms = int(now_seconds * 1000 + now_micros // 1000 - seconds * 1000)
        stream = self._keys.versions_stream
        first = await self._client.xrange(stream, min=f"{max(since_ms, 0)}-0", count=1)
        last = await self._client.xrevrange(stream, count=1)
        if not first or not last:
            return 0
        # Versions are gapless, so the window holds first..last: two reads, however many.
        oldest = max(_entry_version(first[0]), 1)
        return max(_entry_version(last[0]) - oldest + 1, 0)

    # -- claim-check blobs -------------------------------------------------------------

    @_unavailable_on_network_errors
    async def put_blob(
        self, device_id: str, update_id: str, data: ByteBuffer, ttl_seconds: int
    ) -> None:
        """Store a device's claim-check payload that expires after `ttl_seconds`."""
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1, not {ttl_seconds}")
        await self._values.write(self._keys.blob(device_id, update_id), data, ex=ttl_seconds)

    @_unavailable_on_network_errors
    async def get_blob(
        self,
        device_id: str,
        update_id: str,
        into: bytearray | None = None,
        digest: RunningHash | None = None,
    ) -> ByteBuffer | None:
        """Return a claim-check payload, or None once it expired or was deleted; a chunked
        one is read into `into` if its length is right, and hashed into `digest` as it
        comes (see ModelStore.get_blob)."""
        key = self._keys.blob(device_id, update_id)
        return await self._values.read(key, into, digest)

    @_unavailable_on_network_errors
    async def delete_blobs(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Remove claim-check payloads given as (device id, update id); missing ones are fine."""
        if blobs:
            await self._client.unlink(*(self._keys.blob(d, u) for d, u in blobs))

    # -- evaluation and counters -------------------------------------------------------

    @_unavailable_on_network_errors
    async def record_eval(self, version: int, metrics: Mapping[str, float]) -> None:
        """Write evaluation metrics into a version's meta and remember the latest evaluated."""
        meta_key, eval_key = self._keys.meta(version), self._keys.latest_eval
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta_key, eval_key)
                    raw_meta = await pipe.get(meta_key)
                    if raw_meta is None:
                        raise LookupError(f"job {self.job} has no version {version}")
                    meta = VersionMeta.model_validate_json(raw_meta)
                    # model_copy does not validate: round-trip so bad metrics raise here.
                    updated = VersionMeta.model_validate(
                        meta.model_copy(update={"eval": dict(metrics)}).model_dump()
                    )
                    raw_eval = await pipe.get(eval_key)
                    newest = None if raw_eval is None else int(json.loads(raw_eval)["version"])
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(meta_key, updated.model_dump_json())
                    # Same version counts as newer: a re-evaluation keeps both places in step.
                    if newest is None or version >= newest:
                        pipe.set(
                            eval_key, json.dumps({"version": version, "metrics": updated.eval})
                        )
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    @_unavailable_on_network_errors
    async def latest_eval(self) -> tuple[int, dict[str, float]] | None:
        """Return (version, metrics) of the newest evaluated version, if any."""
        raw = await self._client.get(self._keys.latest_eval)
        if raw is None:
            return None
        record = json.loads(raw)
        metrics = {str(name): float(value) for name, value in record["metrics"].items()}
        return int(record["version"]), metrics

    @_unavailable_on_network_errors
    async def count_rejection(self, reason: str) -> None:
        """Add one to the counter of updates rejected for `reason`."""
        await self._client.hincrby(self._keys.rejections, reason, 1)

    @_unavailable_on_network_errors
    async def rejection_counts(self) -> dict[str, int]:
        """Return the rejection counters by reason."""
        raw = await self._client.hgetall(self._keys.rejections)
        return {_text(reason): int(count) for reason, count in raw.items()}

    @_unavailable_on_network_errors
    async def claim_device_index(self, device_id: str) -> int:
        """Give each distinct device id a stable index 0, 1, 2, ... (first come first served)."""
        return int(await self._claim_script(keys=[self._keys.devices], args=[device_id]))

    # -- device registry ---------------------------------------------------------------

    @_unavailable_on_network_errors
    async def register_device(
        self, device_id: str, public_key: str, *, replace: bool = False
    ) -> None:
        """Register a device's base64 Ed25519 public key (and lift any revocation)."""
        registered = await self._register_device_script(
            keys=[self._keys.device_keys, self._keys.revoked_devices],
            args=[device_id, public_key, int(replace)],
        )
        if not registered:
            raise DeviceExists(f"device {device_id} of job {self.job} has another or revoked key")

    @_unavailable_on_network_errors
    async def device_key(self, device_id: str) -> str | None:
        """Return the device's public key, or None if it is unknown or revoked."""
        # One round trip, and MULTI so a revoke cannot land between the two reads.
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hget(self._keys.device_keys, device_id)
            pipe.sismember(self._keys.revoked_devices, device_id)
            key, revoked = await pipe.execute()
        return None if key is None or revoked else _text(key)

    @_unavailable_on_network_errors
    async def revoke_device(self, device_id: str) -> bool:
        """Stop the device's key from authenticating updates; False if it is not registered."""
        revoked = await self._revoke_device_script(
            keys=[self._keys.device_keys, self._keys.revoked_devices], args=[device_id]
        )
        return bool(revoked)

    @_unavailable_on_network_errors
    async def list_devices(self) -> list[DeviceRecord]:
        """Return every registered device, revoked ones included, sorted by id."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._keys.device_keys)
            pipe.smembers(self._keys.revoked_devices)
            keys, revoked = await pipe.execute()
        revoked_ids = {_text(device) for device in revoked}
        records = (
            DeviceRecord(_text(device), _text(key), _text(device) in revoked_ids)
            for device, key in keys.items()
        )
        return sorted(records, key=lambda record: record.device_id)


def _entry_version(entry: Any) -> int:
    """Return the `version` field of one versions-stream entry (id, fields)."""
    fields: dict[bytes, bytes] = entry[1]
    return int(fields[b"version"])


def _last_mark_in(reply: Any) -> Mark | None:
    """Return the id and version of the last entry in an XREAD reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return None
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if not entries:
        return None
    last_id: bytes | str = entries[-1][0]
    return last_id, _entry_version(entries[-1])
