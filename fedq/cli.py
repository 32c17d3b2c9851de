"""The `fedq` command line: create jobs, run the aggregator, agents and evaluator, and watch."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from pydantic import ValidationError
from rich.console import Console

from aggregator.mirror import EdgeMismatch
from aggregator.runner import serve as serve_aggregator
from aggregator.service import Fenced
from device_agent.runner import serve_agent, serve_evaluator
from fedq import dead_cli, device_cli, record_cli
from fedq import options as opt
from fedq.compare import run_simulation
from fedq.console import Explanations, fail, run_command
from fedq.jobs import create_job, initial_job, job_status
from fedq.simulate import SimulationSpec
from fedq.speeds import parse_speed_profile
from fedq.status_view import print_status, progress_line
from infra.connect import open_broker, open_store
from infra.errors import BackendUnavailable, JobExists, JobNotFound
from infra.logs import configure_logging
from infra.redis_client import InvalidRedisUrl
from infra.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_REDIS_URL,
    AgentSettings,
    AggregatorSettings,
    ConnectionSettings,
)
from schemas import TrainingConfig
from schemas.compression import parse_codec
from schemas.signing import InvalidKey

T = TypeVar("T")

app = typer.Typer(
    help=(
        "fedq: asynchronous federated learning over RabbitMQ and Redis.\n\n"
        "Devices train on data that never leaves them and publish model updates; one "
        "aggregator folds them into the global model with staleness-aware averaging and "
        "commits every version to Redis. Typical session: `fedq job create`, then "
        "`fedq aggregator`, `fedq evaluator` and several `fedq agent`, and `fedq status`."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Plain click errors: one line naming the bad option, easy to read in logs.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
job_app = typer.Typer(
    help="Create or delete federated jobs.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(job_app, name="job")
record_cli.register(app)
dead_cli.register(app)
device_cli.register(app)


_EXPLANATIONS: Explanations = {
    JobNotFound: lambda e: f"job not found ({e}); create it with `fedq job create`",
    JobExists: lambda e: f"job already exists ({e}); pass --if-not-exists to accept it",
    BackendUnavailable: lambda e: f"cannot reach RabbitMQ or Redis: {e}",
    Fenced: lambda e: f"fenced by another aggregator: {e}",
    ValidationError: lambda e: str(e).splitlines()[0] + ": " + str(e).splitlines()[-1],
    InvalidKey: lambda e: f"the device key file is not a valid key: {e}",
    EdgeMismatch: lambda e: f"edge job refused: {e}",
    InvalidRedisUrl: lambda e: f"bad Redis URL: {e}",
}


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return run_command(coroutine, _EXPLANATIONS)


def _logging(level: str, fmt: str = "text") -> None:
    configure_logging(level, fmt)


@job_app.command("create")
def job_create(
    job: opt.Job,
    task: opt.Task = "mnist1d-cnn",
    strategy: opt.Strategy = "fedbuff",
    buffer_size: opt.BufferSize = opt.STRATEGY.buffer_size,
    alpha: opt.Alpha = opt.STRATEGY.alpha,
    staleness: opt.Staleness = opt.STRATEGY.staleness.name,
    staleness_a: opt.StalenessA = opt.STRATEGY.staleness.a,
    staleness_b: opt.StalenessB = opt.STRATEGY.staleness.b,
    max_staleness: opt.MaxStaleness = opt.STRATEGY.max_staleness,
    server_lr: opt.ServerLr = opt.STRATEGY.server_lr,
    server_optimizer: opt.ServerOptimizer = opt.STRATEGY.server_optimizer,
    weighting: opt.Weighting = opt.STRATEGY.weighting,
    clip_norm: opt.ClipNorm = opt.STRATEGY.clip_norm,
    aggregation: opt.Aggregation = opt.STRATEGY.aggregation,
    trim_fraction: opt.TrimFraction = opt.STRATEGY.trim_fraction,
    local_epochs: opt.LocalEpochs = opt.TRAINING.local_epochs,
    batch_size: opt.BatchSize = opt.TRAINING.batch_size,
    lr: opt.Lr = opt.TRAINING.lr,
    optimizer: opt.Optimizer = opt.TRAINING.optimizer,
    prox_mu: opt.ProxMu = opt.TRAINING.prox_mu,
    num_devices: Annotated[
        int, typer.Option(min=1, help="How many shards the training data is split into.")
    ] = opt.TRAINING.num_devices,
    dirichlet: opt.Dirichlet = opt.TRAINING.dirichlet_alpha,
    seed: opt.Seed = opt.TRAINING.seed,
    if_not_exists: Annotated[
        bool, typer.Option(help="Succeed without change if the job exists already.")
    ] = False,
    record: Annotated[
        bool,
        typer.Option(help="Keep every update in the stream fedq.log.J for `fedq record`."),
    ] = True,
    require_signatures: Annotated[
        bool,
        typer.Option(
            help="Refuse updates not signed by a device registered with `fedq device add`."
        ),
    ] = False,
    max_update_age: Annotated[
        float | None,
        typer.Option(min=0.001, help="Refuse updates sent more than this many seconds ago."),
    ] = None,
    device_users: Annotated[
        bool,
        typer.Option(
            help="Refuse updates whose device id is not the RabbitMQ user that published them."
        ),
    ] = False,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Create a job: store its config and initial model (version 0), declare its queues."""
    strategy_config = opt.strategy_config(
        strategy,
        buffer_size=buffer_size,
        alpha=alpha,
        staleness=staleness,
        staleness_a=staleness_a,
        staleness_b=staleness_b,
        max_staleness=max_staleness,
        server_lr=server_lr,
        server_optimizer=server_optimizer,
        weighting=weighting,
        clip_norm=clip_norm,
        aggregation=aggregation,
        trim_fraction=trim_fraction,
    )
    training = TrainingConfig(
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        prox_mu=prox_mu,
        num_devices=num_devices,
        dirichlet_alpha=dirichlet,
        seed=seed,
    )
    settings = ConnectionSettings(amqp_url=amqp_url, redis_url=redis_url)

    async def create() -> bool:
        config, model, meta = initial_job(
            job,
            task,
            strategy_config,
            training,
            require_signatures=require_signatures,
            max_update_age_seconds=max_update_age,
            bind_device_users=device_users,
        )
        broker = await open_broker(settings)
        store = open_store(settings, job)
        try:
            await create_job(store, broker, config, model, meta, log_stream=record)
            return True
        except JobExists:
            if not if_not_exists:
                raise
            return False
        finally:
            await store.close()
            await broker.close()

    created = _run(create())
    typer.echo(f"job {job}: {'created' if created else 'exists already'} ({task}, {strategy})")


@job_app.command("delete")
def job_delete(
    job: opt.Job,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Delete a job: every Redis key and RabbitMQ queue it owns."""
    settings = ConnectionSettings(amqp_url=amqp_url, redis_url=redis_url)

    async def delete() -> None:
        broker = await open_broker(settings)
        store = open_store(settings, job)
        try:
            await store.delete_job()
            await broker.delete_job(job)
        finally:
            await store.close()
            await broker.close()

    _run(delete())
    typer.echo(f"job {job}: deleted")


@app.command()
def aggregator(
    job: opt.Job,
    prefetch: Annotated[
        int | None, typer.Option(min=1, help="Unacked updates in flight (default: 2 x buffer).")
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(min=0.0, help="Drain mode: exit after this many seconds with no update."),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            envvar="FEDQ_UPSTREAM",
            help="Edge mode: forward partial updates (K of this job's at a time) to this root"
            " job, and mirror its model here.",
        ),
    ] = None,
    device_id: Annotated[
        str,
        typer.Option(
            envvar="FEDQ_DEVICE_ID", help="Edge mode: the device id upstream (default edge-JOB)."
        ),
    ] = "",
    key_file: opt.KeyFile = None,
    flush_seconds: Annotated[
        float,
        typer.Option(
            min=0.01,
            envvar="FEDQ_EDGE_FLUSH_SECONDS",
            help="Edge mode: forward a group that waited this long, even < K.",
        ),
    ] = 10.0,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
    log_level: opt.LogLevel = "INFO",
    log_format: opt.LogFormatOption = "text",
) -> None:
    """Run a job's aggregator until SIGTERM (as `python -m aggregator`); --upstream: an edge."""
    _logging(log_level, log_format)
    settings = AggregatorSettings(
        job=job,
        amqp_url=amqp_url,
        redis_url=redis_url,
        prefetch=prefetch,
        idle_exit_seconds=idle_exit,
        upstream=upstream,
        device_id=device_id,
        device_key_file=key_file,
        edge_flush_seconds=flush_seconds,
    )
    _run(serve_aggregator(settings))


@app.command()
def agent(
    job: opt.Job,
    device_id: Annotated[
        str, typer.Option(envvar="FEDQ_DEVICE_ID", help="Device id (default: the hostname).")
    ] = "",
    num_devices: Annotated[
        int | None, typer.Option(min=1, help="Override the job's number of shards.")
    ] = None,
    dirichlet: Annotated[
        float | None, typer.Option(min=0.0, help="Override the job's Dirichlet alpha.")
    ] = None,
    updates: Annotated[
        int | None, typer.Option(min=1, help="Stop after sending this many updates.")
    ] = None,
    slowdown: Annotated[
        float,
        typer.Option(min=1.0, help="Emulate slow hardware: wait (slowdown-1) x compute time."),
    ] = 1.0,
    codec: CodecOption = "none",
    key_file: opt.KeyFile = None,
    trainable_only: Annotated[
        bool,
        typer.Option(help="Send a partial update: only the parameters with requires_grad."),
    ] = False,
    send_keys: Annotated[
        str,
        typer.Option(
            "--keys", help="Send only these comma-separated keys; every other one is frozen."
        ),
    ] = "",
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
    log_level: opt.LogLevel = "INFO",
    log_format: opt.LogFormatOption = "text",
) -> None:
    """Run one device: fetch the latest model, train on the local shard, publish, repeat."""
    _logging(log_level, log_format)
    torch.set_num_threads(1)
    settings = AgentSettings(
        job=job,
        device_id=device_id,
        num_devices=num_devices,
        dirichlet=dirichlet,
        updates=updates,
        slowdown=slowdown,
        codec=codec,
        device_key_file=key_file,
        trainable_only=trainable_only,
        send_keys=send_keys,
        amqp_url=amqp_url,
        redis_url=redis_url,
    )
    sent = _run(serve_agent(settings))
    typer.echo(f"device {device_id or 'from hostname'}: sent {sent} updates")


@app.command()
def evaluator(
    job: opt.Job,
    max_versions: Annotated[
        int | None, typer.Option(min=1, help="Stop after evaluating this many versions.")
    ] = None,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
    log_level: opt.LogLevel = "INFO",
    log_format: opt.LogFormatOption = "text",
) -> None:
    """Evaluate every new global version on the held-out split and record its accuracy."""
    _logging(log_level, log_format)
    torch.set_num_threads(1)
    settings = AgentSettings(
        job=job,
        role="evaluator",
        max_versions=max_versions,
        amqp_url=amqp_url,
        redis_url=redis_url,
    )
    _run(serve_evaluator(settings))


@app.command()
def status(
    job: opt.Job,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    watch: Annotated[
        float | None,
        typer.Option(min=0.5, help="Print a progress line every WATCH seconds (Ctrl-C ends)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="With --watch: stop after this many seconds.")
    ] = None,
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Show a job's version and rate, accuracy, dead letters, queue, and devices' staleness."""
    settings = ConnectionSettings(amqp_url=amqp_url, redis_url=redis_url)

    async def read() -> dict[str, Any]:
        # The store first: a bad Redis URL fails here before a broker connection is left open.
        store = open_store(settings, job)
        broker = await open_broker(settings)
        try:
            return await job_status(store, broker)
        finally:
            await store.close()
            await broker.close()

    if watch is not None:
        _run(_watch(settings, job, watch, duration))
        return
    summary = _run(read())
    if as_json:
        typer.echo(json.dumps(summary))
        return
    print_status(summary, Console() if sys.stdout.isatty() else Console(width=120))


async def _watch(
    settings: ConnectionSettings, job: str, interval: float, duration: float | None
) -> None:
    """Print one progress line per interval: version, rate, accuracy, counts, queue."""
    store = open_store(settings, job)
    broker = await open_broker(settings)
    started = time.monotonic()
    try:
        while duration is None or time.monotonic() - started < duration:
            summary = await job_status(store, broker)
            typer.echo(progress_line(summary, time.monotonic() - started))
            await asyncio.sleep(interval)
    finally:
        await store.close()
        await broker.close()


def _strategy_list(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in opt.STRATEGY_NAMES]
    if not names or unknown:
        raise typer.BadParameter(
            f"unknown strategy {', '.join(unknown) or value!r}; "
            f"choose from {', '.join(opt.STRATEGY_NAMES)}"
        )
    return names


def _compare_option(value: str | None) -> str | None:
    if value is not None:
        _strategy_list(value)
    return value


def _codec(value: str) -> str:
    try:
        return parse_codec(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


CodecOption = Annotated[
    str,
    typer.Option(
        callback=_codec,
        help="Update codec: none, fp16, bf16, int8, int8:channel or topk:FRACTION "
        "(e.g. topk:0.01 sends the largest 1 percent of entries, with error feedback).",
    ),
]


def _speed_profile(value: str) -> str:
    try:
        parse_speed_profile(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


@app.command()
def simulate(
    task: opt.Task = "mnist1d-cnn",
    devices: Annotated[int, typer.Option(min=1, help="Number of simulated devices.")] = 8,
    dirichlet: opt.Dirichlet = opt.TRAINING.dirichlet_alpha,
    strategy: opt.Strategy = "fedbuff",
    compare: Annotated[
        str | None,
        typer.Option(
            callback=_compare_option,
            help="Run several strategies one after the other on the same devices and speeds, "
            "e.g. fedavg,fedasync,fedbuff (overrides --strategy).",
        ),
    ] = None,
    device_speeds: Annotated[
        str,
        typer.Option(
            callback=_speed_profile,
            help="Heterogeneity: uniform, lognormal:SIGMA, or stragglers:FRACTION:SLOWDOWN "
            "(e.g. stragglers:0.25:10: a quarter of the devices 10x slower).",
        ),
    ] = "stragglers:0.25:10",
    target_accuracy: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Accuracy whose time and trips are reported.")
    ] = 0.8,
    max_seconds: Annotated[
        float, typer.Option(min=1.0, help="Wall-time budget of each strategy's run.")
    ] = 30.0,
    max_versions: Annotated[
        int | None, typer.Option(min=1, help="Also stop a run after this many versions.")
    ] = None,
    stop_at_target: Annotated[
        bool, typer.Option(help="End a run as soon as the target accuracy is reached.")
    ] = False,
    seed: opt.Seed = opt.TRAINING.seed,
    codec: CodecOption = "none",
    out: Annotated[
        Path | None,
        typer.Option(help="Write results.json, metrics-<strategy>.csv and PNG plots here."),
    ] = None,
    buffer_size: opt.BufferSize = opt.STRATEGY.buffer_size,
    alpha: opt.Alpha = opt.STRATEGY.alpha,
    staleness: opt.Staleness = opt.STRATEGY.staleness.name,
    staleness_a: opt.StalenessA = opt.STRATEGY.staleness.a,
    staleness_b: opt.StalenessB = opt.STRATEGY.staleness.b,
    # 10x stragglers among fast simulated devices arrive 20-80 versions late: let them count.
    max_staleness: opt.MaxStaleness = 100,
    server_lr: opt.ServerLr = opt.STRATEGY.server_lr,
    server_optimizer: opt.ServerOptimizer = opt.STRATEGY.server_optimizer,
    weighting: opt.Weighting = opt.STRATEGY.weighting,
    clip_norm: opt.ClipNorm = opt.STRATEGY.clip_norm,
    aggregation: opt.Aggregation = opt.STRATEGY.aggregation,
    trim_fraction: opt.TrimFraction = opt.STRATEGY.trim_fraction,
    local_epochs: opt.LocalEpochs = opt.TRAINING.local_epochs,
    batch_size: opt.BatchSize = opt.TRAINING.batch_size,
    lr: opt.Lr = opt.TRAINING.lr,
    optimizer: opt.Optimizer = opt.TRAINING.optimizer,
    prox_mu: opt.ProxMu = opt.TRAINING.prox_mu,
    amqp_url: opt.AmqpUrl = "memory://",
    redis_url: opt.RedisUrl = "memory://",
    log_level: opt.LogLevel = "WARNING",
) -> None:
    """Run a whole federation in this process and measure it (memory:// unless URLs are given).

    Every device really trains on its Dirichlet shard; a slow device also waits its extra
    time. FedAvg rounds wait for all devices (the synchronous baseline); `--compare` runs each
    strategy on identical devices, data and speeds and prints time and client trips to the
    target accuracy side by side.
    """
    _logging(log_level)
    if amqp_url.startswith("memory://") != redis_url.startswith("memory://"):
        raise fail("--amqp-url and --redis-url must both be memory:// or both be real services")
    torch.set_num_threads(1)
    names = _strategy_list(compare) if compare else [strategy]
    spec = SimulationSpec(
        task=task,
        devices=devices,
        training=TrainingConfig(
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            prox_mu=prox_mu,
            num_devices=devices,
            dirichlet_alpha=dirichlet,
            seed=seed,
        ),
        speeds=parse_speed_profile(device_speeds),
        target_accuracy=target_accuracy,
        max_seconds=max_seconds,
        max_versions=max_versions,
        stop_at_target=stop_at_target,
        codec=codec,
    )
    strategies = [
        opt.strategy_config(
            name,  # type: ignore[arg-type]  # checked by _strategy_list
            # A synchronous round waits for every device: that is the baseline being measured.
            buffer_size=devices if name == "fedavg" else buffer_size,
            alpha=alpha,
            staleness=staleness,
            staleness_a=staleness_a,
            staleness_b=staleness_b,
            max_staleness=max_staleness,
            server_lr=server_lr,
            server_optimizer=server_optimizer,
            weighting=weighting,
            clip_norm=clip_norm,
            aggregation=aggregation,
            trim_fraction=trim_fraction,
        )
        for name in names
    ]
    settings = ConnectionSettings(amqp_url=amqp_url, redis_url=redis_url)
    # Off a terminal (CI, logs) rich would wrap the summary table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    _run(run_simulation(spec, strategies, settings, out, console))
