"""Measure a task's centralized accuracy, the ceiling federated runs are judged against.

Run: `python bench/centralized.py --task mnist1d-cnn --epochs 5 10 20 40`. Each epoch count is
a separate run from the same initial weights, averaged over `--seeds`. It also prints how a
Dirichlet split shards the training set and how long one local epoch takes on a shard, which
is what a federated round costs a device. Hyper-parameters default to `TrainingConfig`'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a script from a checkout: make the repository root importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.partition import dirichlet_partition
from device_agent.tasks import TASKS, Task, get_task
from device_agent.training import train_centralized, train_local
from schemas.messages import TrainingConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset hyper-parameters keep TrainingConfig's defaults."""
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-cnn", choices=sorted(TASKS))
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--devices", type=int, default=defaults.num_devices)
    parser.add_argument("--alpha", type=float, default=defaults.dirichlet_alpha)
    # One thread: these models gain nothing from more, and spinning OpenMP workers make
    # timings erratic whenever anything else shares the cores.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-shards", action="store_true", help="skip the shard measurements")
    return parser.parse_args(argv)


def accuracy_curve(task: Task, cfg: TrainingConfig, epochs: list[int], seeds: list[int]) -> None:
    """Print mean test accuracy and training time per epoch budget."""
    print(f"centralized {task.name}: {cfg.optimizer} lr={cfg.lr} batch={cfg.batch_size}")
    print(f"{'epochs':>6} {'accuracy':>9} {'min':>6} {'max':>6} {'loss':>7} {'seconds':>8}")
    for n in epochs:
        runs = [train_centralized(task, cfg, n, seed) for seed in seeds]
        acc = [r["accuracy"] for r in runs]
        loss = statistics.mean(r["loss"] for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        print(f"{n:>6} {statistics.mean(acc):>9.4f} {min(acc):>6.3f} {max(acc):>6.3f}", end="")
        print(f" {loss:>7.4f} {secs:>8.2f}")


def shard_costs(task: Task, cfg: TrainingConfig) -> None:
    """Print shard sizes of the job's Dirichlet split and one local epoch's time per shard."""
    data = task.load_data(cfg.seed)
    shards = dirichlet_partition(
        data.y_train.numpy(), cfg.num_devices, cfg.dirichlet_alpha, cfg.seed
    )
    sizes = [len(s) for s in shards]
    classes = [len(torch.unique(data.y_train[torch.from_numpy(s)])) for s in shards]
    print(f"{cfg.num_devices} devices, alpha={cfg.dirichlet_alpha}: shard sizes {sizes}")
    print(f"  min {min(sizes)}  max {max(sizes)}  classes per shard {classes}")
    one_epoch = cfg.model_copy(update={"local_epochs": 1})
    times = []
    for index, shard in enumerate(shards):
        rows = torch.from_numpy(shard)
        model = task.build_model(cfg.seed)
        result = train_local(model, data.x_train[rows], data.y_train[rows], one_epoch, seed=index)
        times.append(result.seconds)
    print(
        f"  one local epoch (batch {cfg.batch_size}): min {min(times) * 1e3:.1f} ms"
        f"  mean {statistics.mean(times) * 1e3:.1f} ms  max {max(times) * 1e3:.1f} ms"
        f"  ({cfg.local_epochs} local epochs per update)"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the centralized curve and the shard measurements."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainingConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        num_devices=args.devices,
        dirichlet_alpha=args.alpha,
    )
    task = get_task(args.task)
    data = task.load_data(cfg.seed)
    # Warm up: a process's first optimizer step imports torch._dynamo (about a second), a
    # one-off cost that would otherwise land in the first measurement.
    train_local(task.build_model(0), data.x_train[:64], data.y_train[:64], cfg, seed=0)
    started = time.perf_counter()
    accuracy_curve(task, cfg, args.epochs, args.seeds)
    if not args.skip_shards:
        shard_costs(task, cfg)
    print(f"total {time.perf_counter() - started:.1f} s, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
