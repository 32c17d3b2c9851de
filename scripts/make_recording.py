"""Make the recording the tests replay: a tiny real digits-mlp federation, recorded.

Runs on the local RabbitMQ and Redis: one job (FedBuff, K=2) with its log stream, a
drain-mode aggregator and three device agents that really train (one of them 3x slower, so
some updates arrive stale), then records the stream into tests/fixtures/ and deletes the job.

    python scripts/make_recording.py [--out tests/fixtures/digits-fedbuff.fedqlog]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from pathlib import Path

from aggregator.service import Aggregator
from device_agent.agent import DeviceAgent
from fedq.jobs import initial_job
from fedq.replay import record_job
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from infra.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from schemas import StalenessConfig, StrategyConfig, TrainingConfig

STRATEGY = StrategyConfig(
    name="fedbuff", buffer_size=2, max_staleness=8, staleness=StalenessConfig(name="sqrt")
)
TRAINING = TrainingConfig(local_epochs=1, batch_size=32, num_devices=3, seed=7)
SLOWDOWNS = (1.0, 1.0, 3.0)
UPDATES_PER_DEVICE = 3


async def make(out: Path, amqp_url: str, redis_url: str) -> None:
    """Run the federation, record it to `out`, and delete the job."""
    job = f"recording-{uuid.uuid4().hex[:8]}"
    config, model, meta = initial_job(job, "digits-mlp", STRATEGY, TRAINING)
    broker = await AmqpBroker.connect(amqp_url)
    store = RedisModelStore.from_url(redis_url, job)
    try:
        await broker.declare_job(job, log_stream=True)
        await store.create_job(config, model, meta)
        # The agents share this broker, so one channel publishes in one order: the order the
        # update queue and the log stream both see, which is what makes a replay faithful.
        async with Aggregator(job=job, broker=broker, store=store) as aggregator:
            folding = asyncio.create_task(aggregator.run())
            sent = await asyncio.gather(
                *(_agent(broker, redis_url, job, i) for i in range(len(SLOWDOWNS)))
            )
            while aggregator.stats.received < sum(sent):  # noqa: ASYNC110 - a one-off script
                await asyncio.sleep(0.05)
            aggregator.stop()
            await folding
        summary = await record_job(broker, store, out, idle_timeout=1.0)
        print(f"{out}: {summary.updates} updates, {summary.versions} versions, {summary.bytes} B")
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


async def _agent(broker: AmqpBroker, redis_url: str, job: str, index: int) -> int:
    store = RedisModelStore.from_url(redis_url, job)
    try:
        async with DeviceAgent(
            device_id=f"dev-{index}",
            broker=broker,
            store=store,
            updates=UPDATES_PER_DEVICE,
            device_index=index,
            slowdown=SLOWDOWNS[index],
        ) as agent:
            return await agent.run()
    finally:
        await store.close()


def main() -> None:
    """Parse the arguments and make the recording."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/digits-fedbuff.fedqlog"))
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(make(args.out, args.amqp_url, args.redis_url))


if __name__ == "__main__":
    main()
