"""Lossy update codecs beyond a cast: int8 quantization and top-k sparsification.

Both still travel as plain safetensors (see schemas/codec.py for why never pickle); a
compressed float tensor `{name}` becomes several wire tensors named after it:

- `int8`: `{name}` int8 of the schema's shape plus `{name}.__scale` float32, one scale for
  the tensor (shape `()`); `int8:channel` keeps one scale per row (shape `(rows,)`).
  Values are `round(x / scale)` clamped to [-127, 127], so the error is at most scale / 2.
- `topk:FRACTION`: `{name}.__idx` (int32, or int64 past 2**31 elements), strictly increasing
  flat indices, and `{name}.__val` float32 of the same length: the k = ceil(FRACTION * n)
  largest magnitudes. The shape comes from the job's schema, never from the sender.

Non-float tensors travel as they are. `expand` is the aggregator's side: it checks the exact
key set, every shape, dtype, bound and value before it rebuilds a dense tensor, so a hostile
payload is a Rejection and never an IndexError or an allocation the sender chose.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import get_args

import torch
from pydantic import TypeAdapter, ValidationError

from schemas.errors import Rejection, RejectReason
from schemas.messages import Codec, DType, TensorSpec
from schemas.safetensors_format import all_finite

Tensors = Mapping[str, torch.Tensor]

SCALE, IDX, VAL = ".__scale", ".__idx", ".__val"
_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_INT8_MAX = 127
_WIRE_DTYPES = {getattr(torch, name) for name in get_args(DType)}


_CODEC_ADAPTER: TypeAdapter[str] = TypeAdapter(Codec)


def parse_codec(value: str) -> Codec:
    """Check a codec string as the update header will; raise ValueError with one line if bad."""
    try:
        return _CODEC_ADAPTER.validate_python(value, strict=True)
    except ValidationError:
        raise ValueError(
            f"unknown codec {value!r}; choose none, fp16, bf16, int8, int8:channel "
            "or topk:FRACTION with 0 < FRACTION <= 1"
        ) from None


def is_compressed(codec: Codec) -> bool:
    """Tell whether a codec is one of this module's (int8 or top-k) rather than a cast."""
    return codec.startswith(("int8", "topk:"))


def topk_fraction(codec: Codec) -> float | None:
    """Return the FRACTION of a `topk:FRACTION` codec, None for any other codec."""
    return float(codec.removeprefix("topk:")) if codec.startswith("topk:") else None


def topk_count(numel: int, fraction: float) -> int:
    """Count the entries top-k keeps of `numel`: at least one of a non-empty tensor."""
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _per_channel(codec: Codec, shape: tuple[int, ...]) -> bool:
    return codec == "int8:channel" and len(shape) >= 2


def _scale_shape(codec: Codec, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if _per_channel(codec, shape) else ()


def compress(tensors: Tensors, codec: Codec) -> dict[str, torch.Tensor]:
    """Turn `{name: tensor}` into the wire tensors of an int8 or top-k codec."""
    wire: dict[str, torch.Tensor] = {}
    fraction = topk_fraction(codec)
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        if t.dtype not in _WIRE_DTYPES:
            raise ValueError(f"dtype {t.dtype} is not supported on the wire")
        if not t.is_floating_point():
            wire[name] = t.contiguous()
        elif fraction is not None:
            wire[name + IDX], wire[name + VAL] = _topk(t, fraction)
        else:
            wire[name], wire[name + SCALE] = _quantize(t, codec)
    return wire


def _quantize(t: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    x = t.to(torch.float32)
    if _per_channel(codec, tuple(t.shape)):
        peak = x.abs().reshape(x.shape[0], -1).amax(dim=1) if x.numel() else torch.zeros(0)
        view = (-1,) + (1,) * (x.dim() - 1)
    else:
        peak = x.abs().max() if x.numel() else torch.tensor(0.0)
        view = ()
    # An all-zero tensor (or row) gets scale 0 and decodes to exact zeros.
    scale = (peak / _INT8_MAX).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(view)
    q = torch.round(x / safe).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _topk(t: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.reshape(-1).to(torch.float32)
    k = topk_count(flat.numel(), fraction)
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return idx.to(_index_dtype(flat.numel())).contiguous(), flat[idx].contiguous()


def expected_keys(schema: Mapping[str, TensorSpec], codec: Codec) -> set[str]:
    """List the exact wire keys a payload of this schema and codec must hold."""
    keys: set[str] = set()
    for name, spec in schema.items():
        if spec.dtype not in _FLOAT_DTYPES:
            keys.add(name)
        elif topk_fraction(codec) is not None:
            keys |= {name + IDX, name + VAL}
        else:
            keys |= {name, name + SCALE}
    return keys


def wire_names(wire_keys: Iterable[str], codec: Codec) -> set[str]:
    """Name the schema tensors a compressed payload's wire keys stand for."""
    suffixes = (IDX, VAL) if topk_fraction(codec) is not None else (SCALE,)
    names: set[str] = set()
    for key in wire_keys:
        for suffix in suffixes:
            key = key.removesuffix(suffix)
        names.add(key)
    return names


def expand(
    wire: Tensors, schema: Mapping[str, TensorSpec], codec: Codec
) -> dict[str, torch.Tensor]:
    """Validate wire tensors against the schema and rebuild them dense, in the schema's dtypes."""
    expected = expected_keys(schema, codec)
    missing, extra = expected - wire.keys(), wire.keys() - expected
    if missing or extra:
        raise Rejection(
            RejectReason.WRONG_KEYS, f"missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
        )
    fraction = topk_fraction(codec)
    out: dict[str, torch.Tensor] = {}
    for name, spec in schema.items():
        dtype: torch.dtype = getattr(torch, spec.dtype)
        if spec.dtype not in _FLOAT_DTYPES:
            _check(name, wire[name], spec.shape, dtype)
            out[name] = wire[name]
        elif fraction is not None:
            out[name] = _expand_topk(name, wire, spec, fraction).to(dtype)
        else:
            out[name] = _expand_int8(name, wire, spec, codec).to(dtype)
    return out


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape:
        raise Rejection(RejectReason.WRONG_SHAPE, f"{name}: {tuple(t.shape)} != {shape}")
    if t.dtype != dtype:
        raise Rejection(RejectReason.WRONG_DTYPE, f"{name}: {t.dtype} != {dtype}")
    if t.is_floating_point() and not all_finite(t):
        raise Rejection(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")


def _expand_int8(name: str, wire: Tensors, spec: TensorSpec, codec: Codec) -> torch.Tensor:
    q, scale = wire[name], wire[name + SCALE]
    _check(name, q, spec.shape, torch.int8)
    _check(name + SCALE, scale, _scale_shape(codec, spec.shape), torch.float32)
    if bool((scale < 0).any()):
        raise Rejection(RejectReason.MALFORMED_PAYLOAD, f"{name}: negative scale")
    if q.numel() and int(q.min()) < -_INT8_MAX:
        # -128 is never produced: accepting it would make the range asymmetric.
        raise Rejection(RejectReason.MALFORMED_PAYLOAD, f"{name}: int8 value -128")
    view = (-1,) + (1,) * (len(spec.shape) - 1) if scale.dim() else ()
    return q.to(torch.float32) * scale.reshape(view)


def _expand_topk(name: str, wire: Tensors, spec: TensorSpec, fraction: float) -> torch.Tensor:
    idx, val = wire[name + IDX], wire[name + VAL]
    numel = math.prod(spec.shape)
    k = topk_count(numel, fraction)
    _check(name + IDX, idx, (k,), _index_dtype(numel))
    _check(name + VAL, val, (k,), torch.float32)
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
        raise Rejection(RejectReason.MALFORMED_PAYLOAD, f"{name}: index out of [0, {numel})")
    # Strictly increasing rules out duplicates too, and makes the bounds check two reads.
    if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise Rejection(RejectReason.MALFORMED_PAYLOAD, f"{name}: indices not strictly increasing")
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[idx.to(torch.int64)] = val
    return dense.reshape(spec.shape)


def round_trip(tensors: Tensors, codec: Codec) -> dict[str, torch.Tensor]:
    """Return what the aggregator will decode from `tensors` (the device's error feedback)."""
    schema = {
        name: TensorSpec(shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))  # type: ignore[arg-type]
        for name, t in tensors.items()
    }
    return expand(compress(tensors, codec), schema, codec)


def error_feedback(
    delta: Tensors, residual: Tensors, codec: Codec
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Add last round's unsent residual to `delta`; return (delta to send, new residual).

    Top-k drops most coordinates each round; carrying what was dropped into the next round
    lets small but steady coordinates accumulate until they are sent (error feedback).
    """
    corrected = {
        name: t + residual[name] if name in residual else t.clone() for name, t in delta.items()
    }
    sent = round_trip(corrected, codec)
    kept = {
        name: corrected[name] - sent[name]
        for name in corrected
        if corrected[name].is_floating_point()
    }
    return corrected, kept
