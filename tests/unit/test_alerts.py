"""The Prometheus alerting rules: they parse, are wired in, and name only metrics fedq serves.

promtool is not on PyPI, so the PromQL itself is not type-checked here; what is checked is
the rule file's shape and that every `fedq_*` series an expression reads is one that the
aggregator or the health server really exports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import AggregatorMetrics
from infra.health import HealthServer

pytestmark = pytest.mark.unit
PROMETHEUS = Path(__file__).parents[2] / "infra" / "prometheus"
EXPECTED = {
    "FedqDeadLettersRising",
    "FedqNoNewVersion",
    "FedqConsumerMissing",
    "FedqStalenessHigh",
    "FedqNotReady",
}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _exported_series() -> set[str]:
    """Every series name a scrape of an aggregator with its health server shows."""
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry, "j")
    metrics.dead_lettered("too_stale")
    metrics.staleness.observe(1)

    async def ready() -> list[str]:
        return []

    HealthServer(registry=registry, readiness=ready, port=0)
    text = generate_latest(registry).decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_prometheus_loads_the_alert_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS / config["rule_files"][0]).is_file()


def test_every_alert_is_complete() -> None:
    rules = _rules()
    assert {rule["alert"] for rule in rules} == EXPECTED
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_alerts_read_only_series_that_fedq_exports() -> None:
    exported = _exported_series()
    for rule in _rules():
        # fedq_job is the job label every fedq series carries, not a series.
        named = set(re.findall(r"\bfedq_[a-z_]+", rule["expr"])) - {"fedq_job"}
        assert named, rule["alert"]
        assert named <= exported, (rule["alert"], named - exported)
    # The scrape jobs the rules select on are the ones prometheus.yml defines.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert "fedq-aggregator" in {job["job_name"] for job in config["scrape_configs"]}
