"""Every Redis key and AMQP name fedq uses, in one place.

`{J}` in braces is a Redis Cluster hash tag: all keys of one job live in one slot, which is
what lets a single Lua script touch several of them.
"""

from __future__ import annotations

from dataclasses import dataclass

UPDATES_EXCHANGE = "fedq.updates"
DEAD_EXCHANGE = "fedq.dead"
VERSIONS_EXCHANGE = "fedq.versions"
UPDATE_CONTENT_TYPE = "application/vnd.fedq.update"


def updates_queue(job: str) -> str:
    return f"fedq.updates.{job}"


def dead_queue(job: str) -> str:
    return f"fedq.dead.{job}"


def log_stream(job: str) -> str:
    return f"fedq.log.{job}"


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job."""

    job: str

    @property
    def prefix(self) -> str:
        return f"fedq:{{{self.job}}}"

    @property
    def config(self) -> str:
        return f"{self.prefix}:config"

    @property
    def version(self) -> str:
        return f"{self.prefix}:version"

    def model(self, version: int) -> str:
        return f"{self.prefix}:model:{version}"

    def meta(self, version: int) -> str:
        return f"{self.prefix}:meta:{version}"

    @property
    def applied(self) -> str:
        return f"{self.prefix}:applied"

    @property
    def versions_stream(self) -> str:
        return f"{self.prefix}:versions"

    def blob(self, device_id: str, update_id: str) -> str:
        """A claim-check payload, under its device's prefix so an ACL can scope writes to it."""
        return f"{self.blob_prefix(device_id)}{update_id}"

    def blob_prefix(self, device_id: str) -> str:
        # "/" is outside the device-id alphabet: no device's prefix is another's.
        return f"{self.prefix}:blob:{device_id}/"

    @property
    def latest_eval(self) -> str:
        return f"{self.prefix}:latest_eval"

    @property
    def rejections(self) -> str:
        return f"{self.prefix}:rejections"

    @property
    def devices(self) -> str:
        return f"{self.prefix}:devices"

    @property
    def device_keys(self) -> str:
        """Hash: device id -> base64 Ed25519 public key (the device registry)."""
        return f"{self.prefix}:devices:keys"

    @property
    def revoked_devices(self) -> str:
        """Set: device ids whose key no longer authenticates updates."""
        return f"{self.prefix}:devices:revoked"

    @property
    def forwarded(self) -> str:
        """Set (edge jobs): device update ids already forwarded upstream in a partial update."""
        return f"{self.prefix}:edge:forwarded"

    @property
    def forward_plans(self) -> str:
        """Hash (edge jobs): planned partials, `m:{update id}` -> partial id, `p:{id}` -> ids."""
        return f"{self.prefix}:edge:plans"

    @property
    def device_tallies(self) -> str:
        """Hash: `applied:D`, `staleness_sum:D`, `staleness_max:D` per device D (commit Lua)."""
        return f"{self.prefix}:devices:tallies"

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of the job (job ids hold no glob characters)."""
        return f"{self.prefix}:*"
