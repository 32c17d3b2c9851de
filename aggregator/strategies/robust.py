"""Defences against untrusted devices: norm clipping and coordinate-wise robust reducers.

Clipping bounds how far any single update can move the model. The median and the trimmed
mean replace the buffer's weighted mean so that a minority of arbitrary updates cannot drag
a coordinate outside the range the honest updates span. Both reducers need all K deltas at
once, so `StackedBuffer` keeps them (memory K x model) where `WeightedBuffer` keeps one sum.
Sample weights are ignored by both: a device could claim any `num_samples`, and weighting by
a number the attacker chooses would hand it the very leverage the reducer takes away.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from aggregator.strategies.aggregate import (
    accumulation_dtype,
    check_carried,
    folded_pairs,
    scale_,
)
from aggregator.strategies.base import Contribution, Receipt, ReceiptLedger, WeightedBuffer

Tensors = Mapping[str, Tensor]
Aggregation = Literal["mean", "median", "trimmed_mean"]
Reducer = Callable[[Sequence[Tensors]], dict[str, Tensor]]


def global_norm(tensors: Tensors) -> float:
    """Return the L2 norm of all floating entries taken together as one vector."""
    # float64: squares of float32 values near their maximum would overflow to inf.
    total = sum(
        float(torch.linalg.vector_norm(t.double()) ** 2)
        for t in tensors.values()
        if t.is_floating_point()
    )
    return math.sqrt(total)


def clip_factor(tensors: Tensors, max_norm: float | None) -> float:
    """Return the factor that brings the global norm down to `max_norm` (1 if within it)."""
    if max_norm is None:
        return 1.0
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(tensors)
    return 1.0 if norm <= max_norm else max_norm / norm


def clip_by_norm_(tensors: MutableMapping[str, Tensor], max_norm: float) -> float:
    """Scale the floating entries down in place so their global norm is at most `max_norm`.

    Returns the factor applied (1.0 when the norm was within the bound).
    """
    factor = clip_factor(tensors, max_norm)
    if factor < 1.0:
        scale_(tensors, factor)
    return factor


def _stacked(deltas: Sequence[Tensors]) -> dict[str, Tensor]:
    """Stack each floating key over the deltas (dim 0), checking keys and shapes first."""
    if not deltas:
        raise ValueError("cannot reduce an empty list of deltas")
    first = deltas[0]
    for other in deltas[1:]:
        folded_pairs(first, other)  # raises on a key or shape mismatch before any work
    return {
        name: torch.stack([d[name].to(accumulation_dtype(t.dtype)) for d in deltas])
        for name, t in first.items()
        if t.is_floating_point()
    }


def coordinate_median(deltas: Sequence[Tensors]) -> dict[str, Tensor]:
    """Return the coordinate-wise median; with an even count, the mean of the middle two."""
    out: dict[str, Tensor] = {}
    for name, stack in _stacked(deltas).items():
        # torch.median returns the lower middle value for an even count, which would favour
        # whichever side of the split is smaller; averaging the two middles is symmetric.
        ordered = stack.sort(dim=0).values
        n = ordered.shape[0]
        out[name] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return out


def trim_count(n: int, trim_fraction: float) -> int:
    """Return how many values are dropped from each end: floor(trim_fraction * n)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    # The epsilon keeps 0.2 * 5 from flooring to 0 through binary rounding.
    return math.floor(trim_fraction * n + 1e-9)


def trimmed_mean(deltas: Sequence[Tensors], trim_fraction: float) -> dict[str, Tensor]:
    """Return the coordinate-wise mean after dropping floor(trim_fraction * n) from each end."""
    k = trim_count(len(deltas), trim_fraction)
    out: dict[str, Tensor] = {}
    for name, stack in _stacked(deltas).items():
        ordered = stack.sort(dim=0).values
        out[name] = ordered[k : ordered.shape[0] - k].mean(dim=0)
    return out


def reducer(aggregation: Aggregation, trim_fraction: float) -> Reducer:
    """Return the robust reducer `aggregation` names ("mean" has none: it needs no stack)."""
    if aggregation == "median":
        return coordinate_median
    if aggregation == "trimmed_mean":
        trim_count(2, trim_fraction)  # validate now, not at the first full buffer
        return lambda deltas: trimmed_mean(deltas, trim_fraction)
    raise ValueError(f"{aggregation!r} is not a robust reducer")


class StackedBuffer(ReceiptLedger):
    """Keep each buffered delta (staleness- and clip-scaled) and reduce them robustly.

    Memory is K x model, against O(model) for `WeightedBuffer`: the median and the trimmed
    mean cannot be computed from a running sum. Weights are accepted and ignored (see module).
    """

    def __init__(self, reduce: Reducer) -> None:
        super().__init__()
        self._reduce = reduce
        # Per key, the scaled deltas of the updates that carry it (all of them, unless some
        # updates are partial): a key is reduced over the updates that carry it.
        self._deltas: dict[str, list[Tensor]] = {}

    def add(
        self,
        model: Mapping[str, Tensor],
        contribution: Contribution,
        weight: float,
        factor: float = 1.0,
    ) -> None:
        """Store `factor * delta` in the accumulation dtype; `weight` is ignored."""
        self._check_new(contribution.receipt)
        check_carried(model, contribution.delta, partial=contribution.partial)
        pairs = folded_pairs(model, contribution.delta, partial=contribution.partial)
        for name, m, d in pairs:
            # A copy, not a view: the caller owns the delta and the factor must not leak into it.
            self._deltas.setdefault(name, []).append(d.to(accumulation_dtype(m.dtype)) * factor)
        self._record(contribution.receipt)

    def take(self) -> tuple[dict[str, Tensor], list[Receipt]]:
        """Return the robust reduction of the buffer and its receipts, and empty it."""
        if not len(self):
            raise ValueError("the buffer is empty")
        reduced = {
            name: self._reduce([{name: d} for d in deltas])[name]
            for name, deltas in self._deltas.items()
        }
        receipts = self._forget_receipts()
        self.clear()
        return reduced, receipts

    def clear(self) -> None:
        """Drop the deltas and the receipts."""
        self._deltas = {}
        self._forget_receipts()


def make_buffer(aggregation: Aggregation, trim_fraction: float) -> WeightedBuffer | StackedBuffer:
    """Return the running-sum buffer for "mean", a stacking one for a robust reducer."""
    if aggregation == "mean":
        return WeightedBuffer()
    return StackedBuffer(reducer(aggregation, trim_fraction))
