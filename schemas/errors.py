"""The machine-readable reasons an update is refused, carried in the dead-letter header."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why an update was dead-lettered instead of aggregated."""

    MALFORMED_HEADER = "malformed_header"
    UNKNOWN_JOB = "unknown_job"
    FUTURE_BASE_VERSION = "future_base_version"
    TOO_STALE = "too_stale"
    STALE_ROUND = "stale_round"
    DUPLICATE_DEVICE_IN_ROUND = "duplicate_device_in_round"
    UNSUPPORTED_KIND = "unsupported_kind"
    OVERSIZED = "oversized"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    BLOB_MISSING = "blob_missing"
    UNEXPECTED_BODY = "unexpected_body"
    MALFORMED_PAYLOAD = "malformed_payload"
    WRONG_KEYS = "wrong_keys"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    DELIVERY_LIMIT = "delivery_limit"
    # Device authentication (docs/security.md), enforced when the job requires signatures.
    UNSIGNED = "unsigned"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    # The header's device id is not the broker-validated publisher (bind_device_users jobs).
    USER_MISMATCH = "user_mismatch"


class Rejection(Exception):
    """An update that fails a check; `reason` is machine-readable, `detail` is for people."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail[:500]
