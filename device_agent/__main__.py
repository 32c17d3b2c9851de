"""Container entrypoint: `python -m device_agent`; FEDQ_ROLE picks `agent` or `evaluator`."""

from __future__ import annotations

import asyncio
import sys

import torch

from device_agent.runner import serve_agent, serve_evaluator
from infra.logs import configure_logging
from infra.settings import AgentSettings


def main() -> int:
    """Run one training device (FEDQ_ROLE=agent) or the evaluator until SIGTERM."""
    settings = AgentSettings()  # FEDQ_JOB is required: pydantic-settings reads it
    configure_logging(settings.log_level, settings.log_format)
    # One agent per container: a single intra-op thread keeps replicas from oversubscribing.
    torch.set_num_threads(1)
    serve = serve_evaluator if settings.role == "evaluator" else serve_agent
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
