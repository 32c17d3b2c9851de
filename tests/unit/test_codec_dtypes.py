"""Every codec against every dtype, the in-place safetensors reader, and its clean refusals."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.testing import assert_close

from schemas import Rejection, RejectReason
from schemas.codec import decode, decode_validated, encode, encode_buffer, schema_of
from schemas.safetensors_format import (
    FINITE_BLOCK,
    all_finite,
    deserialize,
    has_no_views,
    serialize,
)

pytestmark = pytest.mark.unit

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NON_FLOATS = [torch.int64, torch.int32, torch.uint8, torch.bool]
MODEL_DTYPES = [*FLOATS, *NON_FLOATS]
CODECS = ["none", "fp16", "bf16", "int8", "int8:channel", "topk:1", "topk:0.5"]
# Dtypes torch has and a model schema does not: refused on the way out and on the way in.
FOREIGN = [torch.int16, torch.int8, torch.uint16, torch.float8_e4m3fn, torch.complex64]


def _values(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.tensor([[True, False, True], [False, False, True]])
    return torch.tensor([[0.5, -1.25, 2.0], [3.0, 0.0, -4.5]]).to(dtype)


def _raw(header: dict[str, Any], data: bytes, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_every_codec_round_trips_every_model_dtype(codec: str, dtype: torch.dtype) -> None:
    # Arrange
    tensors = {"t": _values(dtype), "scalar": torch.tensor(1.5).to(dtype)}
    schema = schema_of(tensors)
    # Act
    back = decode_validated(encode(tensors, codec), schema, codec)
    # Assert: floats within the codec's error, non-floats exactly, dtypes the schema's
    assert {name: t.dtype for name, t in back.items()} == {n: dtype for n in tensors}
    if codec == "none" or not dtype.is_floating_point:
        assert_close(back, tensors, rtol=0, atol=0)
    else:
        tolerance = 0.05 if codec.startswith("int8") else 0.02
        expected = dict(tensors)
        if codec == "topk:0.5":
            # Half the entries are kept, the largest magnitudes; the rest decode as zeros.
            kept = tensors["t"].abs().reshape(-1).float().topk(3).indices
            mask = torch.zeros(6, dtype=torch.bool)
            mask[kept] = True
            expected["t"] = torch.where(mask.reshape(2, 3), tensors["t"], 0).to(dtype)
        assert_close(back, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [*MODEL_DTYPES, torch.int16, torch.int8])
def test_bytes_are_those_of_the_safetensors_package(dtype: torch.dtype) -> None:
    # Arrange: names out of order, an empty tensor and a scalar beside the big one
    tensors = {
        "z": _values(dtype),
        "a": torch.zeros(0, 3).to(dtype),
        "m": torch.tensor(1).to(dtype),
        "b": torch.ones(5, dtype=torch.float32),
    }
    # Act / Assert: same bytes, so a version hashes the same whichever writer made it
    assert bytes(serialize(tensors)) == st_save(tensors)
    if dtype in MODEL_DTYPES:  # int8 and int16 are compression's wire tensors only
        assert encode(tensors) == st_save(tensors)
    assert_close(deserialize(st_save(tensors)), st_load(st_save(tensors)), rtol=0, atol=0)


def test_a_bytearray_is_decoded_in_place_and_bytes_are_copied() -> None:
    # Arrange
    buffer = encode_buffer({"w": torch.arange(1000, dtype=torch.float32)})
    frozen = bytes(buffer)
    # Act
    in_place = decode(buffer)["w"]
    copied = decode(frozen)["w"]
    in_place += 1
    copied += 1
    # Assert: the tensor is the buffer's memory (no copy); bytes stayed as they were
    assert decode(buffer)["w"][0] == 1
    assert decode(frozen)["w"][0] == 0


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_encoding_into_a_buffer_of_the_right_length_reuses_it(codec: str) -> None:
    # Arrange: a buffer of the encoding's length, full of other bytes, and one byte too long
    tensors = {"w": torch.linspace(-1, 1, 300), "b": torch.ones(7)}
    expected = encode(tensors, codec)
    right = bytearray(b"\xff" * len(expected))
    wrong = bytearray(len(expected) + 1)
    # Act
    into_right = encode_buffer(tensors, codec, into=right)
    into_wrong = encode_buffer(tensors, codec, into=wrong)
    # Assert: the same bytes either way; only the right length is written into
    assert into_right is right and bytes(right) == expected
    assert into_wrong is not wrong and bytes(into_wrong) == expected
    assert wrong == bytearray(len(expected) + 1)


def test_a_buffer_has_views_while_a_tensor_decoded_from_it_lives() -> None:
    # Arrange
    buffer = encode_buffer({"w": torch.arange(10, dtype=torch.float32), "e": torch.ones(0)})
    length = len(buffer)
    # Act
    tensors = decode(buffer)
    held = has_no_views(buffer)
    del tensors
    free = has_no_views(buffer)
    # Assert: refused while a view exists, allowed after; the check leaves the buffer as it was
    assert not held
    assert free
    assert len(buffer) == length and decode(buffer)["w"][9] == 9


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", FOREIGN)
def test_encoding_a_foreign_dtype_is_refused_clearly(codec: str, dtype: torch.dtype) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="not supported on the wire"):
        encode({"t": torch.zeros(2, dtype=dtype)}, codec)


@pytest.mark.parametrize(
    ("dtype", "reason"),
    [
        (torch.int16, RejectReason.WRONG_DTYPE),
        (torch.int8, RejectReason.WRONG_DTYPE),
        (torch.uint16, RejectReason.MALFORMED_PAYLOAD),
        (torch.float8_e4m3fn, RejectReason.MALFORMED_PAYLOAD),
        (torch.int64, RejectReason.WRONG_DTYPE),
    ],
)
def test_a_payload_in_a_foreign_dtype_is_a_rejection_not_a_crash(
    dtype: torch.dtype, reason: RejectReason
) -> None:
    # Arrange: the package writes what torch has; before, int16 escaped as a ValueError
    payload = st_save({"w": torch.zeros(2, dtype=dtype)})
    schema = schema_of({"w": torch.zeros(2)})
    # Act / Assert
    with pytest.raises(Rejection) as refused:
        decode_validated(payload, schema)
    assert refused.value.reason == reason


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"\x00" * 7, "too short"),
        (struct.pack("<Q", 2**40) + b"{}", "header length"),
        (_raw({}, b"")[:-1] + b"\xff", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 4) + b"  {}", "not a JSON object"),
        (
            struct.pack("<Q", 2 * len(json.dumps(GOOD)) - 1)
            + (json.dumps(GOOD)[:-1] + "," + json.dumps(GOOD)[1:]).encode()
            + b"\x00" * 8,
            "duplicate",
        ),
        (_raw({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
        (_raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "fit"),
        (_raw({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
        (
            _raw({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "shape",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}}, b"\0" * 8),
            "offsets",
        ),
        (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8), "offsets"),
        (_raw({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly"),
        (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "holes"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
        (_raw(GOOD, b"\0" * 12), "after the last tensor"),
        (_raw(GOOD, b"\0" * 4), "fit"),
        (_raw({"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"), "bool"),
    ],
)
def test_malformed_safetensors_are_rejected_with_a_reason(payload: bytes, detail: str) -> None:
    # Act / Assert
    with pytest.raises(Rejection, match=detail) as refused:
        decode(payload)
    assert refused.value.reason == RejectReason.MALFORMED_PAYLOAD


def test_metadata_is_ignored_and_a_misaligned_tensor_is_copied_aligned() -> None:
    # Arrange: one pad byte puts the float32 data at an odd offset
    header = {"__metadata__": {"k": "v"}, **GOOD}
    payload = bytearray(_raw(header, struct.pack("<2f", 1.5, -2.0), pad=1))
    # Act
    out = decode(payload)
    # Assert
    assert list(out) == ["w"]
    assert_close(out["w"], torch.tensor([1.5, -2.0]))
    assert out["w"].data_ptr() % 4 == 0


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0], True),
        ([3e38, 3e38, -1.0], True),  # the sum overflows; every entry is still finite
        ([1.0, float("nan")], False),
        ([float("inf"), float("-inf")], False),
        ([float("-inf"), 1.0], False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_all_finite_is_exact_whatever_the_sum_does(
    values: list[float], finite: bool, dtype: torch.dtype
) -> None:
    # Arrange: the odd value sits past the first block, after many ordinary ones
    tensor = torch.cat([torch.ones(FINITE_BLOCK + 5), torch.tensor(values)]).to(dtype)
    if dtype == torch.float16 and finite:
        tensor = tensor.clamp(-60_000, 60_000)
    # Act / Assert
    assert all_finite(tensor) is finite


def _interleaved() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A hand-made payload whose dtypes alternate (the package's writer groups them), with
    an empty tensor between two of a run: float32, empty int64, float32, int64, float32."""
    tensors = {
        "a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "gap": torch.zeros((0, 3), dtype=torch.int64),
        "b": torch.tensor([5.0, 6.0]),
        "steps": torch.tensor([7, 8], dtype=torch.int64),
        "c": torch.tensor([9.0, -1.0]),
    }
    header: dict[str, Any] = {}
    data = b""
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        code = "F32" if t.dtype == torch.float32 else "I64"
        header[name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    # Padded so the data section starts 8-aligned, as the package's own files do.
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data, tensors


def test_tensors_of_alternating_dtypes_decode_as_the_package_reads_them() -> None:
    # Arrange
    payload, tensors = _interleaved()
    # Act
    out = decode(bytearray(payload))
    # Assert: the package's own reading, in the header's order
    expected = st_load(payload)
    assert list(out) == list(tensors)
    for name in tensors:
        assert out[name].dtype == expected[name].dtype
        assert_close(out[name], expected[name])


def test_a_non_finite_value_among_many_tensors_is_named() -> None:
    # Arrange: 50 float tensors in one run, a NaN in the 31st
    model = {f"layer{i:02d}": torch.full((3, 4), float(i)) for i in range(50)}
    update = {name: t.clone() for name, t in model.items()}
    update["layer30"][1, 2] = float("nan")
    # Act / Assert
    with pytest.raises(Rejection, match="layer30 holds NaN") as refused:
        decode_validated(bytearray(encode(update)), schema_of(model))
    assert refused.value.reason == RejectReason.NON_FINITE


def test_finite_tensors_whose_sum_overflows_are_accepted() -> None:
    # Arrange: every value finite, their sum over the run is not
    model = {f"w{i}": torch.zeros(2) for i in range(4)}
    update = {name: torch.tensor([3e38, 3e38]) for name in model}
    # Act
    out = decode_validated(bytearray(encode(update)), schema_of(model))
    # Assert
    assert_close(out["w3"], torch.tensor([3e38, 3e38]))


def test_a_bad_bool_byte_names_its_tensor() -> None:
    # Arrange: three bool tensors in one run, byte 2 in the second
    header = {
        name: {"dtype": "BOOL", "shape": [2], "data_offsets": [2 * i, 2 * i + 2]}
        for i, name in enumerate(["m0", "m1", "m2"])
    }
    payload = _raw(header, bytes([1, 0, 0, 2, 1, 1]))
    # Act / Assert
    with pytest.raises(Rejection, match="'m1': bool bytes"):
        decode(payload)
