"""Process lifecycle helpers shared by the service entrypoints."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None], *, enabled: bool = True) -> Iterator[None]:
    """Call `stop` on SIGTERM or SIGINT while inside the block (a graceful drain, not a kill)."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop)
    try:
        yield
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
