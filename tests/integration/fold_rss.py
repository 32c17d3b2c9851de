"""Peak RSS of an aggregator folding a stream of claim-checked updates of S bytes each.

    python tests/integration/fold_rss.py --mb 200 --buffer 2 --updates 4

This process creates a FedBuff job (buffer K) whose model is S bytes of float32 and publishes
the updates through the agent's own sender (claim-check blobs); a child process then runs an
Aggregator until the queue is drained and reports its RSS after imports and connections
(`base`) and its peak (VmHWM). One JSON line comes out; every key and queue is removed.
It uses only APIs older than itself, so it measures any checkout put on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TENSORS = 2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _publish(job: str, size: int, buffer: int, updates: int) -> None:
    import torch

    from device_agent.sender import build_update, send_update
    from infra.amqp_broker import AmqpBroker
    from infra.redis_store import RedisModelStore
    from schemas import JobConfig, StrategyConfig, VersionMeta
    from schemas.codec import encode, schema_of, sha256_hex

    model = {f"w{i}": torch.zeros(size // 4 // TENSORS) for i in range(TENSORS)}
    config = JobConfig(
        job=job,
        task="synthetic",
        strategy=StrategyConfig(buffer_size=buffer, max_staleness=updates),
        model_schema=schema_of(model),
        keep_versions=2,
        created_at=time.time(),
    )
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, job)
    model_bytes = encode(model)
    meta = VersionMeta(
        version=0, created_at=time.time(), sha256=sha256_hex(model_bytes), model_bytes=size
    )
    await broker.declare_job(job)
    await store.create_job(config, model_bytes, meta)
    del model_bytes
    delta = {name: torch.full_like(t, 0.01) for name, t in model.items()}
    for i in range(updates):
        header, payload = build_update(
            config,
            device_id=f"dev-{i}",
            base_version=0,
            num_samples=10,
            delta=delta,
            train_metrics={},
        )
        await send_update(broker, store, config, header, payload)
    await store.close()
    await broker.close()


async def _aggregate(job: str) -> dict[str, int]:
    from aggregator.service import Aggregator
    from infra.amqp_broker import AmqpBroker
    from infra.redis_store import RedisModelStore

    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, job)
    base = _status_kib("VmRSS")
    async with Aggregator(job=job, broker=broker, store=store, idle_timeout=3.0) as aggregator:
        stats = await aggregator.run()
    await store.close()
    await broker.close()
    return {"base_kib": base, "peak_kib": _status_kib("VmHWM"), "versions": stats.versions}


async def _delete(job: str) -> None:
    from infra.amqp_broker import AmqpBroker
    from infra.redis_store import RedisModelStore

    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, job)
    await store.delete_job()
    await broker.delete_job(job)
    await store.close()
    await broker.close()


def measure(mb: int, buffer: int, updates: int, timeout: float = 300.0) -> dict[str, int]:
    """Publish `updates` of `mb` MB, fold them in a child process, return its RSS figures."""
    job = f"t-fold-rss-{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_publish(job, mb * 10**6, buffer, updates))
        child = subprocess.run(
            [sys.executable, __file__, "--child", job],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        result: dict[str, int] = json.loads(child.stdout.strip().splitlines()[-1])
        return {"size_bytes": mb * 10**6, "buffer": buffer, "updates": updates, **result}
    finally:
        asyncio.run(_delete(job))


def main() -> None:
    """Run from the command line: print the figures of one measurement as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--buffer", type=int, default=2)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--child", metavar="JOB")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_aggregate(args.child))))
        return
    print(json.dumps(measure(args.mb, args.buffer, args.updates)))


if __name__ == "__main__":
    main()
