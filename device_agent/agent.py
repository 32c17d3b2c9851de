"""The device agent loop: fetch the latest global version, train on the local shard, publish."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import torch
from prometheus_client import CollectorRegistry

from device_agent.metrics import AgentMetrics
from device_agent.partition import device_shard
from device_agent.sender import build_update, send_update
from device_agent.tasks import get_task
from device_agent.training import train_local
from infra.logs import bind, log_context
from infra.protocols import Broker, ModelStore
from infra.retry import retry_unavailable
from schemas import JobConfig
from schemas.codec import decode
from schemas.compression import error_feedback, topk_fraction
from schemas.messages import Codec
from schemas.safetensors_format import ByteBuffer
from schemas.signing import public_key_of

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeviceAgent:
    """Train one device's shard against a job, round after round, until stopped or done.

    `slowdown` > 1 makes the device honestly slow: after really training, it waits
    (slowdown - 1) x its measured compute time before publishing.
    """

    def __init__(
        self,
        *,
        device_id: str,
        broker: Broker,
        store: ModelStore,
        updates: int | None = None,
        num_devices: int | None = None,
        dirichlet: float | None = None,
        slowdown: float = 1.0,
        device_index: int | None = None,
        codec: Codec = "none",
        retry_seconds: float = 1.0,
        metrics: AgentMetrics | None = None,
        signing_key: str | None = None,
        trainable_only: bool = False,
        send_keys: Sequence[str] | None = None,
    ) -> None:
        self.device_id = device_id
        # Partial updates: send only the parameters that train (a frozen backbone stays
        # out), or only `send_keys`, freezing every other parameter.
        self._trainable_only = trainable_only
        self._send_keys = None if send_keys is None else frozenset(send_keys)
        self.sent_keys: frozenset[str] | None = None
        # Base64 Ed25519 private key; every update is signed with it when given.
        self._signing_key = signing_key
        self.broker = broker
        self.store = store
        self.updates = updates
        self.slowdown = slowdown
        self.codec: Codec = codec
        # Top-k error feedback: the part of past deltas that was not sent yet.
        self._residual: dict[str, torch.Tensor] = {}
        self.sent = 0
        self._num_devices = num_devices
        self._device_index = device_index
        self._dirichlet = dirichlet
        self._retry_seconds = retry_seconds
        self._stopping = asyncio.Event()
        # Without a registry from the caller, count into a private one nobody scrapes.
        self.metrics = metrics or AgentMetrics(CollectorRegistry(), store.job, device_id)
        self.config: JobConfig
        self.device_index: int

    async def __aenter__(self) -> DeviceAgent:
        self.config = await self._retry(self.store.get_config)
        training = self.config.training
        task = get_task(self.config.task)
        data = await asyncio.to_thread(task.load_data, training.seed)
        if self._device_index is not None:
            self.device_index = self._device_index
        else:
            self.device_index = await self._retry(
                lambda: self.store.claim_device_index(self.device_id)
            )
        num_devices = self._num_devices or training.num_devices
        shard = device_shard(
            data.y_train.numpy(),
            self.device_index,
            num_devices,
            self._dirichlet or training.dirichlet_alpha,
            training.seed,
        )
        index = torch.as_tensor(shard, dtype=torch.long)
        self.x, self.y = data.x_train[index], data.y_train[index]
        self.model = task.build_model(training.seed)
        self.sent_keys = self._choose_keys()
        await self._check_registration()
        log.info(
            "device %s (index %d of %d) joins job %s with %d samples",
            self.device_id,
            self.device_index % num_devices,
            num_devices,
            self.config.job,
            len(self.y),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def _choose_keys(self) -> frozenset[str] | None:
        """Return the keys each update carries, None for all of them (a full update)."""
        if self._send_keys is None and not self._trainable_only:
            return None
        if self._send_keys is not None:
            unknown = self._send_keys - self.config.model_schema.keys()
            if unknown:
                raise ValueError(f"keys not in the job's model: {sorted(unknown)[:5]}")
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name in self._send_keys)
            keys = self._send_keys
        else:
            keys = frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)
        if not keys:
            raise ValueError("no parameter to send: every one is frozen")
        return keys

    async def _check_registration(self) -> None:
        """Warn early if the aggregator would refuse this device's signed updates."""
        if self._signing_key is None:
            return
        registered = await self._retry(lambda: self.store.device_key(self.device_id))
        if registered != public_key_of(self._signing_key):
            log.warning(
                "device %s: the key file's public key is not the one registered for job %s "
                "(unknown, revoked or replaced): a job that requires signatures refuses its "
                "updates",
                self.device_id,
                self.config.job,
            )

    @property
    def synchronous(self) -> bool:
        """FedAvg is the synchronous baseline: a device trains once per global version."""
        return self.config.strategy.name == "fedavg"

    def stop(self) -> None:
        """End the loop after the round in hand has been published."""
        self._stopping.set()

    async def run(self) -> int:
        """Train and publish until stopped or `updates` are sent; return how many were sent."""
        last_base = -1
        while not self._stopping.is_set() and (self.updates is None or self.sent < self.updates):
            if self.synchronous and last_base >= 0:
                await self._wait_for_version_after(last_base)
            version, model_bytes = await self._retry(self.store.latest)
            if self.synchronous and version == last_base:
                continue
            await self.train_and_publish(version, model_bytes)
            last_base = version
        return self.sent

    async def _wait_for_version_after(self, version: int) -> None:
        await self._retry(lambda: self.store.wait_for_version(version, 1.0))

    async def train_and_publish(self, version: int, model_bytes: ByteBuffer) -> None:
        """Run one local round from `version` and publish its delta."""
        with log_context(
            job=self.config.job, version=version, update_id=None, device_id=self.device_id
        ):
            await self._train_and_publish(version, model_bytes)

    async def _train_and_publish(self, version: int, model_bytes: ByteBuffer) -> None:
        self.metrics.last_version.set(version)
        start = await asyncio.to_thread(decode, model_bytes)
        self.model.load_state_dict(start)
        seed = random.Random(f"{self.config.training.seed}:{self.device_id}:{self.sent}")
        try:
            result = await asyncio.to_thread(
                train_local,
                self.model,
                self.x,
                self.y,
                self.config.training,
                seed=seed.randrange(2**31),
                global_params=start,
            )
        except FloatingPointError as exc:
            # A diverged round publishes nothing; the next round starts again from the global
            # model. The job's hyper-parameters (lr, prox_mu) are the thing to fix.
            log.error(
                "device %s: local training diverged (%s); skipping the round", self.device_id, exc
            )
            return
        self.metrics.training_seconds.observe(result.seconds)
        if self.slowdown > 1.0:
            await asyncio.sleep((self.slowdown - 1.0) * result.seconds)
        trained = self.model.state_dict()
        keys = self.sent_keys
        delta = {
            name: trained[name].detach() - start[name]
            for name in start
            if keys is None or name in keys
        }
        if topk_fraction(self.codec) is not None:
            delta, self._residual = await asyncio.to_thread(
                error_feedback, delta, self._residual, self.codec
            )
        header, payload = build_update(
            self.config,
            device_id=self.device_id,
            base_version=version,
            num_samples=result.num_samples,
            delta=delta,
            train_metrics={"loss": result.loss, "accuracy": result.accuracy},
            codec=self.codec,
            signing_key=self._signing_key,
            keys="all" if keys is None else "partial",
        )
        bind(update_id=header.update_id)
        with self.metrics.publish_seconds.time():
            await self._retry(
                lambda: send_update(self.broker, self.store, self.config, header, payload)
            )
        self.sent += 1
        self.metrics.sent.inc()
        log.info(
            "device %s sent update %d from version %d (loss %.3f, %d bytes)",
            self.device_id,
            self.sent,
            version,
            result.loss,
            header.payload_bytes,
        )

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Retry while RabbitMQ or Redis is down; the same update is republished, never lost."""
        return await retry_unavailable(operation, first_delay=self._retry_seconds)
