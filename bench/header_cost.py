"""Header cost: CPU to encode, decode and validate an update's header, one JSON document vs
a header per field.

Run: `python bench/header_cost.py [--repeats 5000]`. No services: it times pamqp marshalling
and unmarshalling the AMQP content header frame of a 100 KB update, as the agent's and the
aggregator's AMQP clients do, and the aggregator's `parse_header`, for the `fedq-update`
document (`schemas/wire.py`) and for the per-field form that recordings and older agents
carry. The median of five timings of `--repeats` calls each.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pamqp import frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.validation import parse_header
from bench.measure import per_call_seconds
from infra.amqp_broker import encode_headers
from schemas import UpdateHeader
from schemas.wire import update_headers

JOB = "bench-header-cost"
BODY_BYTES = 100_000


def sample_header() -> UpdateHeader:
    """A signed-size header with two metrics, as an agent sends after a round."""
    return UpdateHeader(
        job=JOB,
        update_id=str(uuid.uuid4()),
        device_id="bench-device-3",
        base_version=41,
        num_samples=320,
        payload_blake3="ab" * 32,
        payload_bytes=BODY_BYTES,
        train_metrics={"loss": 0.4321, "accuracy": 0.8765},
        sent_at=time.time(),
        signature="s" * 88,
    )


def content_frame(headers: dict[str, Any], message_id: str) -> bytes:
    """The content header frame the broker delivers with these headers."""
    properties = Basic.Properties(
        headers=headers,
        message_id=message_id,
        content_type="application/vnd.fedq.update",
        message_type="update",
        delivery_mode=2,
    )
    return frame.marshal(ContentHeader(0, BODY_BYTES, properties), 1)


def per_call_us(work: Callable[[], object], repeats: int) -> float:
    """Median over five timings of `repeats` calls, in microseconds per call."""
    return per_call_seconds(work, repeats) * 1e6


def costs(make: Callable[[], dict[str, Any]], message_id: str, repeats: int) -> dict[str, float]:
    """Encode (the headers from the model, then their table), decode (the frame) and
    validate (parse_header) costs, in us."""
    raw = content_frame(make(), message_id)
    received = frame.unmarshal(raw)[2].properties.headers
    return {
        "encode": per_call_us(lambda: encode_headers(make()), repeats),
        "decode": per_call_us(lambda: frame.unmarshal(raw), repeats),
        "validate": per_call_us(lambda: parse_header(received, JOB), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5000)
    args = parser.parse_args()
    header = sample_header()

    def fields() -> dict[str, Any]:
        return {k: v for k, v in header.model_dump(mode="json").items() if v is not None}

    document = costs(lambda: update_headers(header), header.update_id, args.repeats)
    table = costs(fields, header.update_id, args.repeats)
    for name, result in (("document", document), ("fields", table)):
        print(
            f"{name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in result.items()),
            file=sys.stderr,
        )
    ours, baseline = sum(document.values()), sum(table.values())
    print(
        f"header-cost: document {ours:.1f} us vs fields {baseline:.1f} us = ratio "
        f"{baseline / ours:.2f} (encode + decode + validate of one 100 KB update's header, "
        f"median of 5 x {args.repeats})"
    )


if __name__ == "__main__":
    main()
