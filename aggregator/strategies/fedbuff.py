"""FedBuff (Nguyen et al. 2022): buffer K updates, then step the global model once.

acc += w_i s(tau_i) delta_i and W += w_i for each update; after K of them the pseudo-gradient
g = acc / W goes through the server optimizer (x += server_lr * g without one). Only the running
sum is kept, never the list of deltas, so memory stays O(model) whatever K is.

Against untrusted devices (docs/robust.md): with `clip_norm` each delta is scaled down to that
global L2 norm before it is folded; with aggregation "median" or "trimmed_mean" the buffer
keeps the K scaled deltas instead of the sum (memory K x model) and g is their coordinate-wise
robust reduction, which ignores the weights w_i.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

from torch import Tensor

from aggregator.strategies.base import Admission, Contribution, Receipt, admit_async
from aggregator.strategies.robust import Aggregation, clip_factor, make_buffer
from aggregator.strategies.server_optimizers import ServerOptimizer, server_optimizer
from aggregator.strategies.staleness import StalenessFn, staleness_function
from schemas.messages import StrategyConfig

Weighting = Literal["samples", "uniform"]


def update_weight(receipt: Receipt, weighting: Weighting) -> float:
    """Return an update's weight w_i: its sample count, or 1 under uniform weighting."""
    return float(receipt.num_samples) if weighting == "samples" else 1.0


class FedBuff:
    """Accumulate staleness-weighted deltas and emit a version every `buffer_size` updates."""

    name: str = "fedbuff"
    needs_base_model: bool = False

    def __init__(
        self,
        buffer_size: int,
        staleness: StalenessFn,
        max_staleness: int,
        optimizer: ServerOptimizer,
        weighting: Weighting = "samples",
        *,
        clip_norm: float | None = None,
        aggregation: Aggregation = "mean",
        trim_fraction: float = 0.2,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.optimizer = optimizer
        self.weighting: Weighting = weighting
        self.clip_norm = clip_norm
        self.aggregation: Aggregation = aggregation
        # "mean" keeps a running sum (O(model)); a robust reducer keeps all K deltas.
        self._buffer = make_buffer(aggregation, trim_fraction)

    @classmethod
    def from_config(cls, cfg: StrategyConfig) -> FedBuff:
        """Build FedBuff from the job's strategy config."""
        return cls(
            cfg.buffer_size,
            staleness_function(cfg.staleness),
            cfg.max_staleness,
            server_optimizer(cfg),
            cfg.weighting,
            clip_norm=cfg.clip_norm,
            aggregation=cfg.aggregation,
            trim_fraction=cfg.trim_fraction,
        )

    def admit(self, *, base_version: int, version: int, device_id: str) -> Admission:
        """Refuse a future base or one more than max_staleness versions old."""
        return admit_async(
            base_version=base_version, version=version, max_staleness=self.max_staleness
        )

    def add(
        self, model: MutableMapping[str, Tensor], contribution: Contribution
    ) -> list[Receipt] | None:
        """Fold one update into the buffer; when it holds K, step `model` and return them."""
        receipt = contribution.receipt
        self._buffer.add(
            model,
            contribution,
            update_weight(receipt, self.weighting),
            self.staleness(receipt.staleness) * clip_factor(contribution.delta, self.clip_norm),
        )
        if len(self._buffer) < self.buffer_size:
            return None
        pseudo_grad, receipts = self._buffer.take()
        self.optimizer.step_(model, pseudo_grad)
        return receipts

    def pending(self) -> list[str]:
        """List the update ids in the buffer, oldest first."""
        return self._buffer.pending()

    def reset(self) -> None:
        """Drop the buffer; the server optimizer's state belongs to committed versions and stays."""
        self._buffer.clear()
