"""Local training and evaluation of a task's model: plain minibatch SGD/Adam, optional FedProx.

This module knows nothing of brokers or stores: the agent loop hands it a model and a shard
and publishes what comes back. It never sets torch's thread count; the entrypoint does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from device_agent.tasks import Task
from schemas.messages import TrainingConfig

EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did; loss and accuracy are over its last epoch."""

    num_samples: int
    loss: float
    accuracy: float
    seconds: float


def train_local(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: TrainingConfig,
    *,
    seed: int,
    global_params: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.local_epochs` epochs on (x, y).

    With `cfg.prox_mu > 0` the loss gains FedProx's (mu/2)*||w - w_global||^2, where
    `global_params` defaults to the weights the model starts from. A non-finite loss raises
    FloatingPointError, leaving the model's weights unusable.
    """
    return _train(model, x, y, cfg, cfg.local_epochs, seed, global_params)


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Return the model's accuracy and mean cross-entropy on (x, y)."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    loss_sum, correct = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH_SIZE):
            logits = model(x[start : start + EVAL_BATCH_SIZE])
            target = y[start : start + EVAL_BATCH_SIZE]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum().item())
    return {"accuracy": correct / len(x), "loss": loss_sum / len(x)}


def train_centralized(task: Task, cfg: TrainingConfig, epochs: int, seed: int) -> dict[str, float]:
    """Train the task's model on its whole training set and evaluate it on the test set."""
    model = task.build_model(seed)
    data = task.load_data(seed)
    result = _train(model, data.x_train, data.y_train, cfg, epochs, seed, None)
    metrics = evaluate(model, data.x_test, data.y_test)
    return {
        **metrics,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "seconds": result.seconds,
    }


def _train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: TrainingConfig,
    epochs: int,
    seed: int,
    global_params: Mapping[str, Tensor] | None,
) -> TrainResult:
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need equally many inputs and labels, got {len(x)} and {len(y)}")
    started = time.perf_counter()
    optimizer = _make_optimizer(model, cfg)
    anchor = _prox_anchor(model, global_params) if cfg.prox_mu > 0 else None
    # A private generator: the shuffle depends on `seed` alone, not on what else ran before.
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_sum, correct = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        loss_sum, correct = _train_epoch(model, x, y, order, optimizer, cfg, anchor)
    return TrainResult(
        num_samples=len(x),
        loss=loss_sum / len(x),
        accuracy=correct / len(x),
        seconds=time.perf_counter() - started,
    )


def _train_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    order: Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: TrainingConfig,
    anchor: Mapping[str, Tensor] | None,
) -> tuple[float, int]:
    """Take one pass over (x, y) in `order`; return the summed task loss and correct count."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        logits = model(x[batch])
        loss = F.cross_entropy(logits, y[batch])
        objective = loss if anchor is None else loss + _prox_term(model, anchor, cfg.prox_mu)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(objective)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            # Fail here rather than publish NaN weights; with SGD a proximal term diverges
            # once lr * mu exceeds about 2 * (1 + momentum).
            raise FloatingPointError(
                f"local training diverged (loss {value}); lower lr, or prox_mu "
                f"(lr * prox_mu = {cfg.lr * cfg.prox_mu:g})"
            )
        # Report the task loss, not the proximal term, so runs with any mu compare.
        loss_sum += value * len(batch)
        correct += int((logits.argmax(dim=1) == y[batch]).sum().item())
    return loss_sum, correct


def _make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def _prox_anchor(model: nn.Module, global_params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Pick the weights FedProx pulls towards, by parameter name, detached from any graph."""
    if global_params is None:
        return {name: p.detach().clone() for name, p in model.named_parameters()}
    missing = [name for name, _ in model.named_parameters() if name not in global_params]
    if missing:
        raise ValueError(f"global_params lacks parameters {missing}")
    return {
        name: global_params[name].detach().to(dtype=p.dtype, device=p.device)
        for name, p in model.named_parameters()
    }


def _prox_term(model: nn.Module, anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    squared = [(p - anchor[name]).pow(2).sum() for name, p in model.named_parameters()]
    return (mu / 2) * torch.stack(squared).sum()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore the caller's mode: evaluating mid-training must not switch training off.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
