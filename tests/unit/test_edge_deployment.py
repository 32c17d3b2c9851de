"""The edge profile of docker-compose.yml and the k8s edge example run what the root runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deployment import COMPOSE_FILE, ROOT, _compose_command
from tests.unit.test_k8s import BASE, _find, _rendered, _validate

pytestmark = pytest.mark.unit

EXAMPLE = ROOT / "infra" / "k8s" / "examples" / "edge-aggregator.yaml"
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> Doc:
    cmd = [*_compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    done = subprocess.run(
        [*cmd, "--profile", "edge", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        # compose's own defaults, not whatever FEDQ_* the caller's shell sets.
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert done.returncode == 0, done.stderr
    config: Doc = json.loads(done.stdout)
    return config


def _environment(container: Doc, config: dict[str, str]) -> dict[str, str]:
    """Resolve env the way the kubelet does: in order, $(VAR) seeing only what came before."""
    env = dict(config)
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(
                r"\$\(([A-Z0-9_]+)\)", lambda m: env.get(m[1], m[0]), entry["value"]
            )
    return env


def test_the_edge_aggregator_is_the_aggregator_with_an_upstream(compose: Doc) -> None:
    services = compose["services"]
    root, edge = services["aggregator"], services["edge-aggregator"]
    job_init = services["edge-job-init"]["command"]
    edge_job = job_init[job_init.index("--job") + 1]

    assert edge["image"] == root["image"] == "fedq:latest"
    assert edge["command"] == root["command"]
    assert edge["environment"] == {
        **root["environment"],
        "FEDQ_JOB": edge_job,
        "FEDQ_UPSTREAM": root["environment"]["FEDQ_JOB"],
    }
    assert services["edge-agent"]["environment"]["FEDQ_JOB"] == edge_job
    assert services["edge-agent"]["command"] == services["agent"]["command"]
    assert edge_job != root["environment"]["FEDQ_JOB"]


def test_the_k8s_edge_example_validates_and_matches_compose(compose: Doc) -> None:
    docs = tuple(doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc is not None)
    config = _find(_rendered(BASE), "ConfigMap", "fedq-config")["data"]
    root = _find(_rendered(BASE), "Deployment", "fedq-aggregator")
    edge = _find(docs, "Deployment", "fedq-edge-aggregator")
    [container] = edge["spec"]["template"]["spec"]["containers"]
    [root_container] = root["spec"]["template"]["spec"]["containers"]
    env = _environment(container, config)

    for doc in docs:
        _validate(doc)
    assert container["image"] == root_container["image"]
    assert container["command"] == root_container["command"]
    assert container["command"] == compose["services"]["edge-aggregator"]["command"]
    assert env["FEDQ_UPSTREAM"] == config["FEDQ_JOB"]
    assert env["FEDQ_JOB"] == compose["services"]["edge-aggregator"]["environment"]["FEDQ_JOB"]
