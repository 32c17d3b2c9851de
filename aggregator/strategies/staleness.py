"""Staleness functions s(tau): how much an update computed tau versions ago still counts.

Each is a plain function of tau (and its parameters); `staleness_function` picks one from the
job config so that a strategy receives it as a value and never branches on names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from schemas.messages import StalenessConfig

StalenessFn = Callable[[int], float]


def _check_tau(tau: int) -> None:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")


def constant(tau: int) -> float:
    """Weight every update fully, however stale."""
    _check_tau(tau)
    return 1.0


def polynomial(tau: int, a: float) -> float:
    """Return (tau + 1)^-a (Xie et al. 2019)."""
    _check_tau(tau)
    return float((tau + 1) ** -a)


def hinge(tau: int, a: float, b: int) -> float:
    """Return 1 up to staleness b, then 1 / (a (tau - b) + 1) (Xie et al. 2019)."""
    _check_tau(tau)
    if tau <= b:
        return 1.0
    return 1.0 / (a * (tau - b) + 1.0)


def inverse_sqrt(tau: int) -> float:
    """Return 1 / sqrt(1 + tau), FedBuff's choice (Nguyen et al. 2022)."""
    _check_tau(tau)
    return 1.0 / math.sqrt(1.0 + tau)


def within_max_staleness(tau: int, max_staleness: int) -> bool:
    """Say whether an update of staleness tau may still be folded."""
    _check_tau(tau)
    return tau <= max_staleness


def staleness_function(cfg: StalenessConfig) -> StalenessFn:
    """Choose the staleness function the config names, with its parameters bound."""
    if cfg.name == "constant":
        return constant
    if cfg.name == "polynomial":
        return partial(polynomial, a=cfg.a)
    if cfg.name == "hinge":
        return partial(hinge, a=cfg.a, b=cfg.b)
    if cfg.name == "sqrt":
        return inverse_sqrt
    raise ValueError(f"unknown staleness function {cfg.name!r}")
