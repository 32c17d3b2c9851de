"""The `fedq` command line: create jobs, run the aggregator, agents and evaluator, and watch."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import torch
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from aggregator.runner import serve as serve_aggregator
from aggregator.service import Fenced
from device_agent.runner import serve_agent, serve_evaluator
from fedq import options as opt
from fedq.jobs import create_job, initial_job, job_status
from infra.connect import open_broker, open_store
from infra.errors import BackendUnavailable, JobExists, JobNotFound
from infra.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_REDIS_URL,
    AgentSettings,
    AggregatorSettings,
    ConnectionSettings,
)
from schemas import TrainingConfig

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
    pretty_exceptions_enable=False,
)
job_app = typer.Typer(help="Create or delete federated jobs.", no_args_is_help=True)
app.add_typer(job_app, name="job")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(1)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning the errors a user can fix into one-line messages."""
    try:
        return asyncio.run(coroutine)
    except JobNotFound as exc:
        raise _fail(f"job not found ({exc}); create it with `fedq job create`") from None
    except JobExists as exc:
        raise _fail(f"job already exists ({exc}); pass --if-not-exists to accept it") from None
    except BackendUnavailable as exc:
        raise _fail(f"cannot reach RabbitMQ or Redis: {exc}") from None
    except Fenced as exc:
        raise _fail(f"fenced by another aggregator: {exc}") from None
    except ValidationError as exc:
        raise _fail(str(exc).splitlines()[0] + ": " + str(exc).splitlines()[-1]) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
        config, model, meta = initial_job(job, task, strategy_config, training)
        broker = await open_broker(settings)
        store = open_store(settings, job)
        try:
            await create_job(store, broker, config, model, meta)
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
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
    log_level: opt.LogLevel = "INFO",
) -> None:
    """Run the aggregator of a job until SIGTERM (same as `python -m aggregator`)."""
    _logging(log_level)
    settings = AggregatorSettings(
        job=job,
        amqp_url=amqp_url,
        redis_url=redis_url,
        prefetch=prefetch,
        idle_exit_seconds=idle_exit,
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
    amqp_url: opt.AmqpUrl = DEFAULT_AMQP_URL,
    redis_url: opt.RedisUrl = DEFAULT_REDIS_URL,
    log_level: opt.LogLevel = "INFO",
) -> None:
    """Run one device: fetch the latest model, train on the local shard, publish, repeat."""
    _logging(log_level)
    torch.set_num_threads(1)
    settings = AgentSettings(
        job=job,
        device_id=device_id,
        num_devices=num_devices,
        dirichlet=dirichlet,
        updates=updates,
        slowdown=slowdown,
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
) -> None:
    """Evaluate every new global version on the held-out split and record its accuracy."""
    _logging(log_level)
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
    """Show a job's version, latest accuracy, applied and dead-lettered updates, queue depth."""
    settings = ConnectionSettings(amqp_url=amqp_url, redis_url=redis_url)

    async def read() -> dict[str, Any]:
        broker = await open_broker(settings)
        store = open_store(settings, job)
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
    table = Table(title=f"fedq job {job}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    Console().print(table)


async def _watch(
    settings: ConnectionSettings, job: str, interval: float, duration: float | None
) -> None:
    """Print one progress line per interval: version, accuracy, applied and rejected counts."""
    store = open_store(settings, job)
    started = time.monotonic()
    try:
        while duration is None or time.monotonic() - started < duration:
            s = await job_status(store)
            accuracy = "  n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
            typer.echo(
                f"{time.monotonic() - started:6.0f}s  version {s['version']:4d}  "
                f"accuracy {accuracy} (v{s['evaluated_version']})  "
                f"applied {s['applied_updates']:5d}  dead-lettered {s['dead_lettered']}"
            )
            await asyncio.sleep(interval)
    finally:
        await store.close()
