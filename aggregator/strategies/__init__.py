"""Pure aggregation math: staleness functions, FedAsync, FedBuff, FedAvg, server optimizers.

Nothing here does I/O or touches the event loop; the aggregator service coordinates.
"""

from __future__ import annotations

from aggregator.strategies.base import Admission, Contribution, Receipt, Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff
from aggregator.strategies.server_optimizers import ServerOptimizer, server_optimizer
from aggregator.strategies.staleness import StalenessFn, staleness_function
from schemas.messages import StrategyConfig

__all__ = [
    "Admission",
    "Contribution",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "Receipt",
    "ServerOptimizer",
    "StalenessFn",
    "Strategy",
    "build_strategy",
    "server_optimizer",
    "staleness_function",
]


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """Build the strategy the config names."""
    if cfg.name == "fedasync":
        return FedAsync.from_config(cfg)
    if cfg.name == "fedbuff":
        return FedBuff.from_config(cfg)
    if cfg.name == "fedavg":
        return FedAvg.from_config(cfg)
    raise ValueError(f"unknown strategy {cfg.name!r}")
