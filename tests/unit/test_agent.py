"""The device agent over the in-process broker and store: what one round publishes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from aggregator.validation import parse_header
from device_agent.agent import DeviceAgent
from fedq.jobs import create_job, initial_job
from infra.memory_broker import MemoryBroker
from infra.memory_store import MemoryModelStore, MemoryStoreHub
from schemas import StrategyConfig, TrainingConfig, UpdateHeader
from schemas.codec import decode

pytestmark = pytest.mark.unit
JOB = "agent-test"


async def _agent(training: TrainingConfig, **options: Any) -> DeviceAgent:
    broker, store = MemoryBroker(), MemoryModelStore(MemoryStoreHub(), JOB)
    config, model, meta = initial_job(JOB, "digits-mlp", StrategyConfig(), training)
    await create_job(store, broker, config, model, meta)
    return DeviceAgent(device_id="dev-a", broker=broker, store=store, device_index=1, **options)


async def _published(agent: DeviceAgent) -> list[tuple[UpdateHeader, bytes]]:
    messages = []
    deliveries = agent.broker.consume(JOB, prefetch=10, idle_timeout=0.2)
    async for delivery in deliveries:
        messages.append((parse_header(delivery.headers, JOB), delivery.body))
        await delivery.ack()
    await deliveries.aclose()
    return messages


async def test_one_round_publishes_the_delta_from_its_base_version() -> None:
    # Arrange
    agent = await _agent(TrainingConfig(num_devices=4, local_epochs=1))
    async with agent:
        version, start_bytes = await agent.store.latest()
        # Act
        await agent.train_and_publish(version, start_bytes)
        trained = {k: v.clone() for k, v in agent.model.state_dict().items()}
    [(header, body)] = await _published(agent)
    # Assert: the delta is exactly trained - start, tagged with its base and sample count
    start = decode(start_bytes)
    delta = decode(body)
    for name in start:
        torch.testing.assert_close(delta[name], trained[name] - start[name])
    assert header.base_version == 0
    assert header.num_samples == len(agent.y)
    assert header.device_id == "dev-a"
    assert agent.sent == 1


async def test_a_diverged_round_publishes_nothing() -> None:
    # Arrange: a learning rate no network survives
    agent = await _agent(TrainingConfig(num_devices=4, lr=100.0, momentum=0.0))
    async with agent:
        version, start_bytes = await agent.store.latest()
        # Act
        await agent.train_and_publish(version, start_bytes)
    # Assert
    assert await _published(agent) == []
    assert agent.sent == 0


async def test_a_trainable_only_agent_sends_a_partial_update_of_its_trainable_keys() -> None:
    # Arrange: the hidden layer is a frozen backbone (as a task with one would build it)
    agent = await _agent(TrainingConfig(num_devices=4, local_epochs=1), trainable_only=True)
    async with agent:
        for parameter in agent.model.hidden.parameters():
            parameter.requires_grad_(False)
        agent.sent_keys = agent._choose_keys()
        version, start_bytes = await agent.store.latest()
        # Act
        await agent.train_and_publish(version, start_bytes)
    [(header, body)] = await _published(agent)
    # Assert: only out.* travel, flagged partial
    assert header.keys == "partial"
    assert set(decode(body)) == {"out.weight", "out.bias"}


@pytest.mark.parametrize(
    ("keys", "message"), [(["nope"], "not in the job's model"), ([], "no parameter")]
)
async def test_send_keys_must_name_model_keys(keys: list[str], message: str) -> None:
    # Arrange
    agent = await _agent(TrainingConfig(num_devices=4), send_keys=keys)
    # Act / Assert
    with pytest.raises(ValueError, match=message):
        await agent.__aenter__()
