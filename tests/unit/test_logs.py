"""Log setup: JSON lines with per-update context, isolated between concurrent tasks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from fedq.cli import app
from infra.logs import JsonFormatter, bind, log_context, parse_log_format

pytestmark = pytest.mark.unit


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_outside_any_update_has_only_the_standard_fields(captured: io.StringIO) -> None:
    # Act
    logging.getLogger("fedq.x").warning("hello %s", "there")
    # Assert
    [line] = _lines(captured)
    assert set(line) == {"time", "level", "logger", "message"}
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "fedq.x", "hello there")


def test_update_fields_are_all_present_and_extras_and_exceptions_kept(
    captured: io.StringIO,
) -> None:
    # Act
    with log_context(job="j", version=3):
        bind(update_id="u-1")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("a").exception("failed", extra={"reason": "non_finite"})
    logging.getLogger("a").info("after")
    # Assert: unknown fields are null, not missing; the block's fields end with it
    inside, after = _lines(captured)
    assert (inside["job"], inside["version"], inside["update_id"]) == ("j", 3, "u-1")
    assert inside["device_id"] is None
    assert inside["reason"] == "non_finite"
    assert "ValueError: boom" in str(inside["exception"])
    assert "job" not in after


def test_concurrent_tasks_keep_their_own_fields(captured: io.StringIO) -> None:
    async def device(name: str) -> None:
        with log_context(job="j", device_id=name):
            await asyncio.sleep(0.01)
            bind(update_id=f"{name}-u")
            await asyncio.sleep(0.01)
            logging.getLogger("agent").info("sent")

    async def both() -> None:
        await asyncio.gather(device("a"), device("b"))

    # Act
    asyncio.run(both())
    # Assert
    lines = _lines(captured)
    assert sorted((line["device_id"], line["update_id"]) for line in lines) == [
        ("a", "a-u"),
        ("b", "b-u"),
    ]


def test_an_unknown_log_format_is_a_clear_error() -> None:
    # Act
    result = CliRunner().invoke(app, ["aggregator", "--job", "j", "--log-format", "xml"])
    # Assert
    assert result.exit_code == 2
    assert "unknown log format 'xml'; choose from text, json" in result.output
    assert parse_log_format(" JSON ") == "json"
