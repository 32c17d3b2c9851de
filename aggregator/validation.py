"""Turn a raw delivery into a checked header and payload, or a Rejection with its reason.

Everything here is pure apart from the blob fetch the caller does between the two steps:
`parse_header` first (cheap, before any payload is touched), `check_payload` on the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas import JobConfig, Rejection, RejectReason, UpdateHeader
from schemas.digests import payload_hex
from schemas.safetensors_format import ByteBuffer
from schemas.signing import verify
from schemas.wire import UPDATE_HEADER

# Headers added by the broker (x-delivery-count on quorum queues, x-death) or by our own
# dead-lettering are transport metadata, not part of the update header.
_TRANSPORT_PREFIX = "x-"
_MAX_HEADERS = 64


def parse_header(raw: Mapping[str, Any], job: str) -> UpdateHeader:
    """Validate raw AMQP headers as an UpdateHeader addressed to `job`: one `fedq-update`
    JSON document, or a header per field as recordings and older agents carry it."""
    fields = {k: v for k, v in raw.items() if not k.startswith(_TRANSPORT_PREFIX)}
    document = fields.pop(UPDATE_HEADER, None)
    if document is not None:
        header = _from_document(document, others=sorted(fields))
    else:
        header = _from_fields(fields)
    if header.job != job:
        raise Rejection(RejectReason.UNKNOWN_JOB, f"header job {header.job!r} on queue of {job!r}")
    return header


def _from_document(document: Any, others: list[str]) -> UpdateHeader:
    if others:
        # Two sources for one field would let a tool show one value and the aggregator use
        # another: a message carries one form or the other.
        raise Rejection(
            RejectReason.MALFORMED_HEADER, f"headers {others[:5]} beside {UPDATE_HEADER}"
        )
    if not isinstance(document, str | bytes):
        raise Rejection(RejectReason.MALFORMED_HEADER, f"{UPDATE_HEADER} is not a string")
    try:
        return UpdateHeader.model_validate_json(document)
    except ValidationError as exc:
        raise Rejection(RejectReason.MALFORMED_HEADER, _short(exc)) from None


def _from_fields(fields: Mapping[str, Any]) -> UpdateHeader:
    if len(fields) > _MAX_HEADERS:
        raise Rejection(RejectReason.MALFORMED_HEADER, f"{len(fields)} headers is too many")
    try:
        return UpdateHeader.model_validate({k: _text(v) for k, v in fields.items()})
    except (ValidationError, UnicodeDecodeError) as exc:
        raise Rejection(RejectReason.MALFORMED_HEADER, _short(exc)) from None


def check_sizes(header: UpdateHeader, body: ByteBuffer, config: JobConfig) -> None:
    """Refuse an update whose declared size is over the job's limit or disagrees with the body."""
    if header.payload_bytes > config.max_update_bytes:
        raise Rejection(
            RejectReason.OVERSIZED,
            f"{header.payload_bytes} bytes > limit {config.max_update_bytes}",
        )
    if header.payload == "blob" and body:
        raise Rejection(RejectReason.UNEXPECTED_BODY, "a claim-check update must have no body")
    if header.payload == "inline" and len(body) != header.payload_bytes:
        raise Rejection(
            RejectReason.SIZE_MISMATCH,
            f"body has {len(body)} bytes, header says {header.payload_bytes}",
        )


def check_payload(header: UpdateHeader, payload: ByteBuffer, digest: str | None = None) -> None:
    """Check the payload (inline body or fetched blob) against the header's size and digest;
    `digest` is the payload's (in the header's algorithm), if it was hashed as it arrived."""
    if len(payload) != header.payload_bytes:
        raise Rejection(
            RejectReason.SIZE_MISMATCH,
            f"payload has {len(payload)} bytes, header says {header.payload_bytes}",
        )
    algorithm, expected = header.payload_digest
    if (digest if digest is not None else payload_hex(algorithm, payload)) != expected:
        detail = f"payload {algorithm} differs from the header's"
        raise Rejection(RejectReason.HASH_MISMATCH, detail)


def check_signed(header: UpdateHeader) -> None:
    """Refuse an update without a signature (jobs that require signatures)."""
    if header.signature is None:
        raise Rejection(RejectReason.UNSIGNED, f"device {header.device_id} sent no signature")


def check_signature(header: UpdateHeader, public_key: str | None) -> None:
    """Refuse an update not signed by the key registered for its claimed device id.

    `public_key` is the registry's key for `header.device_id` (None: unknown or revoked).
    Because the device id is inside the signed bytes, another device's key cannot sign
    for it: impersonation fails here as a bad signature.
    """
    if public_key is None:
        raise Rejection(
            RejectReason.UNKNOWN_DEVICE, f"device {header.device_id} is unknown or revoked"
        )
    if not verify(header, public_key):
        raise Rejection(
            RejectReason.BAD_SIGNATURE,
            f"signature does not verify with the key of device {header.device_id}",
        )


def check_user(header: UpdateHeader, user_id: str | None, config: JobConfig) -> None:
    """Refuse an update whose device id is not the broker user that published it.

    `user_id` is the AMQP user_id property, which RabbitMQ refuses unless it equals the
    publishing connection's user: the device id is then vouched for by the broker itself.
    """
    if config.bind_device_users and user_id != header.device_id:
        raise Rejection(
            RejectReason.USER_MISMATCH,
            f"device {header.device_id} published as broker user {user_id!r}",
        )


def check_age(header: UpdateHeader, config: JobConfig, now: float) -> None:
    """Refuse an update sent longer ago than the job's `max_update_age_seconds`."""
    limit = config.max_update_age_seconds
    if limit is not None and now - header.sent_at > limit:
        raise Rejection(
            RejectReason.REPLAYED,
            f"sent {now - header.sent_at:.0f} s ago, over the job's limit of {limit:g} s",
        )


def _text(value: Any) -> Any:
    """Decode byte strings as strict UTF-8; AMQP long strings may arrive as bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
    return str(exc)
