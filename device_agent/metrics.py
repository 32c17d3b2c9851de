"""Prometheus metrics of one device agent, registered in a registry its owner passes in.

A registry per instance: `fedq simulate` runs many agents in one process, and the default
registry refuses a second collector with the same name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Publishing is a confirmed round trip (plus a Redis write for a claim-check blob).
PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A local round is seconds on a small model, minutes on a slow device or a big one.
TRAINING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class AgentMetrics:
    """The counters, gauges and histograms of one device agent."""

    def __init__(self, registry: CollectorRegistry, job: str, device_id: str) -> None:
        self.registry = registry
        labels = ["fedq_job", "device"]
        self.sent = Counter(
            "fedq_agent_updates_sent",
            "Updates published and confirmed by the broker.",
            labels,
            registry=registry,
        ).labels(job, device_id)
        self.publish_seconds = Histogram(
            "fedq_agent_publish_seconds",
            "Time to publish one update until confirmed, retries across outages included.",
            labels,
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        ).labels(job, device_id)
        self.training_seconds = Histogram(
            "fedq_agent_training_seconds",
            "Measured compute time of one local training round (the slowdown wait excluded).",
            labels,
            buckets=TRAINING_BUCKETS,
            registry=registry,
        ).labels(job, device_id)
        self.last_version = Gauge(
            "fedq_agent_last_version_seen",
            "Global version the agent last fetched and trained from.",
            labels,
            registry=registry,
        ).labels(job, device_id)
