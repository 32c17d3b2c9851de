"""Partial updates (only some keys, e.g. the trainable ones): validation and folding by key."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from aggregator.strategies import Contribution, Receipt, build_strategy
from schemas import Rejection, RejectReason, StrategyConfig
from schemas.codec import decode_validated, encode, schema_of
from schemas.messages import StalenessConfig

pytestmark = pytest.mark.unit

MODEL = {
    "backbone": torch.zeros(3),
    "head": torch.zeros(2),
    "steps": torch.tensor(7),
}
SCHEMA = schema_of(MODEL)


def t(*values: float) -> torch.Tensor:
    """Build a float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


def model() -> dict[str, torch.Tensor]:
    """Return a fresh copy of the global model."""
    return {name: value.clone() for name, value in MODEL.items()}


def contrib(
    update_id: str, delta: dict[str, torch.Tensor], *, n: int = 1, tau: int = 0
) -> Contribution:
    """Build a partial contribution from device `dev-{update_id}`."""
    receipt = Receipt(update_id, f"dev-{update_id}", tau, n)
    return Contribution(receipt, 0, delta, base_model=model(), partial=True)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int8:channel", "topk:0.5"])
def test_a_partial_payload_decodes_to_the_keys_it_carries(codec: str) -> None:
    # Arrange
    update = {"head": t(1.0, -2.0)}
    # Act
    out = decode_validated(encode(update, codec), SCHEMA, codec, partial=True)
    # Assert
    assert set(out) == {"head"}
    assert out["head"].dtype == torch.float32


@pytest.mark.parametrize(
    ("update", "codec", "reason", "detail"),
    [
        ({}, "none", RejectReason.WRONG_KEYS, "carries no tensor"),
        ({}, "int8", RejectReason.WRONG_KEYS, "carries no tensor"),
        ({"adapter": t(1.0)}, "none", RejectReason.WRONG_KEYS, "adapter"),
        ({"adapter": t(1.0)}, "topk:1", RejectReason.WRONG_KEYS, "adapter"),
        ({"head": t(1.0, 2.0, 3.0)}, "none", RejectReason.WRONG_SHAPE, "head"),
        ({"head": t(1.0, 2.0).double()}, "none", RejectReason.WRONG_DTYPE, "head"),
        ({"head": t(1.0, float("nan"))}, "none", RejectReason.NON_FINITE, "head"),
        ({"head": t(1.0, 2.0, 3.0)}, "int8", RejectReason.WRONG_SHAPE, "head"),
    ],
)
def test_a_bad_partial_payload_is_rejected(
    update: dict[str, torch.Tensor], codec: str, reason: RejectReason, detail: str
) -> None:
    # Act / Assert
    with pytest.raises(Rejection, match=detail) as refused:
        decode_validated(encode(update, codec), SCHEMA, codec, partial=True)
    assert refused.value.reason == reason


def test_a_full_update_must_still_carry_every_key() -> None:
    # Act / Assert: without the header's `keys: partial`, a missing key is WRONG_KEYS
    with pytest.raises(Rejection) as refused:
        decode_validated(encode({"head": t(1.0, 2.0)}), SCHEMA)
    assert refused.value.reason == RejectReason.WRONG_KEYS


# --- folding by key ---------------------------------------------------------------------

# Two updates, weights 1 and 3: one carries backbone and head, the other only head.
BOTH = {"backbone": t(4.0, 4.0, 4.0), "head": t(1.0, 1.0)}
HEAD = {"head": t(5.0, -3.0)}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # backbone averaged over the one update that carries it; head over both, weights 1:3
        (StrategyConfig(buffer_size=2), {"backbone": t(4.0, 4.0, 4.0), "head": t(4.0, -2.0)}),
        (
            StrategyConfig(name="fedavg", buffer_size=2),
            {"backbone": t(4.0, 4.0, 4.0), "head": t(4.0, -2.0)},
        ),
        (
            StrategyConfig(buffer_size=2, server_lr=0.5),
            {"backbone": t(2.0, 2.0, 2.0), "head": t(2.0, -1.0)},
        ),
        # median of each key over the updates carrying it; weights ignored
        (
            StrategyConfig(buffer_size=2, aggregation="median"),
            {"backbone": t(4.0, 4.0, 4.0), "head": t(3.0, -1.0)},
        ),
        (
            StrategyConfig(buffer_size=2, server_optimizer="fedavgm", beta1=0.5),
            {"backbone": t(4.0, 4.0, 4.0), "head": t(4.0, -2.0)},
        ),
    ],
)
def test_buffered_strategies_average_each_key_over_the_updates_that_carry_it(
    strategy: StrategyConfig, expected: dict[str, torch.Tensor]
) -> None:
    # Arrange
    fold = build_strategy(strategy)
    x = model()
    # Act
    assert fold.add(x, contrib("a", BOTH, n=1)) is None
    receipts = fold.add(x, contrib("b", HEAD, n=3))
    # Assert
    assert receipts is not None and len(receipts) == 2
    assert_close({k: x[k] for k in expected}, expected)
    assert int(x["steps"]) == 7


def test_a_key_no_update_carries_is_left_exactly_as_it_was() -> None:
    # Arrange: FedAdam would move a key with a zero gradient through its moments
    fold = build_strategy(StrategyConfig(buffer_size=1, server_optimizer="fedadam"))
    x = model()
    x["backbone"] = t(1.0, 2.0, 3.0)
    # Act
    fold.add(x, contrib("a", BOTH))
    fold.add(x, contrib("b", HEAD))
    # Assert: backbone moved once (first version) and not at the second, head both times
    after_first = x["backbone"].clone()
    fold.add(x, contrib("c", HEAD))
    assert_close(x["backbone"], after_first)
    assert not torch.equal(x["backbone"], t(1.0, 2.0, 3.0))


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        # x <- (1 - 0.5) x + 0.5 (x_base + delta) on the carried key only
        ({"head": t(2.0, -2.0)}, {"backbone": t(0.0, 0.0, 0.0), "head": t(1.0, -1.0)}),
        (BOTH, {"backbone": t(2.0, 2.0, 2.0), "head": t(0.5, 0.5)}),
    ],
)
def test_fedasync_mixes_only_the_carried_keys(
    delta: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    # Arrange
    fold = build_strategy(
        StrategyConfig(name="fedasync", alpha=0.5, staleness=StalenessConfig(name="constant"))
    )
    x = model()
    # Act
    fold.add(x, contrib("a", delta))
    # Assert
    assert_close({k: x[k] for k in expected}, expected)


def test_a_partial_update_with_an_unknown_key_folds_nothing() -> None:
    # Arrange
    fold = build_strategy(StrategyConfig(buffer_size=1))
    x = model()
    # Act / Assert
    with pytest.raises(KeyError, match="unexpected key 'adapter'"):
        fold.add(x, contrib("a", {"head": t(1.0, 1.0), "adapter": t(1.0)}))
    assert fold.pending() == []
    assert_close(x, model())
