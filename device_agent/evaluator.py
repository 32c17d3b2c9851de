"""The evaluator role: score every new global version on the held-out split, record it."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from device_agent.tasks import get_task
from device_agent.training import evaluate
from infra.protocols import ModelStore
from infra.retry import retry_unavailable
from schemas.codec import decode

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluate versions in order as they are committed, writing metrics into their meta."""

    def __init__(
        self, *, store: ModelStore, max_versions: int | None = None, poll_seconds: float = 2.0
    ) -> None:
        self.store = store
        self.max_versions = max_versions
        self.poll_seconds = poll_seconds
        self.evaluated = 0
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End the loop after the evaluation in hand."""
        self._stopping.set()

    async def run(self) -> int:
        """Evaluate each new version until stopped or `max_versions` are done."""
        config = await retry_unavailable(self.store.get_config)
        task = get_task(config.task)
        data = await asyncio.to_thread(task.load_data, config.training.seed)
        model = task.build_model(config.training.seed)
        done = -1
        while not self._stopping.is_set():
            if self.max_versions is not None and self.evaluated >= self.max_versions:
                break
            current = await retry_unavailable(
                partial(self.store.wait_for_version, done, self.poll_seconds)
            )
            # Evaluate in order; a version already pruned from the store is skipped.
            for version in range(done + 1, current + 1):
                model_bytes = await retry_unavailable(partial(self.store.get_model, version))
                if model_bytes is None:
                    continue
                model.load_state_dict(await asyncio.to_thread(decode, model_bytes))
                metrics = await asyncio.to_thread(evaluate, model, data.x_test, data.y_test)
                await retry_unavailable(partial(self.store.record_eval, version, metrics))
                self.evaluated += 1
                log.info(
                    "version %d of job %s: accuracy %.4f loss %.4f",
                    version,
                    config.job,
                    metrics["accuracy"],
                    metrics["loss"],
                    extra={"job": config.job, "version": version},
                )
            done = max(done, current)
        return self.evaluated
