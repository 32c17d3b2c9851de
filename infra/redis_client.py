"""Build a Redis client from a fedq Redis URL: plain `redis://`/`rediss://`, or Sentinel.

Sentinel URL form (documented in docs/operations.md):

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]
        [?sentinel_password=...&sentinel_username=...]

The hosts are Sentinels (port 26379 unless given); `master-name` is the monitored master
set; `db` defaults to 0. The userinfo password is the master's (the data nodes'); the
Sentinels' own password, where they require one, goes in `sentinel_password`. The client
asks a Sentinel for the current master on every new connection, so after a failover it
reconnects to the promoted replica by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
_QUERY_KEYS = frozenset({"sentinel_password", "sentinel_username"})


class InvalidRedisUrl(ValueError):
    """A Redis URL fedq cannot use, with what is wrong with it."""


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names Redis through Sentinel."""
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Split a `redis+sentinel://` URL into its parts; InvalidRedisUrl says what is off."""
    form = "redis+sentinel://[user:password@]host:26379[,host:26379]/master-name[/db]"
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise InvalidRedisUrl(f"not a Sentinel URL (expected {form}): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(host, url) for host in hostlist.split(","))
    path = [segment for segment in parts.path.split("/") if segment]
    if not 1 <= len(path) <= 2:
        raise InvalidRedisUrl(f"a Sentinel URL needs /master-name[/db] (expected {form}): {url!r}")
    if len(path) == 2 and not path[1].isdigit():
        raise InvalidRedisUrl(f"the database in a Sentinel URL must be a number: {url!r}")
    try:
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidRedisUrl(f"bad options {parts.query!r} in {url!r}") from None
    unknown = set(query) - _QUERY_KEYS
    if unknown:
        raise InvalidRedisUrl(f"unknown Sentinel URL options {sorted(unknown)}: {url!r}")
    return SentinelUrl(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=query.get("sentinel_username", [None])[-1],
        sentinel_password=query.get("sentinel_password", [None])[-1],
    )


def _host_port(text: str, url: str) -> tuple[str, int]:
    # host[:port]; IPv6 literals are not supported here (use a name).
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, str(DEFAULT_SENTINEL_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise InvalidRedisUrl(f"bad Sentinel host {text!r} in {url!r}")
    return host, int(port)


class _SentinelRedis(aioredis.Redis):
    """A master client that also closes the Sentinel connections it was discovered through."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master connections, then the Sentinel clients behind the pool."""
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        await super().aclose(close_connection_pool)
        if isinstance(manager, Sentinel):
            await manager.aclose()


def redis_client(url: str, *, wait_for_pool: bool = False, **options: Any) -> aioredis.Redis:
    """Return a client for `url` with these connection options (timeouts, retries, ...).

    With `wait_for_pool`, a command finding every pooled connection busy waits for one (up to
    the socket timeout) instead of failing at once with MaxConnectionsError (plain URLs only:
    redis-py has no waiting Sentinel pool).
    """
    if not is_sentinel_url(url):
        if not wait_for_pool:
            return aioredis.Redis.from_url(url, **options)
        # 100: the size of redis-py's own default pool, which fails past it instead.
        options.setdefault("max_connections", 100)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, timeout=options.get("socket_timeout"), **options
        )
        return aioredis.Redis.from_pool(pool)
    target = parse_sentinel_url(url)
    # Sentinels answer small queries: the short connect timeout, not the big-model one.
    timeout = options.get("socket_connect_timeout", 10.0)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    if target.sentinel_username is not None:
        sentinel_options["username"] = target.sentinel_username
    # Older redis-py releases leave Sentinel's constructor unannotated; 8.2 annotates it.
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=sentinel_options
    )
    client: aioredis.Redis = sentinel.master_for(
        target.master,
        redis_class=_SentinelRedis,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return client
