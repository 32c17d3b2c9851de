"""Errors the backends raise, so callers never need to import aio_pika or redis."""

from __future__ import annotations


class BackendUnavailable(Exception):
    """RabbitMQ or Redis cannot be reached right now; the operation may be retried."""


class JobNotFound(LookupError):
    """The job has no config in the store (never created, or deleted)."""


class JobExists(Exception):
    """A job with this id already exists."""


class VersionConflict(Exception):
    """The commit's expected version is not the current one: another aggregator committed."""


class PublishError(Exception):
    """The broker refused a message for good: unroutable, access refused, or malformed."""


class PublishUnconfirmed(BackendUnavailable):
    """The broker nacked a message or did not confirm it, republished until the deadline.

    Transient (a node restart, a queue leader election, a full reject-publish queue): the
    same message may be published again later, its message id dedupes a second copy.
    """


class DeviceExists(Exception):
    """The device id already has a (different, or revoked) key; replace it explicitly."""


class AccessDenied(PermissionError):
    """The broker refused an operation the connection's user has no permission for."""
