"""Wait out a backend outage: retry an operation while RabbitMQ or Redis is unavailable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from infra.errors import BackendUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


async def retry_unavailable(
    operation: Callable[[], Awaitable[T]],
    *,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    give_up: asyncio.Event | None = None,
) -> T:
    """Run `operation`, retrying with exponential backoff while its backend is unavailable.

    Any other error propagates at once. With `give_up` set, the outage error propagates
    instead of another retry (a stopping service should not wait forever).
    """
    delay = first_delay
    while True:
        try:
            return await operation()
        except BackendUnavailable as exc:
            if give_up is not None and give_up.is_set():
                raise
            log.warning("backend unavailable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
