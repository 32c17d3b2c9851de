"""Server optimizers: turn a pseudo-gradient into a step of the global model (Reddi et al. 2021).

The pseudo-gradient `g` is the averaged client delta, so it already points in the improving
direction and every rule *adds* to the model. Following Algorithm 2 of "Adaptive Federated
Optimization", there is no bias correction, the first moment starts at 0 and the second at
tau^2. State is kept per key, in the accumulation dtype, created on the first step.
A pseudo-gradient may carry only some keys (partial updates): the others are not stepped and
their state does not move either.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol

import torch
from torch import Tensor

from aggregator.strategies.aggregate import (
    Tensors,
    accumulation_dtype,
    apply_delta_,
    folded_pairs,
    zeros_like,
)
from schemas.messages import StrategyConfig


class ServerOptimizer(Protocol):
    """One server-side update rule with whatever state it carries between versions."""

    def step_(self, model: MutableMapping[str, Tensor], pseudo_grad: Tensors) -> None:
        """Update the floating entries of `model` in place from the pseudo-gradient."""
        ...

    def reset(self) -> None:
        """Forget the optimizer state, as if no step had been taken."""
        ...


class PlainStep:
    """x <- x + lr * g: FedAvg's and FedBuff's server step."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step_(self, model: MutableMapping[str, Tensor], pseudo_grad: Tensors) -> None:
        """Add `lr * g` to the model."""
        apply_delta_(model, pseudo_grad, self.lr, partial=True)

    def reset(self) -> None:
        """Keep nothing: the plain step has no state."""


class FedAvgM:
    """m <- beta1 m + g; x <- x + lr m (server momentum)."""

    def __init__(self, lr: float, beta1: float) -> None:
        self.lr = lr
        self.beta1 = beta1
        self._m: dict[str, Tensor] | None = None

    def step_(self, model: MutableMapping[str, Tensor], pseudo_grad: Tensors) -> None:
        """Fold `g` into the momentum and step the model along it."""
        folded_pairs(model, pseudo_grad, partial=True)  # check before the momentum moves
        if self._m is None:
            self._m = zeros_like(model)
        stepped: dict[str, Tensor] = {}
        for name, m, g in folded_pairs(self._m, pseudo_grad, partial=True):
            stepped[name] = m.mul_(self.beta1).add_(g)
        apply_delta_(model, stepped, self.lr, partial=True)

    def reset(self) -> None:
        """Drop the momentum."""
        self._m = None


class FedAdam:
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; x <- x + lr m / (sqrt(v) + tau)."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: dict[str, Tensor] | None = None
        self._v: dict[str, Tensor] | None = None

    def _second_moment_(self, v: Tensor, g: Tensor) -> None:
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)

    def step_(self, model: MutableMapping[str, Tensor], pseudo_grad: Tensors) -> None:
        """Update both moments from `g` and take the adaptive step."""
        folded_pairs(model, pseudo_grad, partial=True)  # check before the moments move
        if self._m is None or self._v is None:
            self._m = zeros_like(model)
            self._v = {name: torch.full_like(t, self.tau**2) for name, t in self._m.items()}
        step: dict[str, Tensor] = {}
        for name, m, g in folded_pairs(self._m, pseudo_grad, partial=True):
            g_acc = g.to(accumulation_dtype(g.dtype))
            v = self._v[name]
            m.mul_(self.beta1).add_(g_acc, alpha=1.0 - self.beta1)
            self._second_moment_(v, g_acc)
            step[name] = m / (v.sqrt() + self.tau)
        apply_delta_(model, step, self.lr, partial=True)

    def reset(self) -> None:
        """Drop both moments."""
        self._m = None
        self._v = None


class FedYogi(FedAdam):
    """As FedAdam, but v <- v - (1-b2) g^2 sign(v - g^2), so v grows only as fast as g^2 needs."""

    def _second_moment_(self, v: Tensor, g: Tensor) -> None:
        g2 = g * g
        v.addcmul_(g2, torch.sign(v - g2), value=-(1.0 - self.beta2))


def server_optimizer(cfg: StrategyConfig) -> ServerOptimizer:
    """Build the server optimizer the config names, with lr = cfg.server_lr."""
    if cfg.server_optimizer == "none":
        return PlainStep(cfg.server_lr)
    if cfg.server_optimizer == "fedavgm":
        return FedAvgM(cfg.server_lr, cfg.beta1)
    if cfg.server_optimizer == "fedadam":
        return FedAdam(cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau)
    if cfg.server_optimizer == "fedyogi":
        return FedYogi(cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau)
    raise ValueError(f"unknown server optimizer {cfg.server_optimizer!r}")
