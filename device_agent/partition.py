"""Split a labelled training set among devices, non-IID, with a per-class Dirichlet draw.

The split follows the benchmark convention of Hsu et al. 2019 / Yurochkin et al. 2019: for
every class, proportions over the devices are drawn from Dir(alpha) and that class's samples
are cut accordingly. Small alpha gives each device few classes; large alpha tends to IID.
Every agent recomputes the whole split from the job's (labels, num_devices, alpha, seed) and
keeps its own part, so no coordinator has to hand shards out.
"""

from __future__ import annotations

import numpy as np

MAX_ATTEMPTS = 1000


def dirichlet_partition(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    seed: int,
    min_samples: int = 10,
) -> list[np.ndarray]:
    """Partition sample indices among devices; each device gets at least `min_samples`."""
    labels = np.asarray(labels)
    _check_arguments(labels, num_devices, alpha, min_samples)
    rng = np.random.default_rng(seed)
    indices = np.arange(len(labels))
    for _ in range(MAX_ATTEMPTS):
        shards = _split_by_class(indices, labels, num_devices, alpha, rng)
        if min(len(s) for s in shards) >= min_samples:
            return [np.sort(s) for s in shards]
    # Redrawing failed (tiny alpha, many devices): reserve min_samples random indices for
    # every device first, then split only the rest by class, which always succeeds.
    order = rng.permutation(len(labels))
    reserved = num_devices * min_samples
    rest = order[reserved:]
    shards = _split_by_class(rest, labels[rest], num_devices, alpha, rng)
    return [
        np.sort(np.concatenate([order[d * min_samples : (d + 1) * min_samples], shards[d]]))
        for d in range(num_devices)
    ]


def device_shard(
    labels: np.ndarray, device_index: int, num_devices: int, alpha: float, seed: int
) -> np.ndarray:
    """Return the sample indices of one device (its index taken modulo `num_devices`)."""
    return dirichlet_partition(labels, num_devices, alpha, seed)[device_index % num_devices]


def _check_arguments(labels: np.ndarray, num_devices: int, alpha: float, min_samples: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if num_devices * min_samples > len(labels):
        raise ValueError(
            f"{len(labels)} samples cannot give {num_devices} devices {min_samples} each"
        )


def _split_by_class(
    indices: np.ndarray,
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Cut each class of `indices` among devices by proportions drawn from Dir(alpha)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(indices[labels == cls])
        proportions = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for device, piece in enumerate(np.split(members, cuts)):
            parts[device].append(piece)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
