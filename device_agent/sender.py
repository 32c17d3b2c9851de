"""Send one update: encode, claim-check it through the store if large, publish with confirms."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

import torch

from infra.protocols import Broker, ModelStore
from schemas import JobConfig, UpdateHeader
from schemas.codec import encode_buffer
from schemas.digests import blake3_hex
from schemas.messages import Codec, UpdateKeys
from schemas.safetensors_format import ByteBuffer
from schemas.signing import sign


def build_update(
    config: JobConfig,
    *,
    device_id: str,
    base_version: int,
    num_samples: int,
    delta: Mapping[str, torch.Tensor],
    train_metrics: Mapping[str, float],
    codec: Codec = "none",
    signing_key: str | None = None,
    keys: UpdateKeys = "all",
) -> tuple[UpdateHeader, ByteBuffer]:
    """Encode a delta and describe it in a header, signed with `signing_key` if given.

    The update id is minted here, once; the signature covers the payload through its digest.
    `keys="partial"` says the delta holds only some of the model's keys (its trainable ones).
    """
    payload = encode_buffer(delta, codec)
    header = UpdateHeader(
        job=config.job,
        update_id=str(uuid.uuid4()),
        device_id=device_id,
        base_version=base_version,
        num_samples=num_samples,
        kind="delta",
        keys=keys,
        codec=codec,
        payload="blob" if len(payload) > config.inline_limit_bytes else "inline",
        payload_blake3=blake3_hex(payload),
        payload_bytes=len(payload),
        train_metrics=dict(train_metrics),
        sent_at=time.time(),
    )
    if signing_key is not None:
        header = sign(header, signing_key)
    return header, payload


async def send_update(
    broker: Broker,
    store: ModelStore,
    config: JobConfig,
    header: UpdateHeader,
    payload: ByteBuffer,
) -> None:
    """Publish an update; over the inline limit the bytes go to Redis first (claim-check).

    Safe to call again with the same header after a failure: the blob is overwritten with
    the same bytes and the aggregator applies one update id at most once.
    """
    if header.payload == "blob":
        await store.put_blob(header.device_id, header.update_id, payload, config.blob_ttl_seconds)
        await broker.publish(header, b"")
    else:
        # Inline payloads are small (under the job's inline limit): the copy is cheap.
        await broker.publish(header, bytes(payload))
