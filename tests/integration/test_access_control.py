"""A device's own RabbitMQ and Redis users on the real services: what it may and may not do.

The RabbitMQ user is made with rabbitmqctl once for the module (each call boots an Erlang
VM, about 3 s) and deleted after; each test makes its own job and its own Redis ACL user
(whose rules name the job) with ACL SETUSER, and deletes both after.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import pytest
import redis.asyncio as aioredis
import torch
from typer.testing import CliRunner

from device_agent.agent import DeviceAgent
from fedq.access_cli import with_user
from fedq.cli import app
from fedq.jobs import create_job, initial_job
from infra import keys
from infra.access import DeviceCredentials, new_password, rabbitmqctl_commands
from infra.amqp_broker import AmqpBroker, _Message
from infra.errors import AccessDenied, PublishError
from infra.keys import JobKeys
from infra.memory_broker import MemoryBroker
from infra.provision import apply_rabbitmq_user, apply_redis_user, delete_redis_user
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig, TrainingConfig
from schemas.codec import decode
from schemas.signing import generate_key_pair
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import INITIAL, Backends, delta, drain, job_backends, update

pytestmark = pytest.mark.integration
FEDBUFF_1 = StrategyConfig(
    name="fedbuff", buffer_size=1, max_staleness=5, staleness=StalenessConfig(name="constant")
)


def _rabbitmqctl(*argv: str) -> None:
    subprocess.run(["rabbitmqctl", *argv], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def device_user() -> Iterator[tuple[str, str]]:
    """A throwaway RabbitMQ user with a device's permissions: (user name, password)."""
    creds = DeviceCredentials("unused", f"acl-dev-{uuid.uuid4().hex[:8]}", new_password())
    for argv in rabbitmqctl_commands(creds):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    try:
        yield creds.user, creds.password
    finally:
        _rabbitmqctl("delete_user", creds.user)


@dataclass
class Device:
    """A device's own connections to both backends, for one job."""

    creds: DeviceCredentials
    broker: AmqpBroker
    store: RedisModelStore


@asynccontextmanager
async def device(user: tuple[str, str], job: str) -> AsyncIterator[Device]:
    """Give the device a Redis ACL user for `job` and connect as it to both backends."""
    creds = DeviceCredentials(job, *user)
    await apply_redis_user(REDIS_URL, creds)
    broker = await AmqpBroker.connect(
        with_user(AMQP_URL, creds.user, creds.password), publish_timeout=5.0
    )
    store = RedisModelStore.from_url(
        with_user(REDIS_URL, creds.user, creds.password), job, timeout=5.0
    )
    try:
        yield Device(creds, broker, store)
    finally:
        await store.close()
        await broker.close()
        await delete_redis_user(REDIS_URL, creds.user)


async def test_an_agent_with_its_own_users_gets_its_claim_checked_update_applied(
    device_user: tuple[str, str], job_id: str
) -> None:
    # Arrange: a job that binds device users, requires signatures, and sends every update
    # by claim-check (inline limit 0), so the agent uses each permission it has
    user, _ = device_user
    private_key, public_key = generate_key_pair()
    config, model, meta = initial_job(
        job_id,
        "digits-mlp",
        FEDBUFF_1,
        TrainingConfig(num_devices=2, local_epochs=1),
        require_signatures=True,
        bind_device_users=True,
    )
    config = config.model_copy(update={"inline_limit_bytes": 0})
    admin = Backends(
        await AmqpBroker.connect(AMQP_URL), RedisModelStore.from_url(REDIS_URL, job_id), config
    )
    try:
        await create_job(admin.store, admin.broker, config, model, meta, log_stream=False)
        await admin.store.register_device(user, public_key)
        async with device(device_user, job_id) as dev:
            agent = DeviceAgent(
                device_id=user,
                broker=dev.broker,
                store=dev.store,
                updates=1,
                signing_key=private_key,
                retry_seconds=0.1,
            )
            # Act
            async with agent:
                await agent.run()
        aggregator = await drain(admin)
        # Assert: applied from the broker-validated user, and its blob removed
        assert aggregator.stats.rejected == {}
        assert await admin.store.current_version() == 1
        meta_1 = await admin.store.get_meta(1)
        assert meta_1 is not None and meta_1.devices == [user]
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            pattern = f"{JobKeys(job_id).blob_prefix(user)}*"
            assert [k async for k in client.scan_iter(match=pattern)] == []
        finally:
            await client.aclose()
    finally:
        await admin.store.delete_job()
        await admin.broker.delete_job(job_id)
        await admin.store.close()
        await admin.broker.close()


async def test_the_broker_refuses_a_forged_user_id_and_the_publisher_says_so(
    device_user: tuple[str, str], job_id: str
) -> None:
    async with (
        job_backends("real", job_id, FEDBUFF_1, bind_device_users=True) as backends,
        device(device_user, job_id) as dev,
    ):
        headers, body, update_id = update(job_id, delta(1.0), device_id="dev-victim")
        forged = _Message(body, headers=headers, message_id=update_id, user_id="dev-victim")
        # Act: the device claims another user in the AMQP property
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"PRECONDITION_FAILED.*user_id"):
            await dev.broker.publish_message(keys.UPDATES_EXCHANGE, job_id, forged, timeout=5.0)
        # Assert: refused at once, not republished; the publisher still works afterwards
        assert time.monotonic() - started < 2.0
        headers, body, update_id = update(job_id, delta(1.0), device_id=dev.creds.user)
        await dev.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        await drain(backends)
        assert await backends.store.current_version() == 1
        assert await backends.broker.drain_dead_letters(job_id) == []


async def test_a_device_user_may_only_publish_updates(
    device_user: tuple[str, str], job_id: str
) -> None:
    async with (
        job_backends("real", job_id, FEDBUFF_1) as backends,
        device(device_user, job_id) as dev,
    ):
        headers, body, update_id = update(job_id, delta(1.0), device_id=dev.creds.user)
        # Another exchange (here the dead letters): no write permission
        letter = aio_pika.Message(body, headers=headers, message_id=update_id)
        with pytest.raises(PublishError, match="ACCESS_REFUSED"):
            await dev.broker.publish_message(keys.DEAD_EXCHANGE, job_id, letter, timeout=5.0)
        # Reading the update queue, or the dead letters (one is there to be read); declaring
        # topology
        await backends.broker.publish_message(keys.DEAD_EXCHANGE, job_id, letter, timeout=5.0)
        consumer = dev.broker.consume(job_id, prefetch=1, idle_timeout=1.0)
        with pytest.raises(AccessDenied, match="ACCESS_REFUSED"):
            await anext(consumer)
        with pytest.raises(AccessDenied, match="ACCESS_REFUSED"):
            await dev.broker.drain_dead_letters(job_id)
        with pytest.raises(AccessDenied, match="ACCESS_REFUSED"):
            await dev.broker.declare_job(f"{job_id}-x")
        # Its one permission still works; the letter it could not read is still there
        await dev.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        assert await backends.broker.queue_depth(job_id) == (1, 0)
        assert [d.message_id for d in await backends.broker.drain_dead_letters(job_id)] == [
            update_id
        ]


async def test_a_device_redis_user_reads_models_and_writes_only_its_own_blobs(
    device_user: tuple[str, str], job_id: str
) -> None:
    async with (
        job_backends("real", job_id, FEDBUFF_1) as backends,
        device(device_user, job_id) as dev,
    ):
        me, other = dev.creds.user, "dev-other"
        update_id = str(uuid.uuid4())
        # Allowed: the job's config, version, model and meta, its shard claim, its own blob
        assert (await dev.store.get_config()).job == job_id
        version, model = await dev.store.latest()
        torch.testing.assert_close(decode(model)["w"], INITIAL["w"])
        assert await dev.store.get_meta(version) is not None
        assert await dev.store.claim_device_index(me) == 0
        assert await dev.store.wait_for_version(0, timeout=0.1) == 0
        await dev.store.put_blob(me, update_id, b"mine", ttl_seconds=60)
        assert await backends.store.get_blob(me, update_id) == b"mine"
        # Refused: another device's blob (write or read), the config, the registry, commits
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.put_blob(other, update_id, b"forged", ttl_seconds=60)
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.get_blob(other, update_id)
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.register_device(me, "a-key-of-my-choosing", replace=True)
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.revoke_device(other)
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.count_rejection("forged")
        with pytest.raises(AccessDenied, match="no permissions"):
            await dev.store.delete_job()
        raw = aioredis.Redis.from_url(with_user(REDIS_URL, me, dev.creds.password))
        try:
            with pytest.raises(aioredis.ResponseError, match="no permissions"):
                await raw.set(JobKeys(job_id).config, b"{}")
            with pytest.raises(aioredis.ResponseError, match="no permissions"):
                await raw.get(f"fedq:{{{job_id}-other}}:config")
        finally:
            await raw.aclose()
        # Nothing the refusals touched changed
        assert await backends.store.get_blob(other, update_id) is None
        assert (await backends.store.get_config()).job == job_id
        assert await backends.store.list_devices() == []


async def test_the_aggregator_dead_letters_a_device_id_that_is_not_the_broker_user(
    device_user: tuple[str, str], job_id: str
) -> None:
    async with (
        job_backends("real", job_id, FEDBUFF_1, bind_device_users=True) as backends,
        device(device_user, job_id) as dev,
    ):
        # Arrange: the device's own update; the device claiming another id; the admin user
        # (guest) claiming the device's id
        own = update(job_id, delta(1.0), device_id=dev.creds.user)
        claims_other = update(job_id, delta(5.0), device_id="dev-victim")
        admin_claims_device = update(job_id, delta(7.0), device_id=dev.creds.user)
        for (headers, body, update_id), broker in (
            (own, dev.broker),
            (claims_other, dev.broker),
            (admin_claims_device, backends.broker),
        ):
            await broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        # Act
        aggregator = await drain(backends)
        # Assert: only the device's own update is in the model
        assert await backends.store.current_version() == 1
        model = decode((await backends.store.get_model(1)) or b"")
        torch.testing.assert_close(model["w"], INITIAL["w"] + 1.0)
        dead = await backends.broker.drain_dead_letters(job_id)
        assert {(d.message_id, d.reason) for d in dead} == {
            (claims_other[2], "user_mismatch"),
            (admin_claims_device[2], "user_mismatch"),
        }
        assert aggregator.stats.rejected == {"user_mismatch": 2}


@pytest.mark.parametrize("bind", [True, False])
async def test_in_memory_the_publishers_user_binds_device_ids_only_when_the_job_asks(
    bind: bool,
) -> None:
    # Arrange: the in-process broker publishes as user dev-a
    job = f"mem-bind-{bind}"
    async with job_backends("memory", job, FEDBUFF_1, bind_device_users=bind) as backends:
        broker, store = backends.broker, backends.store
        assert isinstance(broker, MemoryBroker)
        broker.user_id = "dev-a"
        for device_id, value in (("dev-a", 1.0), ("dev-b", 2.0)):
            headers, body, update_id = update(job, delta(value), device_id=device_id)
            await broker.publish_raw(job, body, headers=headers, message_id=update_id)
        # Act
        aggregator = await drain(backends)
        # Assert
        expected = {"user_mismatch": 1} if bind else {}
        assert aggregator.stats.rejected == expected
        assert await store.current_version() == (1 if bind else 2)


def test_the_cli_creates_a_bound_job_and_applies_a_devices_users(job_id: str) -> None:
    # Arrange
    cli = CliRunner()
    urls = ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
    user = f"acl-cli-{uuid.uuid4().hex[:8]}"
    create = ["job", "create", "--job", job_id, "--task", "digits-mlp", "--device-users"]
    result = cli.invoke(app, [*create, "--no-record", *urls])
    assert result.exit_code == 0, result.output
    try:
        # Act
        apply = ["device", "credentials", "--job", job_id, "--device-id", user, "--apply"]
        result = cli.invoke(app, [*apply, *urls])
        # Assert: both users exist with the device's rules, and the printed URLs log in
        assert result.exit_code == 0, result.output
        settings = dict(
            line.split("=", 1) for line in result.output.splitlines() if line.startswith("FEDQ_")
        )
        assert settings["FEDQ_DEVICE_ID"] == user
        permissions = subprocess.run(
            ["rabbitmqctl", "-q", "list_user_permissions", user],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        assert permissions[-3:] == ["^$", "^fedq\\.updates$", "^$"]

        async def check() -> None:
            store = RedisModelStore.from_url(settings["FEDQ_REDIS_URL"], job_id, timeout=5.0)
            broker = await AmqpBroker.connect(settings["FEDQ_AMQP_URL"], publish_timeout=5.0)
            try:
                assert (await store.get_config()).bind_device_users is True
                assert broker.user_id == user
                with pytest.raises(AccessDenied):
                    await store.count_rejection("mine")
            finally:
                await broker.close()
                await store.close()

        asyncio.run(check())
    finally:
        cli.invoke(app, ["job", "delete", "--job", job_id, *urls])
        asyncio.run(delete_redis_user(REDIS_URL, user))
        _rabbitmqctl("delete_user", user)


async def test_a_wrong_password_is_access_denied_not_an_outage(
    device_user: tuple[str, str], job_id: str
) -> None:
    # A login refusal is final: BackendUnavailable would make agents retry it forever.
    user, _ = device_user
    started = time.monotonic()
    with pytest.raises(AccessDenied, match="login"):
        await AmqpBroker.connect(with_user(AMQP_URL, user, "wrong"), publish_timeout=5.0)
    async with device(device_user, job_id) as dev:
        store = RedisModelStore.from_url(with_user(REDIS_URL, user, "wrong"), job_id)
        try:
            with pytest.raises(AccessDenied):
                await store.current_version()
        finally:
            await store.close()
        assert dev.creds.user == user
    assert time.monotonic() - started < 10.0


async def test_a_password_that_starts_with_a_dash_is_created_and_changed() -> None:
    # Arrange: base64url passwords start with "-" one time in 64 (CI once drew one)
    user = f"acl-dash-{uuid.uuid4().hex[:8]}"
    first = DeviceCredentials("unused", user, "-" + new_password())
    second = DeviceCredentials("unused", user, "-" + new_password())
    try:
        # Act: create the user, then apply again with another password (change_password)
        await apply_rabbitmq_user(first)
        await apply_rabbitmq_user(second)
        # Assert: the second password logs in, the first no longer does
        broker = await AmqpBroker.connect(
            with_user(AMQP_URL, user, second.password), publish_timeout=5.0
        )
        await broker.close()
        with pytest.raises(AccessDenied):
            await AmqpBroker.connect(with_user(AMQP_URL, user, first.password), publish_timeout=5.0)
    finally:
        _rabbitmqctl("delete_user", user)
