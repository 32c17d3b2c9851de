"""The strategy interface, the records it exchanges with the service, and shared admission rules.

A strategy owns no I/O: the service decodes and validates an update, asks `admit`, hands the
delta to `add`, and commits whatever model `add` says is a new version.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from aggregator.strategies.aggregate import (
    accumulation_dtype,
    add_all_,
    check_carried,
    folded_pairs,
)
from aggregator.strategies.staleness import within_max_staleness
from schemas.errors import RejectReason

Admission = tuple[RejectReason, str] | None


@dataclass(frozen=True)
class Receipt:
    """What a committed version records about one update that went into it."""

    update_id: str
    device_id: str
    staleness: int
    num_samples: int

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


@dataclass(frozen=True)
class Contribution:
    """One admitted update: its receipt, the version it started from and its delta."""

    receipt: Receipt
    base_version: int
    # x_k - x_base, already in the model's dtypes.
    delta: Mapping[str, Tensor]
    # x_base, given only when the strategy's `needs_base_model` is true.
    base_model: Mapping[str, Tensor] | None = None
    # A partial update carries only some keys (its trainable ones); the others stay as they are.
    partial: bool = False


class Strategy(Protocol):
    """Fold admitted updates into the global model and say when a new version results."""

    name: str
    needs_base_model: bool

    def admit(self, *, base_version: int, version: int, device_id: str) -> Admission:
        """Say why an update with this base may not be folded now (reason, detail), or None."""
        ...

    def add(
        self, model: MutableMapping[str, Tensor], contribution: Contribution
    ) -> list[Receipt] | None:
        """Fold one admitted update; on a new version, update `model` and return its receipts."""
        ...

    def pending(self) -> list[str]:
        """List the update ids folded into the buffer but not yet part of a returned version."""
        ...

    def reset(self) -> None:
        """Forget the buffer (the service calls it when it gives its deliveries back)."""
        ...


def admit_future(*, base_version: int, version: int) -> Admission:
    """Refuse a base version the global model has not reached."""
    if base_version > version:
        return (
            RejectReason.FUTURE_BASE_VERSION,
            f"base version {base_version} is ahead of the current version {version}",
        )
    return None


def admit_async(*, base_version: int, version: int, max_staleness: int) -> Admission:
    """Refuse a future base, or one more than `max_staleness` versions behind."""
    refusal = admit_future(base_version=base_version, version=version)
    if refusal is not None:
        return refusal
    tau = version - base_version
    if not within_max_staleness(tau, max_staleness):
        return (RejectReason.TOO_STALE, f"staleness {tau} exceeds max_staleness {max_staleness}")
    return None


class ReceiptLedger:
    """The receipts of the updates in a buffer, in arrival order, each update at most once."""

    def __init__(self) -> None:
        self._receipts: list[Receipt] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._receipts)

    def _check_new(self, receipt: Receipt) -> None:
        # A redelivered update still in the buffer would otherwise count twice.
        if receipt.update_id in self._ids:
            raise ValueError(f"update {receipt.update_id} is already in the buffer")

    def _record(self, receipt: Receipt) -> None:
        self._receipts.append(receipt)
        self._ids.add(receipt.update_id)

    def pending(self) -> list[str]:
        """List the update ids in the buffer, oldest first."""
        return [r.update_id for r in self._receipts]

    def _forget_receipts(self) -> list[Receipt]:
        receipts = self._receipts
        self._receipts = []
        self._ids = set()
        return receipts


class WeightedBuffer(ReceiptLedger):
    """Running weighted sums of deltas, one per key, with the receipts in them; O(model) memory.

    Every key keeps its own total weight, so a key that only some updates carry (partial
    updates) is averaged over those: sum_i w_i f_i delta_i[k] / sum_i w_i over the i that
    carry k. With full updates every key has the same total and this is the plain mean.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sum: dict[str, Tensor] = {}
        self._weight: dict[str, float] = {}
        # The sums of the last mean taken, reused as the next buffer's sums: a fresh
        # model-sized allocation costs a page fault per page, more than the arithmetic.
        self._spare: dict[str, Tensor] = {}

    def add(
        self,
        model: Mapping[str, Tensor],
        contribution: Contribution,
        weight: float,
        factor: float = 1.0,
    ) -> None:
        """Add `weight * factor * delta` to the sums and `weight` to each carried key's total."""
        self._check_new(contribution.receipt)
        check_carried(model, contribution.delta, partial=contribution.partial)
        # All keys and shapes are checked here, before any sum is touched.
        pairs = folded_pairs(model, contribution.delta, partial=contribution.partial)
        alpha = weight * factor
        sums: list[Tensor] = []
        deltas: list[Tensor] = []
        for name, m, d in pairs:
            acc = self._sum.get(name)
            if acc is None:
                # Created on first sight (an adapter-only job never allocates the backbone) as
                # alpha * delta itself: a zero-filled sum would cost one more pass over memory.
                self._sum[name] = self._scaled(name, d, accumulation_dtype(m.dtype), alpha)
            else:
                sums.append(acc)
                deltas.append(d)
            self._weight[name] = self._weight.get(name, 0.0) + weight
        add_all_(sums, deltas, alpha)
        self._record(contribution.receipt)

    def _scaled(self, name: str, delta: Tensor, dtype: torch.dtype, alpha: float) -> Tensor:
        """Return `alpha * delta` in `dtype`, in the spare storage of `name` if it fits."""
        spare = self._spare.pop(name, None)
        if spare is None or spare.shape != delta.shape or spare.dtype != dtype:
            return _scaled_copy(delta, dtype, alpha)
        if delta.dtype == dtype:
            return torch.mul(delta, alpha, out=spare)
        return spare.copy_(delta).mul_(alpha)

    def take_mean(self) -> tuple[dict[str, Tensor], list[Receipt]]:
        """Return each key's sum / its total weight and the receipts, and empty the buffer.

        The returned tensors are valid until the next `add`, which reuses their storage.
        """
        if not len(self):
            raise ValueError("the buffer is empty")
        mean = self._sum
        # The sums are ours and dropped right after, so dividing in place saves a model copy;
        # one call for all keys, as in `add`.
        torch._foreach_mul_(list(mean.values()), [1.0 / self._weight[name] for name in mean])
        receipts = self._forget_receipts()
        self.clear()
        self._spare = mean
        return mean, receipts

    def take(self) -> tuple[dict[str, Tensor], list[Receipt]]:
        """Return the buffer's reduction (its weighted mean) and receipts, and empty it."""
        return self.take_mean()

    def clear(self) -> None:
        """Drop the sums and the receipts."""
        self._sum = {}
        self._weight = {}
        self._forget_receipts()


def _scaled_copy(tensor: Tensor, dtype: torch.dtype, alpha: float) -> Tensor:
    """Return `alpha * tensor` as a new tensor of `dtype`, multiplied in `dtype`."""
    if tensor.dtype == dtype:
        return torch.mul(tensor, alpha)
    # Widen first, so a half-precision delta is scaled at the sum's precision.
    return tensor.to(dtype).mul_(alpha)
