"""The tensor codec: safetensors round trips and schema validation with reasons."""

from __future__ import annotations

import pickle

import pytest
import torch

from schemas import Rejection, RejectReason
from schemas.codec import decode, decode_validated, encode, schema_of, sha256_hex, validate

pytestmark = pytest.mark.unit


def _model() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    ],
)
def test_round_trip_keeps_values_and_dtype(dtype: torch.dtype) -> None:
    # Arrange
    tensors = {"t": torch.arange(4).reshape(2, 2).to(dtype)}
    # Act
    back = decode(encode(tensors))
    # Assert
    torch.testing.assert_close(back["t"], tensors["t"])
    assert back["t"].dtype == dtype


@pytest.mark.parametrize(("codec", "wire"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_codecs_cast_on_the_wire_and_restore(codec: str, wire: torch.dtype) -> None:
    # Arrange
    model = _model()
    # Act
    raw = decode(encode(model, codec))  # type: ignore[arg-type]
    restored = decode_validated(encode(model, codec), schema_of(model), codec)  # type: ignore[arg-type]
    # Assert
    assert raw["w"].dtype == wire
    assert restored["w"].dtype == torch.float32
    torch.testing.assert_close(restored["w"], model["w"])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", RejectReason.MALFORMED_PAYLOAD),
        (b"not safetensors at all", RejectReason.MALFORMED_PAYLOAD),
        (pickle.dumps({"w": [1.0, 2.0]}), RejectReason.MALFORMED_PAYLOAD),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", RejectReason.MALFORMED_PAYLOAD),
    ],
)
def test_garbage_is_a_malformed_payload(payload: bytes, reason: RejectReason) -> None:
    with pytest.raises(Rejection) as caught:
        decode(payload)
    assert caught.value.reason == reason


def test_truncated_payload_is_rejected() -> None:
    data = encode(_model())
    with pytest.raises(Rejection) as caught:
        decode(data[:-5])
    assert caught.value.reason == RejectReason.MALFORMED_PAYLOAD


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"w": torch.zeros(2, 3)}, RejectReason.WRONG_KEYS),
        (
            {"w": torch.zeros(2, 3), "b": torch.zeros(3), "x": torch.zeros(1)},
            RejectReason.WRONG_KEYS,
        ),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, RejectReason.WRONG_SHAPE),
        (
            {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)},
            RejectReason.WRONG_DTYPE,
        ),
        ({"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}, RejectReason.NON_FINITE),
        (
            {"w": torch.zeros(2, 3), "b": torch.tensor([0.0, float("inf"), 0.0])},
            RejectReason.NON_FINITE,
        ),
    ],
)
def test_validate_names_the_reason(tensors: dict[str, torch.Tensor], reason: RejectReason) -> None:
    # Arrange
    schema = schema_of(_model())
    # Act / assert
    with pytest.raises(Rejection) as caught:
        validate(tensors, schema)
    assert caught.value.reason == reason


def test_fp16_codec_expects_half_floats_on_the_wire() -> None:
    schema = schema_of(_model())
    with pytest.raises(Rejection) as caught:
        validate(_model(), schema, "fp16")
    assert caught.value.reason == RejectReason.WRONG_DTYPE


def test_sha256_is_hex_of_the_bytes() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
