"""Tests of local training, FedProx, evaluation and the centralized baseline."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import pytest
import torch
from torch import Tensor, nn

from device_agent.partition import device_shard
from device_agent.tasks import get_task
from device_agent.training import evaluate, train_centralized, train_local
from schemas.messages import TrainingConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Train on one thread: these models are too small to gain from two, and spinning
    OpenMP workers make timings erratic on a loaded two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shard() -> tuple[Tensor, Tensor]:
    """One device's MNIST-1D shard of an 8-way alpha=0.5 split, as agents see it."""
    data = get_task("mnist1d-cnn").load_data(0)
    rows = torch.from_numpy(device_shard(data.y_train.numpy(), 0, 8, 0.5, seed=0))
    return data.x_train[rows], data.y_train[rows]


def _distance(model: nn.Module, start: dict[str, Tensor]) -> float:
    squared = sum(float((p.detach() - start[n]).norm() ** 2) for n, p in model.named_parameters())
    return math.sqrt(squared)


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adam", 0.003)])
def test_training_lowers_the_loss_on_a_shard(
    shard: tuple[Tensor, Tensor], optimizer: Literal["sgd", "adam"], lr: float
) -> None:
    # Arrange
    x, y = shard
    model = get_task("mnist1d-cnn").build_model(0)
    before = evaluate(model, x, y)["loss"]
    cfg = TrainingConfig(optimizer=optimizer, lr=lr, local_epochs=3)

    # Act
    result = train_local(model, x, y, cfg, seed=0)

    # Assert
    assert evaluate(model, x, y)["loss"] < 0.8 * before
    assert result.num_samples == len(x)
    assert 0 <= result.accuracy <= 1 and result.loss > 0 and result.seconds > 0


def test_the_same_seed_trains_to_the_same_weights(shard: tuple[Tensor, Tensor]) -> None:
    # Arrange
    x, y = shard
    task = get_task("mnist1d-cnn")
    models = [task.build_model(0) for _ in range(3)]
    cfg = TrainingConfig(local_epochs=1)

    # Act
    results = [train_local(m, x, y, cfg, seed=s) for m, s in zip(models, (4, 4, 5), strict=True)]

    # Assert
    same, other = (m.state_dict() for m in models[1:])
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(value, same[key], rtol=0, atol=0)
    assert results[0].loss == results[1].loss
    assert any(not torch.equal(v, other[k]) for k, v in models[0].state_dict().items())


def test_a_large_prox_mu_keeps_the_weights_near_the_start(shard: tuple[Tensor, Tensor]) -> None:
    # Arrange
    x, y = shard
    task = get_task("mnist1d-cnn")
    start = {k: v.clone() for k, v in task.build_model(0).state_dict().items()}
    free, held = task.build_model(0), task.build_model(0)

    # Act
    train_local(free, x, y, TrainingConfig(prox_mu=0.0), seed=0)
    train_local(held, x, y, TrainingConfig(prox_mu=10.0), seed=0)

    # Assert
    assert _distance(held, start) < 0.25 * _distance(free, start)


def test_prox_pulls_towards_the_given_global_params(shard: tuple[Tensor, Tensor]) -> None:
    # Arrange: anchor at zero, far from the random start, with a proximal term that dominates.
    x, y = shard
    model = get_task("mnist1d-cnn").build_model(0)
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    before = _distance(model, zeros)

    # Act
    train_local(model, x, y, TrainingConfig(prox_mu=10.0), seed=0, global_params=zeros)

    # Assert
    assert _distance(model, zeros) < 0.3 * before


def test_divergence_raises_instead_of_returning_nan(shard: tuple[Tensor, Tensor]) -> None:
    # Arrange: SGD on the proximal term alone is unstable once lr * mu > 2 * (1 + momentum).
    x, y = shard
    model = get_task("mnist1d-cnn").build_model(0)

    # Act / Assert
    with pytest.raises(FloatingPointError, match="diverged"):
        train_local(model, x, y, TrainingConfig(lr=0.05, prox_mu=100.0), seed=0)


def test_global_params_must_cover_every_parameter(shard: tuple[Tensor, Tensor]) -> None:
    x, y = shard
    model = get_task("mnist1d-cnn").build_model(0)
    partial = {"fc.weight": torch.zeros(10, 125)}
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        train_local(model, x, y, TrainingConfig(prox_mu=1.0), seed=0, global_params=partial)


def test_training_refuses_an_empty_or_mismatched_set() -> None:
    model = get_task("digits-mlp").build_model(0)
    with pytest.raises(ValueError, match="equally many"):
        train_local(
            model, torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64), TrainingConfig(), seed=0
        )
    with pytest.raises(ValueError, match="equally many"):
        train_local(
            model, torch.zeros(3, 64), torch.zeros(2, dtype=torch.int64), TrainingConfig(), seed=0
        )


def test_evaluate_scores_a_perfect_classifier_on_a_separable_set() -> None:
    # Arrange: the class is the sign of the first feature, and the model reads exactly that.
    x = torch.tensor([[-2.0, 0.3], [-1.0, -0.5], [1.5, 0.1], [3.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
        model.bias.zero_()
    model.train()

    # Act
    metrics = evaluate(model, x, y)

    # Assert
    assert metrics["accuracy"] == 1.0
    assert 0 < metrics["loss"] < 0.02  # log(1 + e^-4) at the smallest margin
    assert model.training, "evaluate must give the model back in the mode it found it"


def test_evaluate_counts_mistakes() -> None:
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [1.0]]))
        model.bias.zero_()
    metrics = evaluate(
        model, torch.tensor([[1.0], [1.0], [-1.0], [-1.0]]), torch.tensor([1, 0, 0, 0])
    )
    assert metrics["accuracy"] == 0.75


def test_centralized_training_learns_the_digits() -> None:
    # Act
    metrics = train_centralized(get_task("digits-mlp"), TrainingConfig(), epochs=5, seed=0)

    # Assert
    assert metrics["accuracy"] > 0.9
    assert set(metrics) >= {"accuracy", "loss", "train_loss", "train_accuracy", "seconds"}
