"""Tests of the task registry: seeded models and offline, fixed data sets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from device_agent import tasks
from device_agent.tasks import TASKS, get_task

pytestmark = pytest.mark.unit

# name -> (train size, test size, input features)
SHAPES = {"mnist1d-cnn": (4000, 1000, 40), "digits-mlp": (1437, 360, 64)}


def test_the_registry_holds_the_known_tasks() -> None:
    assert set(TASKS) == set(SHAPES)
    assert all(TASKS[name].name == name for name in TASKS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_same_seed_builds_identical_weights(name: str) -> None:
    # Act
    first = get_task(name).build_model(5).state_dict()
    again = get_task(name).build_model(5).state_dict()

    # Assert
    assert list(first) == list(again)
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
        assert first[key].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_another_seed_builds_different_weights(name: str) -> None:
    # Act
    first = get_task(name).build_model(0).state_dict()
    other = get_task(name).build_model(1).state_dict()

    # Assert
    assert list(first) == list(other)
    assert all(not torch.equal(first[key], other[key]) for key in first)


def test_building_a_model_leaves_the_global_torch_rng_alone() -> None:
    # Arrange
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)

    # Act
    get_task("mnist1d-cnn").build_model(0)

    # Assert
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_data_has_the_documented_shapes_dtypes_and_classes(name: str) -> None:
    # Arrange
    n_train, n_test, features = SHAPES[name]

    # Act
    data = get_task(name).load_data(0)

    # Assert
    assert data.num_classes == 10
    assert data.x_train.shape == (n_train, features)
    assert data.x_test.shape == (n_test, features)
    assert data.y_train.shape == (n_train,) and data.y_test.shape == (n_test,)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    for labels in (data.y_train, data.y_test):
        assert set(labels.tolist()) == set(range(10))
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_test).all()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_model_maps_a_batch_to_class_logits(name: str) -> None:
    # Arrange
    task = get_task(name)
    data = task.load_data(0)

    # Act
    logits = task.build_model(0)(data.x_train[:7])

    # Assert
    assert logits.shape == (7, data.num_classes)


def test_the_data_is_fixed_and_each_call_gets_its_own_tensors() -> None:
    # Arrange
    task = get_task("digits-mlp")
    first = task.load_data(0)
    expected = first.x_train.clone()

    # Act
    first.x_train.zero_()
    again = task.load_data(1)

    # Assert
    torch.testing.assert_close(again.x_train, expected)


def test_generating_mnist1d_restores_the_global_rngs() -> None:
    # Arrange: clear the per-process cache so the generator really runs here.
    tasks._mnist1d_arrays.cache_clear()
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)

    # Act
    get_task("mnist1d-cnn").load_data(0)

    # Assert
    assert (random.random(), np.random.random()) == expected


def test_an_unknown_task_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*digits-mlp, mnist1d-cnn"):
        get_task("nope")
