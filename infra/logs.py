"""Log setup for the entrypoints (text or one JSON object per line) and per-update context.

The fields that say which update a line is about (`job`, `version`, `update_id`,
`device_id`) live in a context variable rather than in each call's `extra=`: the
aggregator sets them once per delivery and every line logged while handling it carries
them, including lines from modules that never see the update (retries, acks, the store).
asyncio copies the context into each task and `to_thread` call, so concurrent agents in
one process (`fedq simulate`) keep their own fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields every line about one update carries (None when not known yet).
UPDATE_FIELDS = ("job", "version", "update_id", "device_id")

# Never mutated in place: each change sets a new mapping, so a reset restores the old one.
_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "fedq_log_context", default=MappingProxyType({})
)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every line logged in this block (and tasks started from it)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add or change fields for the rest of the enclosing `log_context` block."""
    _context.set({**_context.get(), **fields})


def current_context() -> dict[str, Any]:
    """Return the fields the next line logged here would carry."""
    return dict(_context.get())


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single line of JSON."""
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get()
        if any(name in context for name in UPDATE_FIELDS):
            entry.update({name: None for name in UPDATE_FIELDS})
        entry.update(context)
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd object in `extra=` must not cost the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def parse_log_format(value: str) -> LogFormat:
    """Return `value` as a log format, or raise ValueError naming the choices."""
    lowered = value.strip().lower()
    for name in LOG_FORMATS:
        if lowered == name:
            return name
    raise ValueError(f"unknown log format {value!r}; choose from {', '.join(LOG_FORMATS)}")


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log line to stderr (or `stream`) as readable text or JSON, at `level`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if parse_log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # Not force=True: where logging is set up already (pytest's capture, an embedding
    # program), that setup wins, as with plain basicConfig.
    logging.basicConfig(level=level.upper(), handlers=[handler])
