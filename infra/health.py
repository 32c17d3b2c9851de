"""A tiny HTTP endpoint for probes and Prometheus: /healthz, /readyz and /metrics.

`asyncio.start_server` with just enough HTTP/1.1 for kubelet, Docker healthchecks and a
Prometheus scrape: GET only, one request per connection (`Connection: close`). It runs on
the service's own event loop, so /healthz answering also shows that the loop is not stuck.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from types import TracebackType

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from infra.errors import AccessDenied, BackendUnavailable, JobNotFound
from infra.protocols import Broker, ModelStore
from infra.settings import ConnectionSettings

log = logging.getLogger(__name__)

# Returns what keeps the service from being ready; an empty list means ready.
ReadinessCheck = Callable[[], Awaitable[list[str]]]
_REQUEST_TIMEOUT = 5.0
_MAX_HEADER_LINES = 100
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def backend_problems(
    *, store: ModelStore, broker: Broker | None = None, timeout: float = 2.0
) -> list[str]:
    """Check that the broker is connected and the store answers for the job; list failures."""
    problems = []
    if broker is not None and not broker.is_connected():
        problems.append("broker: not connected")
    try:
        # A cheap round trip that also proves the job is there; bounded, so a hung Redis
        # makes the probe fail rather than hang.
        async with asyncio.timeout(timeout):
            await store.current_version()
    except (AccessDenied, BackendUnavailable, JobNotFound, TimeoutError) as exc:
        problems.append(f"store: {type(exc).__name__}: {exc}")
    return problems


def health_server(
    settings: ConnectionSettings, registry: CollectorRegistry, readiness: ReadinessCheck
) -> AbstractAsyncContextManager[object]:
    """Serve health and metrics while open if `settings.metrics_port` is set, else nothing."""
    if settings.metrics_port is None:
        return nullcontext()
    # CPU, memory and open files of this process, next to the service's own metrics.
    ProcessCollector(registry=registry)
    return HealthServer(
        registry=registry,
        readiness=readiness,
        port=settings.metrics_port,
        host=settings.metrics_host,
    )


class HealthServer:
    """Serve /healthz, /readyz and /metrics while the context is open.

    Port 0 picks a free port; `port` tells which one after entering.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        readiness: ReadinessCheck,
        port: int,
        host: str = "0.0.0.0",
        readiness_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.port = port
        self._readiness = readiness
        self._host = host
        self._readiness_timeout = readiness_timeout
        self._server: asyncio.Server | None = None
        # For alerting: Prometheus scrapes /metrics, not /readyz, so readiness is a gauge too.
        self._ready = Gauge(
            "fedq_ready",
            "1 when /readyz answers 200, 0 when not; checked at each scrape of /metrics.",
            registry=registry,
        )

    async def __aenter__(self) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, self._host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d/", self._host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                method, path = await _read_request(reader)
                status, content_type, body = await self._respond(method, path)
            writer.write(_response(status, content_type, body, with_body=method == "GET"))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            # A probe that hangs up or sends garbage is the client's problem, not the service's.
            log.debug("health request dropped: %s", exc)
        finally:
            writer.close()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        route = path.split("?", 1)[0]
        if route == "/healthz":
            return 200, "text/plain", b"ok\n"
        if route == "/readyz":
            problems = await self._problems()
            if problems:
                return 503, "text/plain", ("\n".join(problems) + "\n").encode()
            return 200, "text/plain", b"ready\n"
        if route == "/metrics":
            self._ready.set(0 if await self._problems() else 1)
            # Rendering touches every collector: off the loop, like any other slow work.
            body = await asyncio.to_thread(generate_latest, self.registry)
            # The classic text format: every Prometheus version parses it, no negotiation needed.
            return 200, CONTENT_TYPE_PLAIN_0_0_4, body
        return 404, "text/plain", b"not found\n"

    async def _problems(self) -> list[str]:
        try:
            async with asyncio.timeout(self._readiness_timeout):
                return await self._readiness()
        except TimeoutError:
            return [f"readiness check took over {self._readiness_timeout} s"]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and skip the headers; bodies are never expected."""
    request_line = (await reader.readline()).decode("latin-1").split()
    if len(request_line) != 3:
        raise ValueError(f"bad request line {request_line!r}")
    for _ in range(_MAX_HEADER_LINES):
        if (await reader.readline()).strip() == b"":
            break
    else:
        raise ValueError("too many header lines")
    return request_line[0], request_line[1]


def _response(status: int, content_type: str, body: bytes, *, with_body: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (body if with_body else b"")
