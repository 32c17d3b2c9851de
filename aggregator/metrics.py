"""Prometheus metrics of one aggregator, registered in a registry its owner passes in.

A registry per instance, never the process-wide default one: tests and `fedq simulate`
build several aggregators in one process, and the default registry refuses a second
collector with the same name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Staleness is counted in versions; FedAsync and FedBuff cut off well below 64.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Folds and commits of small models take milliseconds; a big model over Redis takes seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The fedq job is `fedq_job`, not `job`: Prometheus gives every target a `job` label of its
# own (the scrape job), and a clash would rename ours to `exported_job`.


class AggregatorMetrics:
    """The counters, gauges and histograms of one aggregator serving one job."""

    def __init__(self, registry: CollectorRegistry, job: str) -> None:
        self.registry = registry
        self.job = job
        labels = ["fedq_job"]
        self.received = Counter(
            "fedq_aggregator_updates_received",
            "Update messages delivered to the aggregator (good, bad and duplicate).",
            labels,
            registry=registry,
        ).labels(job)
        self.applied = Counter(
            "fedq_aggregator_updates_applied",
            "Updates folded into a committed version.",
            labels,
            registry=registry,
        ).labels(job)
        self.duplicates = Counter(
            "fedq_aggregator_updates_duplicate",
            "Deliveries of an update already applied or already buffered, acked and skipped.",
            labels,
            registry=registry,
        ).labels(job)
        self._dead_lettered = Counter(
            "fedq_aggregator_updates_dead_lettered",
            "Updates rejected and copied to the dead-letter queue, by reason.",
            ["fedq_job", "reason"],
            registry=registry,
        )
        self.versions = Counter(
            "fedq_aggregator_versions_committed",
            "Global versions this aggregator committed.",
            labels,
            registry=registry,
        ).labels(job)
        self.received_bytes = Counter(
            "fedq_aggregator_received_bytes",
            "Payload bytes taken in: message bodies plus claim-check blobs fetched from Redis.",
            labels,
            registry=registry,
        ).labels(job)
        self.staleness = Histogram(
            "fedq_aggregator_update_staleness",
            "Versions between an applied update's base and the version it was folded into.",
            labels,
            buckets=STALENESS_BUCKETS,
            registry=registry,
        ).labels(job)
        self.version = Gauge(
            "fedq_aggregator_version",
            "Latest global version this aggregator holds (committed or loaded at start).",
            labels,
            registry=registry,
        ).labels(job)
        self.buffered = Gauge(
            "fedq_aggregator_buffer_updates",
            "Updates folded into the buffer but not yet committed (unacked until then).",
            labels,
            registry=registry,
        ).labels(job)
        self.buffer_size = Gauge(
            "fedq_aggregator_buffer_size",
            "Updates per version the strategy waits for (FedBuff's K; 1 for FedAsync).",
            labels,
            registry=registry,
        ).labels(job)
        self.consuming = Gauge(
            "fedq_aggregator_consuming",
            "1 while the aggregator consumes its queue (active, or the single-active standby).",
            labels,
            registry=registry,
        ).labels(job)
        self.fold_seconds = Histogram(
            "fedq_aggregator_fold_seconds",
            "Time to fold one validated update into the model or buffer (strategy.add).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ).labels(job)
        self.commit_seconds = Histogram(
            "fedq_aggregator_commit_seconds",
            "Time to commit one version: encode, Redis commit, acks, blob cleanup, announce.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ).labels(job)

    def dead_lettered(self, reason: str) -> None:
        """Count one dead-lettered update under its reason."""
        self._dead_lettered.labels(self.job, reason).inc()
