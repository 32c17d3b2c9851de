"""Compressed update codecs: int8 and top-k round trips, error feedback, hostile payloads."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save

from aggregator.service import Aggregator
from schemas import Rejection, RejectReason, StalenessConfig, StrategyConfig, UpdateHeader
from schemas.codec import decode, decode_validated, encode, schema_of
from schemas.compression import (
    IDX,
    SCALE,
    VAL,
    compress,
    error_feedback,
    parse_codec,
    round_trip,
    topk_count,
)
from schemas.digests import blake3_hex
from tests.integration.helpers import INITIAL, edit_fields, job_backends, update

pytestmark = pytest.mark.unit
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CODECS = ["int8", "int8:channel", "topk:0.5", "topk:1"]


def _model(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 6, generator=g).to(dtype),
        "b": torch.randn(6, generator=g).to(dtype),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_restores_schema_dtype_and_shape(codec: str, dtype: torch.dtype) -> None:
    # Arrange
    model = _model(dtype)
    # Act
    back = decode_validated(encode(model, codec), schema_of(model), codec)
    # Assert: dense again, in the schema's dtype; ints untouched; topk:1 and int8 are close
    for name, t in model.items():
        assert back[name].dtype == t.dtype
        assert back[name].shape == t.shape
    torch.testing.assert_close(back["steps"], model["steps"])
    if codec == "topk:1":
        torch.testing.assert_close(back["w"], model["w"])
    elif codec.startswith("int8"):
        torch.testing.assert_close(back["w"], model["w"], atol=0.03, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("codec", CODECS)
def test_non_float_tensors_travel_uncompressed(codec: str, dtype: torch.dtype) -> None:
    model = {"t": torch.arange(4).reshape(2, 2).to(dtype)}
    wire = decode(encode(model, codec))
    assert set(wire) == {"t"}
    torch.testing.assert_close(
        decode_validated(encode(model, codec), schema_of(model), codec)["t"], model["t"]
    )


@pytest.mark.parametrize("codec", CODECS)
def test_an_unsupported_dtype_is_cleanly_refused(codec: str) -> None:
    with pytest.raises(ValueError, match="not supported on the wire"):
        encode({"t": torch.zeros(2, dtype=torch.int16)}, codec)


def test_int8_error_is_at_most_half_a_step() -> None:
    # Arrange: peak 1.27 -> scale 0.01, so every value lands within 0.005 of the original
    x = torch.tensor([1.27, -0.004, 0.006, 0.5049, -1.0])
    # Act
    wire = compress({"x": x}, "int8")
    back = round_trip({"x": x}, "int8")["x"]
    # Assert
    scale = float(wire["x" + SCALE])
    assert scale == pytest.approx(0.01)
    assert wire["x"].tolist() == [127, 0, 1, 50, -100]
    assert float((back - x).abs().max()) <= scale / 2 + 1e-7


def test_int8_per_channel_keeps_one_scale_per_row() -> None:
    # Arrange: rows of very different ranges; one scale for both would zero the second row
    x = torch.tensor([[1.0, -2.0], [0.01, 0.02]])
    # Act
    wire = compress({"x": x}, "int8:channel")
    back = round_trip({"x": x}, "int8:channel")["x"]
    # Assert: each row within half of its own step
    scale = wire["x" + SCALE]
    torch.testing.assert_close(scale, torch.tensor([2.0, 0.02]) / 127)
    assert bool(((back - x).abs() <= scale.reshape(2, 1) / 2 + 1e-7).all())


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    # Arrange: 10 entries, 30% -> k = 3; the largest magnitudes sit at 1, 4 and 8
    x = torch.tensor([0.1, -5.0, 0.2, 0.0, 4.0, -0.3, 0.05, 0.0, -3.0, 1.0]).reshape(2, 5)
    # Act
    wire = compress({"x": x}, "topk:0.3")
    back = round_trip({"x": x}, "topk:0.3")["x"]
    # Assert
    assert wire["x" + IDX].tolist() == [1, 4, 8]
    assert wire["x" + IDX].dtype == torch.int32
    assert wire["x" + VAL].tolist() == [-5.0, 4.0, -3.0]
    expected = torch.zeros(10)
    expected[[1, 4, 8]] = torch.tensor([-5.0, 4.0, -3.0])
    torch.testing.assert_close(back, expected.reshape(2, 5))


@pytest.mark.parametrize(
    ("numel", "fraction", "k"),
    [(100, 0.01, 1), (101, 0.01, 2), (5, 1.0, 5), (3, 1e-6, 1), (0, 0.5, 0)],
)
def test_topk_count_rounds_up_and_keeps_at_least_one(numel: int, fraction: float, k: int) -> None:
    assert topk_count(numel, fraction) == k


def test_error_feedback_accumulates_what_was_not_sent() -> None:
    # Arrange: top-1 of 4; a small steady coordinate (index 3) loses to index 0 at first
    delta = {"x": torch.tensor([1.0, 0.0, 0.0, 0.4])}
    residual: dict[str, torch.Tensor] = {}
    sent = []
    # Act: three rounds of the same delta
    for _ in range(3):
        corrected, residual = error_feedback(delta, residual, "topk:0.25")
        sent.append(round_trip(corrected, "topk:0.25")["x"])
    # Assert: the residual carries 0.4, 0.8, then 1.2 > 1.0 gets index 3 through
    torch.testing.assert_close(sent[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(sent[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(sent[2], torch.tensor([0.0, 0.0, 0.0, 1.2]))
    torch.testing.assert_close(residual["x"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # Nothing is lost: everything sent plus the residual equals everything trained
    torch.testing.assert_close(sum(sent) + residual["x"], 3 * delta["x"])


def _wire(codec: str) -> dict[str, torch.Tensor]:
    return compress({"w": torch.arange(6.0).reshape(2, 3)}, codec)


SCHEMA = schema_of({"w": torch.zeros(2, 3)})


@pytest.mark.parametrize(
    ("codec", "tamper", "reason"),
    [
        ("int8", lambda w: w.pop("w" + SCALE), RejectReason.WRONG_KEYS),
        ("int8", lambda w: w.update({"w.__idx": torch.zeros(1)}), RejectReason.WRONG_KEYS),
        (
            "int8",
            lambda w: w.update({"w" + SCALE: torch.tensor(float("nan"))}),
            RejectReason.NON_FINITE,
        ),
        (
            "int8",
            lambda w: w.update({"w" + SCALE: torch.tensor(-1.0)}),
            RejectReason.MALFORMED_PAYLOAD,
        ),
        ("int8", lambda w: w.update({"w" + SCALE: torch.ones(2)}), RejectReason.WRONG_SHAPE),
        ("int8", lambda w: w.update({"w": w["w"].float()}), RejectReason.WRONG_DTYPE),
        ("int8", lambda w: w["w"].fill_(-128), RejectReason.MALFORMED_PAYLOAD),
        (
            "topk:0.5",
            lambda w: w["w" + IDX].copy_(torch.tensor([0, 1, 6])),
            RejectReason.MALFORMED_PAYLOAD,
        ),
        (
            "topk:0.5",
            lambda w: w["w" + IDX].copy_(torch.tensor([-1, 1, 2])),
            RejectReason.MALFORMED_PAYLOAD,
        ),
        (
            "topk:0.5",
            lambda w: w["w" + IDX].copy_(torch.tensor([1, 1, 2])),
            RejectReason.MALFORMED_PAYLOAD,
        ),
        (
            "topk:0.5",
            lambda w: w["w" + IDX].copy_(torch.tensor([2, 1, 0])),
            RejectReason.MALFORMED_PAYLOAD,
        ),
        (
            "topk:0.5",
            lambda w: w.update({"w" + IDX: torch.arange(6, dtype=torch.int32)}),
            RejectReason.WRONG_SHAPE,
        ),
        (
            "topk:0.5",
            lambda w: w.update({"w" + IDX: w["w" + IDX].long()}),
            RejectReason.WRONG_DTYPE,
        ),
        ("topk:0.5", lambda w: w["w" + VAL].fill_(float("inf")), RejectReason.NON_FINITE),
        ("topk:0.5", lambda w: w.update({"w": torch.zeros(2, 3)}), RejectReason.WRONG_KEYS),
    ],
)
def test_hostile_payloads_are_rejections(codec: str, tamper: object, reason: RejectReason) -> None:
    # Arrange
    wire = _wire(codec)
    tamper(wire)  # type: ignore[operator]
    # Act / assert
    with pytest.raises(Rejection) as caught:
        decode_validated(bytes(save(wire)), SCHEMA, codec)
    assert caught.value.reason == reason


def test_a_payload_of_another_codec_is_rejected() -> None:
    with pytest.raises(Rejection) as caught:
        decode_validated(encode({"w": torch.zeros(2, 3)}, "int8"), SCHEMA, "topk:0.5")
    assert caught.value.reason == RejectReason.WRONG_KEYS


@pytest.mark.parametrize(
    "codec",
    ["none", "fp16", "bf16", "int8", "int8:channel", "topk:0.01", "topk:1", "topk:1.0", "topk:.5"],
)
def test_header_accepts_known_codecs(codec: str) -> None:
    assert parse_codec(codec) == codec


@pytest.mark.parametrize(
    "codec",
    [
        "zip",
        "topk",
        "topk:",
        "topk:0",
        "topk:0.0",
        "topk:1.5",
        "topk:2",
        "topk:-0.1",
        "int4",
        "topk:0.01 ",
    ],
)
def test_header_refuses_unknown_codecs(codec: str) -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        parse_codec(codec)
    with pytest.raises(ValidationError):
        UpdateHeader(
            job="j",
            update_id="0" * 8 + "-0000-0000-0000-" + "0" * 12,
            device_id="d",
            base_version=0,
            num_samples=1,
            codec=codec,
            payload_sha256="0" * 64,
            payload_bytes=0,
            sent_at=0.0,
        )


async def test_aggregator_folds_an_int8_update(job_id: str) -> None:
    # Arrange: one int8 update over the in-memory backends, FedBuff with K=1
    strategy = StrategyConfig(
        name="fedbuff", buffer_size=1, max_staleness=0, staleness=StalenessConfig(name="constant")
    )
    delta = {"w": torch.tensor([1.0, -0.5, 0.25, 0.0]), "b": torch.tensor([2.0])}
    async with job_backends("memory", job_id, strategy) as backends:
        headers, _, update_id = update(job_id, delta)
        body = encode(delta, "int8")
        headers = edit_fields(
            headers, codec="int8", payload_blake3=blake3_hex(body), payload_bytes=len(body)
        )
        await backends.broker.publish_raw(job_id, body, headers=headers, message_id=update_id)
        # Act
        async with Aggregator(
            job=job_id,
            broker=backends.broker,
            store=backends.store,
            idle_timeout=0.5,
            retry_seconds=0.1,
        ) as aggregator:
            await aggregator.run()
        # Assert: version 1 is the initial model plus the dequantized delta
        assert aggregator.stats.applied == 1
        assert aggregator.stats.rejected == {}
        model = decode((await backends.store.get_model(1)) or b"")
        torch.testing.assert_close(model["w"], INITIAL["w"] + delta["w"], atol=1 / 254, rtol=0)
        torch.testing.assert_close(model["b"], INITIAL["b"] + delta["b"])
        assert math.isclose(float(model["w"][3]), float(INITIAL["w"][3]))
