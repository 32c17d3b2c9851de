"""Edge aggregation: fold K device updates into one partial update for an upstream job.

The partial's delta is the sample-weighted mean of the device deltas and its sample count is
their sum, so an upstream FedBuff that weights by samples gives it the weight
sum(n_i) * s(tau) and moves the model by sum(n_i s(tau) delta_i) / W: exactly what it would
have done with the K device updates themselves, when they share a base version (one tau).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from aggregator.strategies.aggregate import accumulate_, check_keys, zeros_like

Tensors = Mapping[str, Tensor]
# A fixed namespace: the same contributing ids give the same partial id on every edge and
# after every restart, which is what lets the upstream aggregator dedupe a re-forwarded one.
PARTIAL_NAMESPACE = uuid.UUID("6f1c2a3e-7b0d-5e4f-9a8b-1c2d3e4f5a6b")


def partial_update_id(update_ids: Iterable[str]) -> str:
    """Return the partial update's id: uuid5 over the sorted contributing update ids."""
    ids = sorted(set(update_ids))
    if not ids:
        raise ValueError("a partial update needs at least one contributing update")
    return str(uuid.uuid5(PARTIAL_NAMESPACE, "\n".join(ids)))


def combine_partial(parts: Sequence[tuple[Tensors, int]]) -> tuple[dict[str, Tensor], int]:
    """Return (sample-weighted mean delta, total samples) of (delta, num_samples) pairs.

    Floating entries are averaged in their accumulation dtype and returned in the dtype of
    the first delta; other entries (counters, masks) are not folded by any strategy, so the
    first delta's value is passed on to keep the payload's key set complete.
    """
    if not parts:
        raise ValueError("a partial update needs at least one contributing update")
    first = parts[0][0]
    total = 0
    acc = zeros_like(first)
    for delta, num_samples in parts:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_keys(first, delta)
        accumulate_(acc, delta, float(num_samples))
        total += num_samples
    out: dict[str, Tensor] = {}
    for name, t in first.items():
        if t.is_floating_point():
            out[name] = (acc[name] / total).to(t.dtype)
        else:
            out[name] = t.clone()
    return out, total


__all__ = ["combine_partial", "partial_update_id"]
