"""Record a real run from its RabbitMQ log stream and replay it: the same versions come out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aggregator.service import Aggregator
from fedq.cli import app
from fedq.recording import read_recording
from fedq.replay import Until, record_job, replay_direct, replay_recording, sha256_sequence
from fedq.testing import Replay
from infra.amqp_broker import AmqpBroker
from infra.redis_store import RedisModelStore
from schemas import StalenessConfig, StrategyConfig
from tests.conftest import AMQP_URL, REDIS_URL
from tests.integration.helpers import delta, job_backends, update

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).parent.parent / "fixtures" / "digits-fedbuff.fedqlog"
FEDASYNC = StrategyConfig(
    name="fedasync", alpha=0.5, max_staleness=8, staleness=StalenessConfig(name="polynomial")
)


async def test_a_recorded_real_run_replays_to_the_same_versions(
    job_id: str, tmp_path: Path
) -> None:
    # Arrange: a FedAsync run on the real services, updates from stale bases included
    out = tmp_path / "run.fedqlog"
    async with job_backends("real", job_id, FEDASYNC) as backends:
        assert isinstance(backends.broker, AmqpBroker)
        await backends.broker.declare_job(job_id, log_stream=True)
        for i, base in enumerate([0, 0, 1, 1, 2, 0]):
            headers, body, update_id = update(
                job_id, delta(0.1 * (i + 1), -0.2 * i), base_version=base, device_id=f"dev-{i % 3}"
            )
            await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        async with Aggregator(
            job=job_id, broker=backends.broker, store=backends.store, idle_timeout=0.5
        ) as aggregator:
            await aggregator.run()
        original = [await backends.store.get_meta(v) for v in range(1, aggregator.version + 1)]
        # Act: record it, then replay the file into a fresh job on the same services
        summary = await record_job(backends.broker, backends.store, out, idle_timeout=0.5)
        partial = await record_job(
            backends.broker, backends.store, tmp_path / "p.fedqlog", until=Until(offset=1)
        )
    recording = read_recording(out)
    broker = await AmqpBroker.connect(AMQP_URL)
    store = RedisModelStore.from_url(REDIS_URL, f"{job_id}-r")
    try:
        result = await replay_recording(recording, broker, store)
    finally:
        await store.delete_job()
        await broker.delete_job(store.job)
        await store.close()
        await broker.close()
    direct = await replay_direct(recording)
    # Assert
    hashes = [meta.sha256 for meta in original if meta is not None]
    assert summary.updates == 6 and summary.versions == len(hashes) >= 4
    assert (partial.updates, partial.versions) == (2, 2)  # FedAsync: a version per update
    assert sha256_sequence(result.versions) == hashes
    assert sha256_sequence(direct.versions) == hashes
    assert result.mismatch() is None and not result.counterfactual
    # the same update ids, in the same order, went into each version
    assert [m.contributors for m in result.versions] == [m.contributors for m in original if m]


async def test_the_shipped_recording_replays_directly_to_its_hashes() -> None:
    recording = read_recording(FIXTURE)
    result = await replay_direct(recording)
    assert recording.error is None and len(recording.versions) >= 3
    assert sha256_sequence(result.versions) == sha256_sequence(recording.versions)


async def test_the_replay_fixture_replays_the_shipped_recording_both_ways(replay: Replay) -> None:
    expected = sha256_sequence(read_recording(FIXTURE).versions)
    assert sha256_sequence(await replay(FIXTURE)) == expected
    assert sha256_sequence(await replay(FIXTURE, backend="amqp")) == expected


async def test_another_strategy_gives_a_counterfactual_replay() -> None:
    recording = read_recording(FIXTURE)
    result = await replay_direct(recording, strategy=FEDASYNC)
    assert result.counterfactual and result.expected == []
    # FedAsync commits one version per admitted update
    assert len(result.versions) > len(recording.versions)


def test_the_cli_inspects_replays_and_reports_a_truncated_file(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(FIXTURE), "--records"])
    assert shown.exit_code == 0, shown.output
    assert "updates: 9 from 3 devices" in shown.output and "staleness" in shown.output
    replayed = runner.invoke(app, ["replay", str(FIXTURE), "--job", "cli-direct", "--direct"])
    assert replayed.exit_code == 0, replayed.output
    assert replayed.output.count("= original") == len(read_recording(FIXTURE).versions)
    damaged = tmp_path / "cut.fedqlog"
    shutil.copy(FIXTURE, damaged)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    inspected = runner.invoke(app, ["inspect", str(damaged)])
    assert inspected.exit_code == 1
    assert "record 14" in inspected.output and "truncated" in inspected.output
    refused = runner.invoke(app, ["replay", str(damaged), "--job", "cli-cut", "--direct"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "--partial" in refused.output
