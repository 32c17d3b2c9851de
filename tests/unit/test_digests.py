"""Payload digests: BLAKE3 and SHA-256, at once or fed in pieces, on one core or all."""

from __future__ import annotations

import hashlib
import os

import blake3
import pytest

from schemas.digests import PARALLEL_BYTES, PayloadHash, blake3_hex, payload_hex, running_hash

pytestmark = pytest.mark.unit

# The BLAKE3 test vector of the empty input (the reference implementation's test_vectors).
EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_blake3_is_the_reference_function() -> None:
    assert blake3_hex(b"") == EMPTY_BLAKE3
    assert payload_hex("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("size", [0, 1000, PARALLEL_BYTES + 4097])
def test_a_payload_fed_in_pieces_hashes_as_it_does_whole(algorithm: PayloadHash, size: int) -> None:
    # The aggregator hashes a claim-check blob chunk by chunk as it arrives (a view of a
    # bytearray each time); the digest must be the agent's, taken of the whole payload.
    payload = bytearray(os.urandom(size))
    running = running_hash(algorithm, size)
    view = memoryview(payload)
    for start in range(0, size, 3_000_001):
        running.update(view[start : start + 3_000_001])
    assert running.hexdigest() == payload_hex(algorithm, bytes(payload))


def test_big_payloads_hash_on_every_core_with_the_same_result() -> None:
    payload = os.urandom(PARALLEL_BYTES)
    assert blake3_hex(payload) == blake3.blake3(payload, max_threads=1).hexdigest()
