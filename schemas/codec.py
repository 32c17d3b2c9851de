"""The one tensor codec: `{name: tensor}` <-> safetensors bytes, and update validation.

Why not pickle (torch.save/torch.load, numpy allow_pickle): unpickling runs code chosen by
whoever wrote the bytes, and every byte here comes from a device we do not control.
safetensors is a flat JSON header plus raw little-endian buffers: parsing it can fail, but
it cannot execute anything. NEVER replace it with torch.load, not even with weights_only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from schemas.compression import compress, expand, is_compressed, wire_names
from schemas.errors import Rejection, RejectReason
from schemas.messages import Codec, TensorSpec
from schemas.safetensors_format import (
    ByteBuffer,
    all_finite,
    deserialize,
    deserialize_with_runs,
    serialize,
)

Tensors = Mapping[str, torch.Tensor]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# The cast codecs; int8 and top-k live in schemas/compression.py.
_CODEC_DTYPES: dict[Codec, torch.dtype | None] = {
    "none": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Name a torch dtype as the model schema spells it."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported on the wire") from None


def schema_of(tensors: Tensors) -> dict[str, TensorSpec]:
    """Describe a state dict as the `{name: TensorSpec}` schema a job stores."""
    return {
        name: TensorSpec(shape=tuple(t.shape), dtype=dtype_name(t.dtype))  # type: ignore[arg-type]
        for name, t in tensors.items()
    }


def schema_nbytes(schema: Mapping[str, TensorSpec]) -> int:
    """Return the bytes a model of `schema` holds in memory (its tensors' data)."""
    return sum(
        math.prod(spec.shape) * _dtype_from_name(spec.dtype).itemsize for spec in schema.values()
    )


def sha256_hex(data: ByteBuffer | memoryview) -> str:
    """Hash payload bytes the way headers and version metadata record them."""
    return hashlib.sha256(data).hexdigest()


def encode_buffer(
    tensors: Tensors, codec: Codec = "none", into: bytearray | None = None
) -> bytearray:
    """Serialize tensors to safetensors in one bytearray (no intermediate copies): `into` if
    its length is exactly right, else a new one."""
    if is_compressed(codec):
        return serialize(compress(tensors, codec), into)
    wire_dtype = _CODEC_DTYPES[codec]
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        # int8/int16 are only compression's wire tensors; a model never holds them.
        dtype_name(t.dtype)
        if wire_dtype is not None and t.is_floating_point():
            t = t.to(wire_dtype)
        prepared[name] = t
    return serialize(prepared, into)


def encode(tensors: Tensors, codec: Codec = "none") -> bytes:
    """Serialize tensors to safetensors bytes, casting or compressing floats as the codec says."""
    return bytes(encode_buffer(tensors, codec))


def decode(data: ByteBuffer) -> dict[str, torch.Tensor]:
    """Parse safetensors into tensors; anything else is a MALFORMED_PAYLOAD rejection.

    A bytearray is decoded in place: the tensors are views into it, so the caller hands it
    over and must not reuse it. Bytes are copied once into writable memory.
    """
    return deserialize(data)


def _wire_dtype_name(name: str, tensor: torch.Tensor) -> str:
    try:
        return dtype_name(tensor.dtype)
    except ValueError:
        raise Rejection(
            RejectReason.WRONG_DTYPE, f"{name}: dtype {tensor.dtype} is not a model dtype"
        ) from None


def present_schema(
    tensors: Tensors, schema: Mapping[str, TensorSpec], codec: Codec, *, partial: bool
) -> Mapping[str, TensorSpec]:
    """Return the part of the schema an update carries: all of it, or only its keys if partial.

    A partial update must still name only schema keys and carry at least one of them.
    """
    if not partial:
        return schema
    names = wire_names(tensors.keys(), codec) if is_compressed(codec) else set(tensors)
    unknown = names - schema.keys()
    if unknown:
        raise Rejection(RejectReason.WRONG_KEYS, f"extra {sorted(unknown)[:5]}")
    if not names:
        raise Rejection(RejectReason.WRONG_KEYS, "a partial update carries no tensor")
    return {name: spec for name, spec in schema.items() if name in names}


def validate(
    tensors: Tensors,
    schema: Mapping[str, TensorSpec],
    codec: Codec = "none",
    *,
    known_finite: bool = False,
) -> None:
    """Check exact key set, shapes, wire dtypes and finiteness against the job's schema
    (finiteness not again if `known_finite`: the caller has proved every value finite)."""
    if is_compressed(codec):
        expand(tensors, schema, codec)
        return
    missing = schema.keys() - tensors.keys()
    extra = tensors.keys() - schema.keys()
    if missing or extra:
        raise Rejection(
            RejectReason.WRONG_KEYS,
            f"missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}",
        )
    wire_dtype = _CODEC_DTYPES[codec]
    for name, spec in schema.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != spec.shape:
            raise Rejection(
                RejectReason.WRONG_SHAPE, f"{name}: {tuple(tensor.shape)} != {spec.shape}"
            )
        expected: str = spec.dtype
        if wire_dtype is not None and spec.dtype in ("float32", "float64", "float16", "bfloat16"):
            expected = dtype_name(wire_dtype)
        actual = _wire_dtype_name(name, tensor)
        if actual != expected:
            raise Rejection(RejectReason.WRONG_DTYPE, f"{name}: {actual} != {expected}")
        if not known_finite and tensor.is_floating_point() and not all_finite(tensor):
            raise Rejection(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")


def restore_dtypes(tensors: Tensors, schema: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Cast validated wire tensors back to the dtypes of the job's schema (undo fp16/bf16)."""
    restored = {}
    for name, t in tensors.items():
        dtype = _dtype_from_name(schema[name].dtype)
        # Already the schema's dtype (codec none): the tensor itself, not a `.to` per key.
        restored[name] = t if t.dtype == dtype else t.to(dtype)
    return restored


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = _DTYPES_BY_NAME.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def decode_validated(
    data: ByteBuffer,
    schema: Mapping[str, TensorSpec],
    codec: Codec = "none",
    *,
    partial: bool = False,
) -> dict[str, torch.Tensor]:
    """Decode, validate and restore an update payload in one call (run it off the event loop).

    With `partial`, the update may carry any non-empty subset of the schema's keys (only the
    trainable ones, say); each key it carries is checked as strictly as in a full update.
    """
    tensors, runs = deserialize_with_runs(data)
    carried = present_schema(tensors, schema, codec, partial=partial)
    if is_compressed(codec):
        return expand(tensors, carried, codec)
    # One sum per run of tensors instead of one per tensor; only if one is not finite are
    # they checked one by one, which names the culprit.
    finite = all(all_finite(run) for run in runs if run.is_floating_point())
    validate(tensors, carried, codec, known_finite=finite)
    return restore_dtypes(tensors, carried)
