"""Partial updates on the real RabbitMQ and Redis: real agents send only some keys.

Two agents of a digits-mlp job train and send only the output layer (`--keys`); the
aggregator folds them by key and leaves the hidden layer exactly as it was. Bad partial
updates (an unknown key, no key at all, a wrong shape) and a payload in a dtype no model has
are dead-lettered with their reasons, and the model does not move.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save
from torch.testing import assert_close

from aggregator.service import Aggregator
from device_agent.agent import DeviceAgent
from fedq.jobs import create_job, initial_job
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import StrategyConfig, TrainingConfig
from schemas.codec import decode
from schemas.digests import blake3_hex
from schemas.messages import StalenessConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import INITIAL, delta, job_backends, update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HEAD = ["out.weight", "out.bias"]


async def _model(store: RedisModelStore, version: int) -> dict[str, torch.Tensor]:
    data = await store.get_model(version)
    assert data is not None
    return decode(data)


async def test_agents_sending_only_the_head_leave_the_backbone_untouched(job_id: str) -> None:
    # Arrange: FedBuff K=2 over two devices that train and send only the output layer
    strategy = StrategyConfig(buffer_size=2, staleness=StalenessConfig(name="constant"))
    training = TrainingConfig(local_epochs=1, num_devices=2)
    config, model_bytes, meta = initial_job(job_id, "digits-mlp", strategy, training)
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, job_id)
    try:
        await create_job(store, broker, config, model_bytes, meta, log_stream=False)
        for index in range(2):
            async with DeviceAgent(
                device_id=f"dev-{index}",
                broker=broker,
                store=store,
                updates=1,
                device_index=index,
                send_keys=HEAD,
            ) as agent:
                # Act 1: each agent trains once from version 0 and publishes
                assert await agent.run() == 1
                assert not agent.model.hidden.weight.requires_grad
        async with Aggregator(job=job_id, broker=broker, store=store, idle_timeout=1.0) as agg:
            stats = await agg.run()
        # Assert: one version; hidden.* byte for byte as before, out.* moved
        before, after = await _model(store, 0), await _model(store, 1)
        assert stats.versions == 1 and not stats.rejected
        assert set(after) == set(before)
        for name in ("hidden.weight", "hidden.bias"):
            assert torch.equal(after[name], before[name]), name
        for name in HEAD:
            assert not torch.equal(after[name], before[name]), name
    finally:
        await store.delete_job()
        await broker.delete_job(job_id)
        await store.close()
        await broker.close()


def _foreign_dtype(job: str) -> tuple[dict, bytes, str]:
    """An update whose weights are int16, written by the safetensors package as any peer could.

    fedq's own encoder refuses int16; before the fix, decoding it raised a bare ValueError out
    of the aggregator's loop instead of a dead letter.
    """
    body = st_save({"w": torch.ones(4, dtype=torch.int16), "b": torch.ones(1)})
    headers, _, update_id = update(
        job, INITIAL, payload_blake3=blake3_hex(body), payload_bytes=len(body)
    )
    return headers, body, update_id


def _bad(job: str) -> list[tuple[tuple[dict, bytes, str], str]]:
    partial = {"keys": "partial"}
    return [
        (update(job, {"w": torch.ones(4), "adapter": torch.ones(2)}, **partial), "wrong_keys"),
        (update(job, {}, **partial), "wrong_keys"),
        (update(job, {"b": torch.ones(3)}, **partial), "wrong_shape"),
        (_foreign_dtype(job), "wrong_dtype"),
        (update(job, {"b": torch.ones(1)}), "wrong_keys"),  # not flagged partial
    ]


async def test_bad_partial_updates_are_dead_lettered_and_a_good_one_folds_by_key(
    job_id: str,
) -> None:
    strategy = StrategyConfig(buffer_size=1, staleness=StalenessConfig(name="constant"))
    async with job_backends("real", job_id, strategy) as backends:
        # Arrange: the bad ones, then a good partial update of the bias alone
        bad = _bad(job_id)
        for (headers, body, update_id), _ in bad:
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        headers, body, update_id = update(job_id, {"b": delta(0.0, 2.0)["b"]}, keys="partial")
        await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        # Act
        async with Aggregator(
            job=job_id, broker=backends.broker, store=backends.store, idle_timeout=1.0
        ) as aggregator:
            stats = await aggregator.run()
        # Assert: each bad one dead-lettered with its reason; the good one moved b only
        dead = await backends.broker.drain_dead_letters(job_id)
        assert sorted(d.reason for d in dead) == sorted(reason for _, reason in bad)
        assert stats.versions == 1
        data = await backends.store.get_model(1)
        assert data is not None
        model = decode(data)
        assert_close(model["w"], INITIAL["w"], rtol=0, atol=0)
        assert_close(model["b"], INITIAL["b"] + 2.0)
