"""Synchronous FedAvg: the baseline that asynchronous strategies are measured against.

A round collects `buffer_size` (M) updates trained from the current version, at most one per
device, and steps the model by their weighted mean delta. Anything trained from an older
version is refused as STALE_ROUND: in synchronous FL it missed its round.

`clip_norm`, `aggregation` and `trim_fraction` work as in FedBuff (docs/robust.md).
"""

from __future__ import annotations

from collections.abc import MutableMapping

from torch import Tensor

from aggregator.strategies.base import Admission, Contribution, Receipt, admit_future
from aggregator.strategies.fedbuff import Weighting, update_weight
from aggregator.strategies.robust import Aggregation, clip_factor, make_buffer
from aggregator.strategies.server_optimizers import ServerOptimizer, server_optimizer
from schemas.errors import RejectReason
from schemas.messages import StrategyConfig


class FedAvg:
    """Collect one round of M fresh updates, then step the model by their mean delta."""

    name: str = "fedavg"
    needs_base_model: bool = False

    def __init__(
        self,
        round_size: int,
        optimizer: ServerOptimizer,
        weighting: Weighting = "samples",
        *,
        clip_norm: float | None = None,
        aggregation: Aggregation = "mean",
        trim_fraction: float = 0.2,
    ) -> None:
        if round_size < 1:
            raise ValueError(f"round_size must be >= 1, got {round_size}")
        self.round_size = round_size
        self.optimizer = optimizer
        self.weighting: Weighting = weighting
        self.clip_norm = clip_norm
        self.aggregation: Aggregation = aggregation
        # "mean" keeps a running sum (O(model)); a robust reducer keeps all M deltas.
        self._buffer = make_buffer(aggregation, trim_fraction)
        self._devices: set[str] = set()
        self._round_version: int | None = None

    @classmethod
    def from_config(cls, cfg: StrategyConfig) -> FedAvg:
        """Build FedAvg from the job's strategy config (M = cfg.buffer_size)."""
        return cls(
            cfg.buffer_size,
            server_optimizer(cfg),
            cfg.weighting,
            clip_norm=cfg.clip_norm,
            aggregation=cfg.aggregation,
            trim_fraction=cfg.trim_fraction,
        )

    def admit(self, *, base_version: int, version: int, device_id: str) -> Admission:
        """Refuse a future or older base, and a second update from a device in this round."""
        refusal = admit_future(base_version=base_version, version=version)
        if refusal is not None:
            return refusal
        if base_version < version:
            return (
                RejectReason.STALE_ROUND,
                f"base version {base_version} missed its round; the round is on {version}",
            )
        if device_id in self._devices:
            return (
                RejectReason.DUPLICATE_DEVICE_IN_ROUND,
                f"device {device_id!r} already has an update in round {version}",
            )
        return None

    def add(
        self, model: MutableMapping[str, Tensor], contribution: Contribution
    ) -> list[Receipt] | None:
        """Fold one update into the round; when it holds M, step `model` and return them."""
        receipt = contribution.receipt
        # admit() guards these; a mismatch here means the service skipped it or a reset().
        if self._round_version is not None and contribution.base_version != self._round_version:
            raise ValueError(
                f"update based on {contribution.base_version} added to round {self._round_version}"
            )
        if receipt.device_id in self._devices:
            raise ValueError(f"device {receipt.device_id!r} is already in this round")
        self._buffer.add(
            model,
            contribution,
            update_weight(receipt, self.weighting),
            clip_factor(contribution.delta, self.clip_norm),
        )
        self._round_version = contribution.base_version
        self._devices.add(receipt.device_id)
        if len(self._buffer) < self.round_size:
            return None
        round_delta, receipts = self._buffer.take()
        self.optimizer.step_(model, round_delta)
        self.reset()
        return receipts

    def pending(self) -> list[str]:
        """List the update ids in the round, oldest first."""
        return self._buffer.pending()

    def reset(self) -> None:
        """Drop the round in progress."""
        self._buffer.clear()
        self._devices = set()
        self._round_version = None
