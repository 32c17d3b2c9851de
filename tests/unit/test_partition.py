"""Tests of the per-class Dirichlet split of a training set among devices."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.partition import device_shard, dirichlet_partition

pytestmark = pytest.mark.unit

# 10 balanced classes of 400 samples, shuffled: the shape of MNIST-1D's training labels.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 400))


def _mean_label_entropy(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    entropies = []
    for shard in shards:
        p = np.bincount(labels[shard], minlength=10) / len(shard)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("num_devices", [1, 3, 8, 20])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_every_index_lands_on_exactly_one_device(num_devices: int, alpha: float) -> None:
    # Act
    shards = dirichlet_partition(LABELS, num_devices, alpha, seed=7)

    # Assert
    assert len(shards) == num_devices
    together = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(together), np.arange(len(LABELS)))
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one() -> None:
    # Act
    first = dirichlet_partition(LABELS, 8, 0.5, seed=1)
    again = dirichlet_partition(LABELS, 8, 0.5, seed=1)
    other = dirichlet_partition(LABELS, 8, 0.5, seed=2)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_the_global_numpy_rng_is_left_alone() -> None:
    # Arrange
    np.random.seed(11)
    expected = np.random.random()
    np.random.seed(11)

    # Act
    dirichlet_partition(LABELS, 8, 0.5, seed=1)

    # Assert
    assert np.random.random() == expected


@pytest.mark.parametrize(
    ("labels", "num_devices", "alpha", "min_samples"),
    [
        (LABELS, 8, 0.1, 10),
        (LABELS, 16, 0.05, 20),
        # Two classes among 50 devices at alpha 0.01: redrawing cannot succeed, so this
        # exercises the fallback that reserves min_samples per device first.
        (np.repeat([0, 1], 500), 50, 0.01, 10),
    ],
)
def test_every_device_gets_at_least_min_samples(
    labels: np.ndarray, num_devices: int, alpha: float, min_samples: int
) -> None:
    # Act
    shards = dirichlet_partition(labels, num_devices, alpha, seed=0, min_samples=min_samples)

    # Assert
    assert min(len(s) for s in shards) >= min_samples
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))


def test_label_skew_grows_as_alpha_falls() -> None:
    # Act
    entropy = {
        alpha: _mean_label_entropy(LABELS, dirichlet_partition(LABELS, 8, alpha, seed=3))
        for alpha in (0.1, 1.0, 100.0)
    }

    # Assert: near-IID shards hold all 10 classes evenly (entropy close to log 10).
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)


def test_device_shard_takes_the_index_modulo_the_device_count() -> None:
    # Arrange
    shards = dirichlet_partition(LABELS, 8, 0.5, seed=4)

    # Act / Assert
    np.testing.assert_array_equal(device_shard(LABELS, 1, 8, 0.5, seed=4), shards[1])
    np.testing.assert_array_equal(device_shard(LABELS, 9, 8, 0.5, seed=4), shards[1])
    np.testing.assert_array_equal(device_shard(LABELS, -1, 8, 0.5, seed=4), shards[7])


@pytest.mark.parametrize(
    ("num_devices", "alpha", "min_samples", "labels", "match"),
    [
        (0, 0.5, 10, LABELS, "num_devices"),
        (8, 0.0, 10, LABELS, "alpha"),
        (8, 0.5, -1, LABELS, "min_samples"),
        (500, 0.5, 10, LABELS, "cannot give"),
        (8, 0.5, 10, LABELS.reshape(40, 100), "one-dimensional"),
    ],
)
def test_impossible_requests_are_refused(
    num_devices: int, alpha: float, min_samples: int, labels: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(labels, num_devices, alpha, seed=0, min_samples=min_samples)
