"""Container entrypoint: `python -m aggregator`, configured by FEDQ_* environment variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from aggregator.runner import serve
from aggregator.service import Fenced
from infra.logs import configure_logging
from infra.settings import AggregatorSettings


def main() -> int:
    """Run the aggregator until SIGTERM; exit 3 when fenced by another aggregator."""
    settings = AggregatorSettings()  # FEDQ_JOB is required: pydantic-settings reads it
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except Fenced as exc:
        logging.getLogger("aggregator").error("fenced: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
