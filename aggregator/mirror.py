"""Keep an edge job's model a copy of its root's, version number for version number.

Devices of an edge job fetch E's latest model and stamp their updates with its version, so
E's version v must hold the root's version v: then `base_version` means the same thing on
both hops and the root computes each partial update's staleness from it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from infra.errors import VersionConflict
from infra.protocols import ModelStore
from infra.retry import retry_unavailable
from schemas import JobConfig, VersionMeta
from schemas.codec import sha256_hex

log = logging.getLogger(__name__)


class EdgeMismatch(ValueError):
    """The edge job cannot stand in for its root: another model, or a version ahead of it."""


def check_edge_job(edge: JobConfig, root: JobConfig) -> None:
    """Refuse an edge job whose updates the root could not take or the edge could not group."""
    if edge.job == root.job:
        raise EdgeMismatch(f"job {edge.job} cannot be its own upstream")
    if edge.strategy.name == "fedavg":
        raise EdgeMismatch(f"edge job {edge.job} must use fedbuff or fedasync, not fedavg rounds")
    if edge.model_schema != root.model_schema:
        raise EdgeMismatch(
            f"edge job {edge.job} and root job {root.job} have different model schemas:"
            " create the edge job with the root's --task"
        )


async def check_same_model(root_store: ModelStore, edge_store: ModelStore) -> None:
    """Refuse an edge whose current model is not the root's model of that version."""
    version = await edge_store.current_version()
    edge_meta, root_meta = await edge_store.get_meta(version), await root_store.get_meta(version)
    # A version the root has pruned cannot be compared; the mirror replaces it soon anyway.
    if edge_meta is None or root_meta is None or edge_meta.sha256 == root_meta.sha256:
        return
    raise EdgeMismatch(
        f"edge job {edge_store.job} version {version} is not root job {root_store.job}'s"
        " version of that number: create the edge job with the root's --task and --seed"
    )


async def mirror_once(root_store: ModelStore, edge_store: ModelStore) -> int:
    """Commit the root's versions the edge job lacks, one by one; return the edge's version."""
    edge_version = await edge_store.current_version()
    root_version = await root_store.current_version()
    if edge_version > root_version:
        raise EdgeMismatch(
            f"edge job {edge_store.job} is at version {edge_version}, ahead of root job"
            f" {root_store.job} at {root_version}: it was aggregated on its own"
        )
    while edge_version < root_version:
        target = edge_version + 1
        data = await root_store.get_model(target)
        if data is None:
            # Pruned upstream: the newest model under this number makes the root see updates
            # trained on it as staler than they are, never fresher.
            _, data = await root_store.latest()
        meta = VersionMeta(
            version=target, created_at=time.time(), sha256=sha256_hex(data), model_bytes=len(data)
        )
        try:
            await edge_store.commit(edge_version, data, meta)
        except VersionConflict:
            # A standby edge of the same job mirrored it first; carry on from there.
            edge_version = await edge_store.current_version()
            continue
        edge_version = target
    return edge_version


async def mirror_forever(
    root_store: ModelStore,
    edge_store: ModelStore,
    stopping: asyncio.Event,
    *,
    poll_seconds: float = 1.0,
    retry_seconds: float = 1.0,
) -> None:
    """Follow the root's versions into the edge job until `stopping` is set."""
    version = -1
    while not stopping.is_set():
        mirrored = await retry_unavailable(
            lambda: mirror_once(root_store, edge_store), first_delay=retry_seconds
        )
        if mirrored != version:
            log.info("edge job %s mirrors root version %d", edge_store.job, mirrored)
            version = mirrored
        await retry_unavailable(
            functools.partial(root_store.wait_for_version, version, poll_seconds),
            first_delay=retry_seconds,
        )
