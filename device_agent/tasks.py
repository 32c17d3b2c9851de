"""The learning tasks a job can name: each builds its model and loads its data from a seed.

A task's data is the fixed benchmark data set (MNIST-1D's canonical generation, a fixed split
of scikit-learn's digits), so accuracies compare across jobs and with the literature; the
seed picks the model's initial weights, and the job's seed separately picks the partition.
Both data sets are produced offline: nothing is downloaded.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

MNIST1D_LENGTH = 40
NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A task's train and test sets: float32 inputs, int64 labels in [0, num_classes)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


class Task(Protocol):
    """A model architecture paired with the data it learns."""

    @property
    def name(self) -> str:
        """Name the task as jobs refer to it."""
        ...

    def build_model(self, seed: int) -> nn.Module:
        """Build the model; the same seed gives identical initial weights."""
        ...

    def load_data(self, seed: int) -> Dataset:
        """Load the task's train and test sets."""
        ...


class Mnist1dCnn(nn.Module):
    """The small 1-D CNN of the MNIST-1D paper (Greydanus 2020); ~5k parameters."""

    def __init__(self, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        # 40 -> 19 -> 10 -> 5 positions after the three stride-2 convolutions.
        self.fc = nn.Linear(channels * 5, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Map (batch, 40) signals to (batch, 10) logits."""
        h = x.reshape(-1, 1, MNIST1D_LENGTH)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.fc(h.flatten(1))  # type: ignore[no-any-return]


class DigitsMlp(nn.Module):
    """A 64-64-10 multilayer perceptron for 8x8 digit images."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, hidden)
        self.out = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Map (batch, 64) pixels to (batch, 10) logits."""
        return self.out(torch.relu(self.hidden(x)))  # type: ignore[no-any-return]


def _seeded(factory: type[nn.Module], seed: int) -> nn.Module:
    """Build a module under a fixed torch seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().float()


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Imported here: mnist1d pulls in plotting libraries and costs ~1 s at import time.
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and numpy RNGs; put them back afterwards so
    # loading data never changes what the caller's code draws next.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    # Standardize with train statistics only, so the test set stays unseen; pixels that are
    # constant in training (image corners) keep scale 1 instead of dividing by zero.
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _to_dataset(arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> Dataset:
    # Fresh tensors per call: the cached arrays must not be mutated through a caller's tensor.
    x_tr, y_tr, x_te, y_te = arrays
    return Dataset(
        x_train=torch.tensor(x_tr, dtype=torch.float32),
        y_train=torch.tensor(y_tr, dtype=torch.int64),
        x_test=torch.tensor(x_te, dtype=torch.float32),
        y_test=torch.tensor(y_te, dtype=torch.int64),
        num_classes=NUM_CLASSES,
    )


@dataclass(frozen=True)
class Mnist1dCnnTask:
    """MNIST-1D (4000 train / 1000 test signals of length 40) with the paper's small CNN."""

    name: str = "mnist1d-cnn"

    def build_model(self, seed: int) -> nn.Module:
        """Build the CNN with weights initialised from `seed`."""
        return _seeded(Mnist1dCnn, seed)

    def load_data(self, seed: int) -> Dataset:
        """Load canonical MNIST-1D; `seed` is unused, the data set is fixed."""
        return _to_dataset(_mnist1d_arrays())


@dataclass(frozen=True)
class DigitsMlpTask:
    """scikit-learn's 8x8 digits (1437 train / 360 test), standardized, with an MLP."""

    name: str = "digits-mlp"

    def build_model(self, seed: int) -> nn.Module:
        """Build the MLP with weights initialised from `seed`."""
        return _seeded(DigitsMlp, seed)

    def load_data(self, seed: int) -> Dataset:
        """Load the digits with a fixed stratified 80/20 split; `seed` is unused."""
        return _to_dataset(_digits_arrays())


_ALL_TASKS: tuple[Task, ...] = (Mnist1dCnnTask(), DigitsMlpTask())
TASKS: Mapping[str, Task] = MappingProxyType({task.name: task for task in _ALL_TASKS})


def get_task(name: str) -> Task:
    """Look a task up by name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        ) from None
