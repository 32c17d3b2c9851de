"""Builders shared by the integration tests: a tiny job, a drain, updates good and bad."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch

from aggregator.service import Aggregator
from infra.amqp_broker import AmqpBroker
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from infra.protocols import Broker, ModelStore
from infra.redis_store import RedisModelStore
from schemas import JobConfig, StrategyConfig, UpdateHeader, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from schemas.digests import blake3_hex
from schemas.wire import UPDATE_HEADER, update_fields
from tests.conftest import AMQP_URL, REDIS_URL

INITIAL = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.5])}


@dataclass
class Backends:
    """A broker and a store holding one fresh job."""

    broker: Broker
    store: ModelStore
    config: JobConfig


@asynccontextmanager
async def job_backends(
    kind: str, job: str, strategy: StrategyConfig, **config_options: Any
) -> AsyncIterator[Backends]:
    """Create a job with the tiny INITIAL model on memory or real backends; delete it after.

    `config_options` are further JobConfig fields (e.g. require_signatures=True).
    """
    if kind == "real":
        broker: Broker = await AmqpBroker.connect(AMQP_URL)
        store: ModelStore = RedisModelStore.from_url(REDIS_URL, job)
    else:
        broker = MemoryBroker()
        store = MemoryModelStore(MemoryStoreHub(), job)
    config = JobConfig(
        job=job,
        task="tiny",
        strategy=strategy,
        model_schema=schema_of(INITIAL),
        inline_limit_bytes=64,
        created_at=time.time(),
        **config_options,
    )
    model = encode(INITIAL)
    meta = VersionMeta(
        version=0, created_at=time.time(), sha256=sha256_hex(model), model_bytes=len(model)
    )
    await broker.declare_job(job)
    await store.create_job(config, model, meta)
    try:
        yield Backends(broker=broker, store=store, config=config)
    finally:
        await store.delete_job()
        await broker.delete_job(job)
        await store.close()
        await broker.close()


@asynccontextmanager
async def redis_tiny_job(job: str, strategy: StrategyConfig) -> AsyncIterator[RedisModelStore]:
    """Create a job with the tiny INITIAL model in the real Redis alone; delete it after.

    For tests that bring their own broker (a private RabbitMQ node, force-closed connections).
    """
    store = RedisModelStore.from_url(REDIS_URL, job)
    model = encode(INITIAL)
    config = JobConfig(
        job=job, task="tiny", strategy=strategy, model_schema=schema_of(INITIAL), created_at=0.0
    )
    meta = VersionMeta(version=0, created_at=0.0, sha256=sha256_hex(model), model_bytes=len(model))
    await store.create_job(config, model, meta)
    try:
        yield store
    finally:
        await store.delete_job()
        await store.close()


async def drain(backends: Backends, idle: float = 1.0, **options: Any) -> Aggregator:
    """Run an aggregator on the job until its queue has been idle for `idle` seconds;
    `options` are further Aggregator arguments (e.g. sink=...)."""
    async with Aggregator(
        job=backends.config.job,
        broker=backends.broker,
        store=backends.store,
        idle_timeout=idle,
        retry_seconds=0.1,
        **options,
    ) as aggregator:
        await aggregator.run()
    return aggregator


def update(
    job: str,
    tensors: dict[str, torch.Tensor],
    /,
    *,
    base_version: int = 0,
    num_samples: int = 10,
    device_id: str = "dev-0",
    as_fields: bool = False,
    **overrides: Any,
) -> tuple[dict[str, Any], bytes, str]:
    """Return (headers, body, update_id) of a well-formed inline update; overrides win.

    The headers are what agents send, one `fedq-update` document; with `as_fields`, a header
    per field, the form recordings and older agents carry (and the one to put junk in).
    """
    body = encode(tensors)
    header = UpdateHeader(
        job=job,
        update_id=str(uuid.uuid4()),
        device_id=device_id,
        base_version=base_version,
        num_samples=num_samples,
        payload_blake3=blake3_hex(body),
        payload_bytes=len(body),
        sent_at=time.time(),
    )
    fields = header.model_dump(mode="json", exclude_none=True)
    fields.update(overrides)
    headers = fields if as_fields else {UPDATE_HEADER: json.dumps(fields)}
    return headers, body, header.update_id


def edit_fields(
    headers: Mapping[str, Any], *, drop: tuple[str, ...] = (), **changes: Any
) -> dict[str, Any]:
    """Change (or `drop`) update fields in headers of either form, keeping the form."""
    fields = {k: v for k, v in {**update_fields(headers), **changes}.items() if k not in drop}
    return {**headers, UPDATE_HEADER: json.dumps(fields)} if UPDATE_HEADER in headers else fields


def delta(w: float, b: float = 0.0) -> dict[str, torch.Tensor]:
    """A delta adding `w` to every weight and `b` to the bias."""
    return {"w": torch.full((4,), w), "b": torch.tensor([b])}
