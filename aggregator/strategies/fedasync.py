"""FedAsync (Xie et al. 2019): every update makes a new version at once.

x <- (1 - a_t) x + a_t x_k with a_t = alpha * s(tau) and x_k = x_base + delta_k, so an
update is mixed against the model it was trained from, not against whatever the global model
has become since; that is why the service must hand over x_base.

With `clip_norm`, delta_k is scaled down to that global L2 norm first. The robust reducers
(`aggregation`) do not apply: there is no buffer of updates to take a median over.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from torch import Tensor

from aggregator.strategies.aggregate import added, check_carried, check_keys, mix_, scaled
from aggregator.strategies.base import Admission, Contribution, Receipt, admit_async
from aggregator.strategies.robust import clip_factor
from aggregator.strategies.staleness import StalenessFn, staleness_function
from schemas.messages import StrategyConfig


class FedAsync:
    """Mix each admitted update into the global model with a staleness-scaled weight."""

    name: str = "fedasync"
    needs_base_model: bool = True

    def __init__(
        self,
        alpha: float,
        staleness: StalenessFn,
        max_staleness: int,
        *,
        clip_norm: float | None = None,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.clip_norm = clip_norm

    @classmethod
    def from_config(cls, cfg: StrategyConfig) -> FedAsync:
        """Build FedAsync from the job's strategy config."""
        return cls(
            cfg.alpha,
            staleness_function(cfg.staleness),
            cfg.max_staleness,
            clip_norm=cfg.clip_norm,
        )

    def admit(self, *, base_version: int, version: int, device_id: str) -> Admission:
        """Refuse a future base or one more than max_staleness versions old."""
        return admit_async(
            base_version=base_version, version=version, max_staleness=self.max_staleness
        )

    def mixing_weight(self, tau: int) -> float:
        """Return a_t = alpha * s(tau)."""
        return self.alpha * self.staleness(tau)

    def add(
        self, model: MutableMapping[str, Tensor], contribution: Contribution
    ) -> list[Receipt] | None:
        """Mix x_base + delta into `model` and return this update's receipt."""
        base = contribution.base_model
        if base is None:
            raise ValueError("FedAsync needs the base model of every update")
        partial = contribution.partial
        check_carried(model, contribution.delta, partial=partial)
        check_keys(model, base)
        # x_base may be `model` itself (tau == 0): build the target before mutating anything.
        delta = contribution.delta
        factor = clip_factor(delta, self.clip_norm)
        if factor < 1.0:
            # A scaled copy: the caller's delta must stay as it arrived.
            delta = scaled(delta, factor)
        # A partial update moves only the keys it carries; the others keep the global value.
        target = added(base, delta, partial=partial)
        mix_(model, target, self.mixing_weight(contribution.receipt.staleness), partial=partial)
        return [contribution.receipt]

    def pending(self) -> list[str]:
        """Return nothing: FedAsync never buffers."""
        return []

    def reset(self) -> None:
        """Do nothing: FedAsync never buffers."""
