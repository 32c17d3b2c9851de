"""FedAsync, FedBuff, FedAvg and the server optimizers, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from aggregator.strategies import (
    Contribution,
    FedAsync,
    FedAvg,
    FedBuff,
    Receipt,
    build_strategy,
    server_optimizer,
)
from schemas.errors import RejectReason
from schemas.messages import StalenessConfig, StrategyConfig

pytestmark = pytest.mark.unit

POLY_1 = StalenessConfig(name="polynomial", a=1.0)  # s(tau) = 1 / (tau + 1)
CONSTANT = StalenessConfig(name="constant")


def t(*values: float) -> torch.Tensor:
    """Build a float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


def contrib(
    update_id: str,
    delta: torch.Tensor,
    *,
    tau: int = 0,
    n: int = 1,
    device: str | None = None,
    base_version: int = 0,
    base: dict[str, torch.Tensor] | None = None,
) -> Contribution:
    """Build a one-key ("w") contribution."""
    receipt = Receipt(update_id, device or f"dev-{update_id}", tau, n)
    return Contribution(receipt, base_version, {"w": delta}, base)


# --- server optimizers: two steps each, written out ---------------------------------------

SQ5, SQ55, SQ3 = math.sqrt(5.0), math.sqrt(5.5), math.sqrt(3.0)


@pytest.mark.parametrize(
    ("cfg", "x1", "x2"),
    [
        # none, lr 0.5: x = 0 + 0.5 g1; then + 0.5 g2
        (
            StrategyConfig(server_optimizer="none", server_lr=0.5),
            (0.5, 1.5),
            (0.0, 2.0),
        ),
        # fedavgm, lr 0.5, beta1 0.5: m1 = g1 = [1, 3]; m2 = 0.5 m1 + g2 = [-0.5, 2.5]
        (
            StrategyConfig(server_optimizer="fedavgm", server_lr=0.5, beta1=0.5),
            (0.5, 1.5),
            (0.25, 2.75),
        ),
        # fedadam, lr 1, b1 = b2 = 0.5, tau 1 (v0 = tau^2 = 1):
        #   m1 = [0.5, 1.5], v1 = 0.5 * 1 + 0.5 * [1, 9] = [1, 5], x1 = m1 / (sqrt(v1) + 1)
        #   m2 = 0.5 m1 + 0.5 [-1, 1] = [-0.25, 1.25], v2 = 0.5 v1 + 0.5 [1, 1] = [1, 3]
        (
            StrategyConfig(
                server_optimizer="fedadam", server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0
            ),
            (0.25, 1.5 / (SQ5 + 1)),
            (0.25 - 0.125, 1.5 / (SQ5 + 1) + 1.25 / (SQ3 + 1)),
        ),
        # fedyogi, same: v1 = v0 - 0.5 g^2 sign(v0 - g^2) = [1 - 0.5 * 1 * 0, 1 + 0.5 * 9]
        #   = [1, 5.5]; v2 = [1 - 0, 5.5 - 0.5 * 1 * sign(5.5 - 1)] = [1, 5]; m as fedadam
        (
            StrategyConfig(
                server_optimizer="fedyogi", server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0
            ),
            (0.25, 1.5 / (SQ55 + 1)),
            (0.25 - 0.125, 1.5 / (SQ55 + 1) + 1.25 / (SQ5 + 1)),
        ),
    ],
    ids=["none", "fedavgm", "fedadam", "fedyogi"],
)
def test_server_optimizer_two_steps(
    cfg: StrategyConfig, x1: tuple[float, float], x2: tuple[float, float]
) -> None:
    # Arrange: x0 = [0, 0], g1 = [1, 3], g2 = [-1, 1]
    opt = server_optimizer(cfg)
    model = {"w": t(0.0, 0.0), "n": torch.tensor(7)}

    # Act / Assert
    opt.step_(model, {"w": t(1.0, 3.0)})
    assert_close(model["w"], t(*x1))
    opt.step_(model, {"w": t(-1.0, 1.0)})
    assert_close(model["w"], t(*x2))
    assert int(model["n"]) == 7


def test_server_optimizer_reset_forgets_momentum() -> None:
    # Arrange: fedavgm, lr 1, beta1 0.5
    opt = server_optimizer(StrategyConfig(server_optimizer="fedavgm", beta1=0.5))
    model = {"w": t(0.0)}
    opt.step_(model, {"w": t(2.0)})  # m = 2, x = 2

    # Act
    opt.reset()
    opt.step_(model, {"w": t(2.0)})  # m = 2 again (not 0.5 * 2 + 2 = 3)

    # Assert
    assert_close(model["w"], t(4.0))


def test_server_optimizer_key_mismatch_moves_nothing() -> None:
    # Arrange
    opt = server_optimizer(StrategyConfig(server_optimizer="fedadam"))
    model = {"w": t(0.0)}

    # Act / Assert
    with pytest.raises(KeyError, match="unexpected key 'v'"):
        opt.step_(model, {"w": t(1.0), "v": t(1.0)})
    assert_close(model["w"], t(0.0))


# --- FedAsync ----------------------------------------------------------------------------


def test_fedasync_tau0_mixes_against_the_current_model() -> None:
    # Arrange: alpha 0.5, tau 0 so s = 1 and the base IS the model object
    strategy = FedAsync.from_config(StrategyConfig(name="fedasync", alpha=0.5, staleness=POLY_1))
    model = {"w": t(1.0, 2.0), "n": torch.tensor(3)}
    update = Contribution(
        Receipt("u1", "d1", 0, 10), 4, {"w": t(2.0, -2.0), "n": torch.tensor(9)}, model
    )

    # Act
    receipts = strategy.add(model, update)

    # Assert: x_k = [3, 0]; x = 0.5 [1, 2] + 0.5 [3, 0] = [2, 1]; the counter is untouched
    assert receipts == [update.receipt]
    assert_close(model["w"], t(2.0, 1.0))
    assert int(model["n"]) == 3
    assert strategy.pending() == []


def test_fedasync_stale_update_uses_its_base_and_polynomial_weight() -> None:
    # Arrange: alpha 0.6, polynomial a = 1, tau 2: a_t = 0.6 / 3 = 0.2
    strategy = FedAsync.from_config(StrategyConfig(name="fedasync", alpha=0.6, staleness=POLY_1))
    model = {"w": t(1.0, 1.0)}
    base = {"w": t(0.0, 2.0)}
    update = contrib("u1", t(1.0, 3.0), tau=2, base_version=3, base=base)

    # Act
    strategy.add(model, update)

    # Assert: x_k = [1, 5]; x = 0.8 [1, 1] + 0.2 [1, 5] = [1, 1.8]; the base is untouched
    assert_close(model["w"], t(1.0, 1.8))
    assert_close(base["w"], t(0.0, 2.0))


def test_fedasync_without_base_model_raises() -> None:
    # Arrange
    strategy = build_strategy(StrategyConfig(name="fedasync"))

    # Act / Assert
    with pytest.raises(ValueError, match="base model"):
        strategy.add({"w": t(0.0)}, contrib("u1", t(1.0)))


# --- FedBuff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "updates", "expected"),
    [
        # K 2, samples, s = 1/(tau+1), x0 = [1, 1]:
        #   acc = 10 * 1 * [1, 2] + 30 * 0.5 * [4, -2] = [70, -10], W = 40, g = [1.75, -0.25]
        (
            StrategyConfig(buffer_size=2, staleness=POLY_1),
            [(0, 10, (1.0, 2.0)), (1, 30, (4.0, -2.0))],
            (2.75, 0.75),
        ),
        # same with server_lr 2: x = [1, 1] + 2 [1.75, -0.25]
        (
            StrategyConfig(buffer_size=2, staleness=POLY_1, server_lr=2.0),
            [(0, 10, (1.0, 2.0)), (1, 30, (4.0, -2.0))],
            (4.5, 0.5),
        ),
        # K 3, samples, hinge a 1 b 1 (s = 1, 1, 1/3):
        #   acc = 1 [3, 0] + 2 [0, 3] + 3 (1/3) [3, 3] = [6, 9], W = 6, g = [1, 1.5]
        (
            StrategyConfig(buffer_size=3, staleness=StalenessConfig(name="hinge", a=1.0, b=1)),
            [(0, 1, (3.0, 0.0)), (1, 2, (0.0, 3.0)), (3, 3, (3.0, 3.0))],
            (2.0, 2.5),
        ),
        # K 3 as above with server_lr 0.5: x = [1, 1] + 0.5 [1, 1.5]
        (
            StrategyConfig(
                buffer_size=3,
                staleness=StalenessConfig(name="hinge", a=1.0, b=1),
                server_lr=0.5,
            ),
            [(0, 1, (3.0, 0.0)), (1, 2, (0.0, 3.0)), (3, 3, (3.0, 3.0))],
            (1.5, 1.75),
        ),
        # K 2, samples, constant: g = (1 [2, 0] + 99 [4, 0]) / 100 = [3.98, 0]
        (
            StrategyConfig(buffer_size=2, staleness=CONSTANT),
            [(0, 1, (2.0, 0.0)), (5, 99, (4.0, 0.0))],
            (4.98, 1.0),
        ),
        # K 2, uniform, constant: g = ([2, 0] + [4, 0]) / 2 = [3, 0], sample counts ignored
        (
            StrategyConfig(buffer_size=2, staleness=CONSTANT, weighting="uniform"),
            [(0, 1, (2.0, 0.0)), (5, 99, (4.0, 0.0))],
            (4.0, 1.0),
        ),
        # K 2, uniform, sqrt (s = 1/2 at tau 3, 1/3 at tau 8): g = (2 + 2) / 2 = [2, 0]
        (
            StrategyConfig(
                buffer_size=2, staleness=StalenessConfig(name="sqrt"), weighting="uniform"
            ),
            [(3, 1, (4.0, 0.0)), (8, 1, (6.0, 0.0))],
            (3.0, 1.0),
        ),
    ],
    ids=["k2", "k2-lr2", "k3-hinge", "k3-lr-half", "samples", "uniform", "sqrt"],
)
def test_fedbuff_buffers_k_updates(
    cfg: StrategyConfig,
    updates: list[tuple[int, int, tuple[float, float]]],
    expected: tuple[float, float],
) -> None:
    # Arrange
    strategy = build_strategy(cfg)
    model = {"w": t(1.0, 1.0)}
    contributions = [
        contrib(f"u{i}", t(*delta), tau=tau, n=n) for i, (tau, n, delta) in enumerate(updates)
    ]

    # Act: every update but the last leaves the model as it was
    for i, c in enumerate(contributions[:-1]):
        assert strategy.add(model, c) is None
        assert strategy.pending() == [f"u{j}" for j in range(i + 1)]
        assert_close(model["w"], t(1.0, 1.0))
    receipts = strategy.add(model, contributions[-1])

    # Assert
    assert receipts == [c.receipt for c in contributions]
    assert_close(model["w"], t(*expected))
    assert strategy.pending() == []


def test_fedbuff_server_momentum_carries_across_versions_and_resets() -> None:
    # Arrange: K 1, fedavgm lr 1 beta1 0.5, constant staleness, x0 = 0
    strategy = build_strategy(
        StrategyConfig(buffer_size=1, staleness=CONSTANT, server_optimizer="fedavgm", beta1=0.5)
    )
    model = {"w": t(0.0)}

    # Act: m = 2, x = 2; reset() drops the buffer only; m = 0.5 * 2 + 2 = 3, x = 5
    strategy.add(model, contrib("u1", t(2.0)))
    strategy.reset()
    strategy.add(model, contrib("u2", t(2.0)))

    # Assert
    assert_close(model["w"], t(5.0))


def test_fedbuff_reset_forgets_the_buffer() -> None:
    # Arrange: K 2, constant, uniform, x0 = 0
    strategy = build_strategy(StrategyConfig(buffer_size=2, staleness=CONSTANT))
    model = {"w": t(0.0)}
    strategy.add(model, contrib("u1", t(100.0)))
    assert strategy.pending() == ["u1"]

    # Act
    strategy.reset()
    first = strategy.add(model, contrib("u2", t(2.0)))
    second = strategy.add(model, contrib("u3", t(4.0)))

    # Assert: u1 is gone; g = (2 + 4) / 2
    assert first is None
    assert second is not None
    assert [r.update_id for r in second] == ["u2", "u3"]
    assert_close(model["w"], t(3.0))


def test_fedbuff_keeps_integer_entries_and_half_dtype() -> None:
    # Arrange: K 1, constant; a float16 weight and an int64 counter
    strategy = build_strategy(StrategyConfig(buffer_size=1, staleness=CONSTANT))
    model = {"w": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    delta = {"w": torch.tensor([0.5], dtype=torch.float16), "n": torch.tensor(40)}

    # Act
    strategy.add(model, Contribution(Receipt("u1", "d1", 0, 1), 0, delta))

    # Assert
    assert model["w"].dtype == torch.float16
    assert_close(model["w"], torch.tensor([1.5], dtype=torch.float16))
    assert int(model["n"]) == 3


def test_fedbuff_key_mismatch_raises_and_buffers_nothing() -> None:
    # Arrange
    strategy = build_strategy(StrategyConfig(buffer_size=2))
    model = {"w": t(0.0), "b": t(0.0)}

    # Act / Assert
    with pytest.raises(KeyError, match="missing key 'b'"):
        strategy.add(model, contrib("u1", t(1.0)))
    assert strategy.pending() == []


def test_fedbuff_refuses_an_update_already_in_the_buffer() -> None:
    # Arrange
    strategy = build_strategy(StrategyConfig(buffer_size=3))
    model = {"w": t(0.0)}
    strategy.add(model, contrib("u1", t(1.0)))

    # Act / Assert
    with pytest.raises(ValueError, match="already in the buffer"):
        strategy.add(model, contrib("u1", t(1.0)))
    assert strategy.pending() == ["u1"]


# --- FedAvg ------------------------------------------------------------------------------


def test_fedavg_round_with_rejections() -> None:
    # Arrange: M 2, samples, lr 1, current version 5, x0 = 1
    strategy = build_strategy(StrategyConfig(name="fedavg", buffer_size=2))
    model = {"w": t(1.0)}

    # Act / Assert: device a joins the round
    assert strategy.admit(base_version=5, version=5, device_id="a") is None
    assert strategy.add(model, contrib("u1", t(3.0), n=1, device="a", base_version=5)) is None
    # a second update from a, an older base and a future base are refused
    duplicate = strategy.admit(base_version=5, version=5, device_id="a")
    stale = strategy.admit(base_version=4, version=5, device_id="b")
    future = strategy.admit(base_version=6, version=5, device_id="b")
    assert duplicate is not None and duplicate[0] is RejectReason.DUPLICATE_DEVICE_IN_ROUND
    assert stale is not None and stale[0] is RejectReason.STALE_ROUND
    assert future is not None and future[0] is RejectReason.FUTURE_BASE_VERSION
    # device b completes the round: x = 1 + (1 * 3 + 3 * 7) / 4 = 7
    assert strategy.admit(base_version=5, version=5, device_id="b") is None
    receipts = strategy.add(model, contrib("u2", t(7.0), n=3, device="b", base_version=5))
    assert receipts is not None
    assert [r.update_id for r in receipts] == ["u1", "u2"]
    assert_close(model["w"], t(7.0))
    # the next round is open to a again
    assert strategy.pending() == []
    assert strategy.admit(base_version=6, version=6, device_id="a") is None


def test_fedavg_ignores_staleness_weighting_and_resets() -> None:
    # Arrange: M 2, uniform
    strategy = build_strategy(StrategyConfig(name="fedavg", buffer_size=2, weighting="uniform"))
    model = {"w": t(0.0)}
    strategy.add(model, contrib("u1", t(50.0), device="a"))

    # Act: reset drops u1 and frees device a
    strategy.reset()
    assert strategy.admit(base_version=0, version=0, device_id="a") is None
    strategy.add(model, contrib("u2", t(2.0), device="a"))
    strategy.add(model, contrib("u3", t(4.0), n=9, device="b"))

    # Assert: (2 + 4) / 2
    assert_close(model["w"], t(3.0))


def test_fedavg_refuses_a_mixed_round_in_add() -> None:
    # Arrange
    strategy = build_strategy(StrategyConfig(name="fedavg", buffer_size=3))
    model = {"w": t(0.0)}
    strategy.add(model, contrib("u1", t(1.0), device="a", base_version=2))

    # Act / Assert
    with pytest.raises(ValueError, match="round 2"):
        strategy.add(model, contrib("u2", t(1.0), device="b", base_version=3))


# --- admission and construction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "base_version", "version", "expected"),
    [
        ("fedasync", 7, 7, None),
        ("fedasync", 4, 7, None),  # tau 3 == max_staleness
        ("fedasync", 3, 7, RejectReason.TOO_STALE),  # tau 4
        ("fedasync", 8, 7, RejectReason.FUTURE_BASE_VERSION),
        ("fedbuff", 7, 7, None),
        ("fedbuff", 4, 7, None),
        ("fedbuff", 3, 7, RejectReason.TOO_STALE),
        ("fedbuff", 8, 7, RejectReason.FUTURE_BASE_VERSION),
        ("fedavg", 7, 7, None),
        ("fedavg", 6, 7, RejectReason.STALE_ROUND),
        ("fedavg", 0, 7, RejectReason.STALE_ROUND),
        ("fedavg", 8, 7, RejectReason.FUTURE_BASE_VERSION),
    ],
)
def test_admit(name: str, base_version: int, version: int, expected: RejectReason | None) -> None:
    # Arrange
    strategy = build_strategy(StrategyConfig.model_validate({"name": name, "max_staleness": 3}))

    # Act
    verdict = strategy.admit(base_version=base_version, version=version, device_id="d")

    # Assert
    if expected is None:
        assert verdict is None
    else:
        assert verdict is not None
        assert verdict[0] is expected
        assert verdict[1]


@pytest.mark.parametrize(
    ("name", "cls", "needs_base"),
    [("fedasync", FedAsync, True), ("fedbuff", FedBuff, False), ("fedavg", FedAvg, False)],
)
def test_build_strategy(name: str, cls: type, needs_base: bool) -> None:
    # Act
    strategy = build_strategy(StrategyConfig.model_validate({"name": name}))

    # Assert
    assert isinstance(strategy, cls)
    assert strategy.name == name
    assert strategy.needs_base_model is needs_base


def test_receipt_refuses_impossible_values() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="staleness"):
        Receipt("u1", "d1", -1, 1)
    with pytest.raises(ValueError, match="num_samples"):
        Receipt("u1", "d1", 0, 0)
