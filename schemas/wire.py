"""How an UpdateHeader travels in a message's AMQP headers (pure, no I/O).

Agents send the whole header as one JSON document in the `fedq-update` header. Before, each
field was a header of its own, and recordings and older agents still carry that form: the
aggregator reads both (`aggregator/validation.py`), and `update_fields` reads either for the
tools that only show or count fields.

Why one document: an AMQP field table is encoded and decoded field by field in pure Python
on both ends (pamqp) and parsed again by the broker, while pydantic validates a JSON
document in one call. Decoding the content header of an update took the aggregator 41 us
with the table against 13 with the document, and validating it 20 us against 8; publishing
it cost the agent about 60 us more, and RabbitMQ about 40 (README, Performance, round
five). JSON also keeps floats as exact doubles, which the table needed its own encoder for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.messages import UpdateHeader

UPDATE_HEADER = "fedq-update"


def update_headers(header: UpdateHeader) -> dict[str, Any]:
    """Return the AMQP headers that carry `header`: its JSON, without None fields."""
    return {UPDATE_HEADER: header.model_dump_json(exclude_none=True)}


def update_fields(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the header fields a message claims, unvalidated, in either form.

    For display and counting only (what the aggregator accepts is `parse_header`'s call):
    a `fedq-update` document that is not a JSON object reads as no fields.
    """
    document = headers.get(UPDATE_HEADER)
    if document is None:
        return headers
    try:
        fields = json.loads(document)
    except (TypeError, ValueError, RecursionError):
        return {}
    return fields if isinstance(fields, dict) else {}


def with_fields(headers: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """Return the headers with update fields changed, in the form they came in (replay moves
    a recorded update to another job). A `fedq-update` document that is not a JSON object is
    left as it is: it was malformed where it was recorded, and stays so."""
    if UPDATE_HEADER not in headers:
        return {**headers, **changes}
    fields = update_fields(headers)
    if not fields:
        return dict(headers)
    return {**headers, UPDATE_HEADER: json.dumps({**fields, **changes})}
