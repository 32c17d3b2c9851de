"""Typer option types shared by the commands that take a job's hyper-parameters.

Defaults come from the schema models, so the CLI and a stored JobConfig never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from device_agent.tasks import TASKS
from infra.logs import parse_log_format
from schemas import StalenessConfig, StrategyConfig, TrainingConfig

STRATEGY = StrategyConfig()
TRAINING = TrainingConfig()
STRATEGY_NAMES = ("fedbuff", "fedasync", "fedavg")
StrategyName = Literal["fedbuff", "fedasync", "fedavg"]


def _task_name(value: str) -> str:
    if value not in TASKS:
        raise typer.BadParameter(f"unknown task {value!r}; known: {', '.join(sorted(TASKS))}")
    return value


Job = Annotated[
    str, typer.Option("--job", "-j", envvar="FEDQ_JOB", help="Job id (letters, digits, _.-).")
]
AmqpUrl = Annotated[
    str, typer.Option(envvar="FEDQ_AMQP_URL", help="RabbitMQ URL (amqp:// or amqps://).")
]
RedisUrl = Annotated[
    str, typer.Option(envvar="FEDQ_REDIS_URL", help="Redis URL (redis:// or rediss://).")
]
LogLevel = Annotated[str, typer.Option(envvar="FEDQ_LOG_LEVEL", help="Logging level.")]
KeyFile = Annotated[
    Path | None,
    typer.Option(
        envvar="FEDQ_DEVICE_KEY_FILE",
        exists=True,
        dir_okay=False,
        help="A private key from `fedq device add`: sign every update (an edge aggregator: "
        "its key at the root job).",
    ),
]


def _log_format(value: str) -> str:
    try:
        return parse_log_format(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


LogFormatOption = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar="FEDQ_LOG_FORMAT",
        callback=_log_format,
        help="Log lines as readable text or json (one object per line).",
    ),
]
Task = Annotated[str, typer.Option(callback=_task_name, help=f"Task: {', '.join(sorted(TASKS))}.")]
Strategy = Annotated[
    StrategyName,
    typer.Option(
        help="fedbuff (buffered async), fedasync (one version per update), "
        "fedavg (synchronous rounds, the baseline)."
    ),
]
BufferSize = Annotated[
    int, typer.Option(min=1, help="FedBuff: updates per version (K). FedAvg: devices per round.")
]
Alpha = Annotated[float, typer.Option(min=0.0, max=1.0, help="FedAsync mixing weight.")]
Staleness = Annotated[
    Literal["constant", "polynomial", "hinge", "sqrt"],
    typer.Option(
        help="Staleness weight s(tau): constant 1, polynomial (tau+1)^-a, "
        "hinge (1 up to b, then 1/(a(tau-b)+1)), sqrt 1/sqrt(1+tau)."
    ),
]
StalenessA = Annotated[float, typer.Option(min=0.0, help="The a of polynomial/hinge.")]
StalenessB = Annotated[int, typer.Option(min=0, help="The b of hinge.")]
MaxStaleness = Annotated[
    int, typer.Option(min=0, help="Updates staler than this many versions are rejected.")
]
ServerLr = Annotated[float, typer.Option(min=0.0, help="Server learning rate eta_g.")]
ServerOptimizer = Annotated[
    Literal["none", "fedavgm", "fedadam", "fedyogi"],
    typer.Option(help="Server optimizer over the averaged delta (FedBuff and FedAvg)."),
]
Weighting = Annotated[
    Literal["samples", "uniform"], typer.Option(help="Weight updates by sample count or 1.")
]
ClipNorm = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Scale each update's delta down to this global L2 norm before folding it "
        "(all strategies; default: no clipping).",
    ),
]
Aggregation = Annotated[
    Literal["mean", "median", "trimmed_mean"],
    typer.Option(
        help="FedBuff/FedAvg buffer reduction: mean, or coordinate-wise median / trimmed_mean "
        "(robust to a minority of bad devices; keeps all K deltas in memory, ignores weights).",
    ),
]
TrimFraction = Annotated[
    float,
    typer.Option(
        min=0.0, max=0.49, help="trimmed_mean: fraction cut from each end of every coordinate."
    ),
]
LocalEpochs = Annotated[int, typer.Option(min=1, help="Local epochs per round.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Local minibatch size.")]
Lr = Annotated[float, typer.Option(min=0.0, help="Local learning rate.")]
Optimizer = Annotated[Literal["sgd", "adam"], typer.Option(help="Local optimizer.")]
ProxMu = Annotated[float, typer.Option(min=0.0, help="FedProx proximal term mu (0: off).")]
Dirichlet = Annotated[
    float, typer.Option(min=0.0, help="Dirichlet alpha of the non-IID split (small: skewed).")
]
Seed = Annotated[int, typer.Option(min=0, help="Seed of the model init and the split.")]


def strategy_config(
    name: StrategyName,
    *,
    buffer_size: int,
    alpha: float,
    staleness: str,
    staleness_a: float,
    staleness_b: int,
    max_staleness: int,
    server_lr: float,
    server_optimizer: str,
    weighting: str,
    clip_norm: float | None = STRATEGY.clip_norm,
    aggregation: str = STRATEGY.aggregation,
    trim_fraction: float = STRATEGY.trim_fraction,
) -> StrategyConfig:
    """Build a validated StrategyConfig from command-line values."""
    return StrategyConfig.model_validate(
        {
            "name": name,
            "staleness": StalenessConfig.model_validate(
                {"name": staleness, "a": staleness_a, "b": staleness_b}
            ),
            "max_staleness": max_staleness,
            "alpha": alpha,
            "buffer_size": buffer_size,
            "server_lr": server_lr,
            "server_optimizer": server_optimizer,
            "weighting": weighting,
            "clip_norm": clip_norm,
            "aggregation": aggregation,
            "trim_fraction": trim_fraction,
        }
    )
