"""Carry a signed job's device registry into a replay, and check its signatures there.

A device signs its update header with the original job id in it, and replay rewrites the
`job` header: the fresh job's aggregator can no longer check those signatures. So replay
checks them itself, on the recorded headers against the recorded registry, exactly as the
original aggregator did (`aggregator.validation`). What fails is not republished: the
original run dead-lettered it, so it changed no version. The fresh job then folds the rest
without asking for signatures again, and gets a copy of the registry for its devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aggregator.validation import check_signature, check_signed, parse_header
from fedq.recording import RecordedUpdate, Recording
from infra.protocols import DeviceRecord, ModelStore
from schemas import JobConfig, Rejection


@dataclass
class Admitted:
    """The recorded updates a replay republishes, and how many of each refusal it held back."""

    updates: list[RecordedUpdate]
    refused: dict[str, int] = field(default_factory=dict)


def admitted_updates(recording: Recording) -> Admitted:
    """Keep the updates whose signature the original job would accept; count the others."""
    if not recording.config.require_signatures:
        return Admitted(list(recording.updates))
    # A revoked device's key authenticates nothing, as in the registry the run left behind.
    keys = {d.device_id: d.public_key for d in recording.devices if not d.revoked}
    admitted = Admitted([])
    for update in recording.updates:
        try:
            header = parse_header(update.headers, recording.config.job)
            check_signed(header)
            check_signature(header, keys.get(header.device_id))
        except Rejection as rejection:
            reason = rejection.reason.value
            admitted.refused[reason] = admitted.refused.get(reason, 0) + 1
            continue
        admitted.updates.append(update)
    return admitted


def replayable(config: JobConfig) -> JobConfig:
    """Return the fresh job's config without the checks that only the original run can make.

    Signatures were checked by `admitted_updates`; an update's age was checked when it was
    first folded, and every recorded update is older than that by now.
    """
    return config.model_copy(update={"require_signatures": False, "max_update_age_seconds": None})


async def copy_registry(devices: Sequence[DeviceRecord], store: ModelStore) -> None:
    """Register the recorded devices in the fresh job, revocations included."""
    for device in devices:
        await store.register_device(device.device_id, device.public_key, replace=True)
        if device.revoked:
            await store.revoke_device(device.device_id)
