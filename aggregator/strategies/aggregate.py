"""The arithmetic of aggregation over `{name: tensor}` state dicts, matched by key.

Only floating-point entries are folded. Integer and bool entries (BatchNorm's
`num_batches_tracked`, masks) are counters or structure, not parameters to average, so the
global model keeps its own value for them and they may be absent from deltas and sums.

Every function checks all keys and shapes before it writes anything, so a mismatch leaves the
destination untouched rather than half-updated. With `partial=True` the source may carry any
subset of the destination's keys (a partial update: only the trainable parameters); the keys
it does not carry are left exactly as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import torch
from torch import Tensor

Tensors = Mapping[str, Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pick the dtype in which sums and optimizer state for `dtype` entries are kept."""
    # A running sum of many half-precision deltas kept in half precision loses their low bits.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_keys(expected: Iterable[str], actual: Iterable[str]) -> None:
    """Raise KeyError naming the first key missing from or unexpected in `actual`."""
    expected_set, actual_set = set(expected), set(actual)
    missing = sorted(expected_set - actual_set)
    if missing:
        raise KeyError(f"missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(actual_set - expected_set)
    if unexpected:
        raise KeyError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")


def check_subset(expected: Iterable[str], actual: Iterable[str]) -> None:
    """Raise KeyError naming the first key of `actual` that `expected` does not have."""
    unexpected = sorted(set(actual) - set(expected))
    if unexpected:
        raise KeyError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")


def check_carried(expected: Iterable[str], actual: Iterable[str], *, partial: bool) -> None:
    """Check `actual` has exactly the keys of `expected`, or only some of them if partial."""
    if partial:
        check_subset(expected, actual)
    else:
        check_keys(expected, actual)


def _floating_keys(tensors: Tensors) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point()]


def folded_pairs(
    dst: Tensors, src: Tensors, *, partial: bool = False
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair the floating entries of `dst` and `src` by key, checking keys and shapes first."""
    keys = _floating_keys(dst)
    carried = _floating_keys(src)
    check_carried(keys, carried, partial=partial)
    if partial:
        keys = [name for name in keys if name in src]
    pairs: list[tuple[str, Tensor, Tensor]] = []
    for name in keys:
        d, s = dst[name], src[name]
        # In-place ops broadcast silently; a (1,) delta must not spread over a (3,) weight.
        if d.shape != s.shape:
            raise ValueError(f"shape mismatch at {name!r}: {tuple(d.shape)} vs {tuple(s.shape)}")
        pairs.append((name, d, s))
    return pairs


def add_all_(dst: list[Tensor], src: list[Tensor], alpha: float = 1.0) -> None:
    """Add `alpha * src[i]` to each `dst[i]` in place, in one call.

    `torch._foreach_add_` (beta; torch.optim's foreach implementations use it) loops in C++:
    an `add_` per tensor costs more than its arithmetic for small tensors (200 tensors of
    125 floats: 93 against 270 us), and models have hundreds of tensors.
    """
    if dst:
        torch._foreach_add_(dst, src, alpha=alpha)


def zeros_like(model: Tensors) -> dict[str, Tensor]:
    """Return zeros for every floating entry of `model`, in its accumulation dtype."""
    return {
        name: torch.zeros_like(t, dtype=accumulation_dtype(t.dtype))
        for name, t in model.items()
        if t.is_floating_point()
    }


def accumulate_(
    acc: MutableMapping[str, Tensor], delta: Tensors, weight: float, *, partial: bool = False
) -> None:
    """Add `weight * delta` to `acc` in place."""
    pairs = folded_pairs(acc, delta, partial=partial)
    add_all_([a for _, a, _ in pairs], [d for _, _, d in pairs], weight)


def apply_delta_(
    model: MutableMapping[str, Tensor], delta: Tensors, scale: float = 1.0, *, partial: bool = False
) -> None:
    """Add `scale * delta` to the floating entries of `model` in place."""
    pairs = folded_pairs(model, delta, partial=partial)
    add_all_([m for _, m, _ in pairs], [d for _, _, d in pairs], scale)


def mix_(
    model: MutableMapping[str, Tensor], target: Tensors, alpha: float, *, partial: bool = False
) -> None:
    """Set model <- (1 - alpha) model + alpha target, in place."""
    for _, m, t in folded_pairs(model, target, partial=partial):
        m.lerp_(t.to(m.dtype), alpha)


def scale_(tensors: MutableMapping[str, Tensor], factor: float) -> None:
    """Multiply the floating entries of `tensors` by `factor` in place."""
    for t in tensors.values():
        if t.is_floating_point():
            t.mul_(factor)


def scaled(tensors: Tensors, factor: float) -> dict[str, Tensor]:
    """Return `factor * tensors` for the floating entries, leaving the input untouched."""
    return {name: t * factor for name, t in tensors.items() if t.is_floating_point()}


def added(base: Tensors, delta: Tensors, *, partial: bool = False) -> dict[str, Tensor]:
    """Return `base + delta` for the floating entries, in the base's dtypes, as new tensors."""
    return {name: b + d.to(b.dtype) for name, b, d in folded_pairs(base, delta, partial=partial)}
