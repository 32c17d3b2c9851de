"""The Kubernetes manifests (infra/k8s) validate offline and run what docker-compose.yml runs.

`kubectl kustomize` is not available to CI, so `_render` below does what kustomize does for
the few features infra/k8s uses (resources, patches merged by kind and name, namespace,
labels) and refuses any other kustomization field, so a manifest change that needs the real
tool fails here instead of being rendered wrongly. Every rendered object is then checked by
kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields fail) except the
RabbitmqCluster custom resource, which is checked against the subset of its CRD shipped in
infra/k8s/schemas (the operator's full CRD is not vendored).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.redis_client import parse_sentinel_url
from tests.unit.test_deployment import COMPOSE_FILE, ROOT, _compose_command

pytestmark = pytest.mark.unit

K8S = ROOT / "infra" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "demo"
# The oldest release the manifests target: the pod-index label (StatefulSet ordinal) is 1.28+.
KUBERNETES_VERSION = "1.30.0"
CRD_SCHEMA = K8S / "schemas" / "rabbitmqcluster-rabbitmq.com-v1beta1.json"
# compose service -> (kind, name) of the k8s workload that runs the same command.
WORKLOADS = {
    "job-init": ("Job", "fedq-job-init"),
    "aggregator": ("Deployment", "fedq-aggregator"),
    "evaluator": ("Deployment", "fedq-evaluator"),
    "agent": ("StatefulSet", "fedq-agent"),
}
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "patches"}
Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _merge(target: Any, patch: Any) -> Any:
    """Strategic merge, as far as infra/k8s needs: maps merge, lists of named items by name."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = _merge(target[key], value) if key in target else value
        return merged
    named = isinstance(target, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in [*target, *patch]):
        by_name = {item["name"]: item for item in target}
        for item in patch:
            by_name[item["name"]] = _merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


def _render(directory: Path) -> list[Doc]:
    """Build a kustomization directory the way `kubectl kustomize` does for these features."""
    kustomization = _load(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not handle {sorted(unknown)}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += _render(path) if path.is_dir() else _load(path)
    docs = copy.deepcopy(docs)
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, f"only file patches are handled: {patch_ref}"
        for patch in _load(directory / patch_ref["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
            assert len(hits) == 1, f"patch {patch_ref['path']} matches {len(hits)} objects"
            docs[hits[0]] = _merge(docs[hits[0]], patch)
    for label_set in kustomization.get("labels", []):
        assert set(label_set) == {"pairs"}, "only plain label pairs (no selectors) are handled"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@cache
def _rendered(directory: Path) -> tuple[Doc, ...]:
    return tuple(_render(directory))


def _find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(workload: Doc) -> Doc:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def _validate(doc: Doc) -> None:
    if doc["apiVersion"].startswith("rabbitmq.com/"):
        jsonschema.validate(doc, json.loads(CRD_SCHEMA.read_text()))
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _expand(command: list[str], container: Doc, config: dict[str, str]) -> list[str]:
    """Resolve $(VAR) the way the kubelet does, from envFrom (the ConfigMap) and env values."""
    env = dict(config)
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return [re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: env.get(m[1], m[0]), arg) for arg in command]


@pytest.fixture(scope="module")
def compose() -> Doc:
    cmd = [*_compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    done = subprocess.run(
        [*cmd, "config", "--format", "json"],
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


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay-demo"])
def test_every_rendered_object_validates(directory: Path) -> None:
    docs = _rendered(directory)

    kinds = {doc["kind"] for doc in docs}
    assert {"ConfigMap", "Secret", "RabbitmqCluster", "Job", "Deployment", "StatefulSet"} <= kinds
    for doc in docs:
        _validate(doc)


def test_the_validator_rejects_a_broken_manifest() -> None:
    deployment = copy.deepcopy(_find(_rendered(BASE), "Deployment", "fedq-aggregator"))
    deployment["spec"]["replicas"] = "two"
    cluster = copy.deepcopy(_find(_rendered(BASE), "RabbitmqCluster", "fedq-rabbitmq"))
    cluster["spec"]["replica"] = 3

    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    with pytest.raises(jsonschema.ValidationError):
        _validate(cluster)


@pytest.mark.parametrize("service", sorted(WORKLOADS))
def test_compose_and_k8s_run_the_same_image_and_command(compose: Doc, service: str) -> None:
    docs = _rendered(BASE)
    config = _find(docs, "ConfigMap", "fedq-config")["data"]
    container = _container(_find(docs, *WORKLOADS[service]))
    theirs = compose["services"][service]

    assert container["image"] == theirs["image"] == "fedq:latest"
    assert _expand(container["command"], container, config) == theirs["command"]
    role = {e["name"]: e.get("value") for e in container["env"]}.get("FEDQ_ROLE")
    assert role == theirs["environment"].get("FEDQ_ROLE")


def test_settings_match_compose(compose: Doc) -> None:
    config = _find(_rendered(BASE), "ConfigMap", "fedq-config")["data"]
    environment = compose["services"]["aggregator"]["environment"]

    assert config["FEDQ_JOB"] == environment["FEDQ_JOB"]
    assert config["FEDQ_METRICS_PORT"] == environment["FEDQ_METRICS_PORT"]
    assert compose["services"]["agent"]["deploy"]["replicas"] == int(config["FEDQ_NUM_DEVICES"])


def test_the_overlay_changes_only_scale_and_namespace() -> None:
    base, overlay = _rendered(BASE), _rendered(OVERLAY)
    config = _find(overlay, "ConfigMap", "fedq-config")["data"]

    assert all(d["metadata"]["namespace"] == "fedq" for d in overlay if d["kind"] != "Namespace")
    assert _find(overlay, "StatefulSet", "fedq-agent")["spec"]["replicas"] == 8
    assert config["FEDQ_NUM_DEVICES"] == "8"
    for kind, name in WORKLOADS.values():
        assert _container(_find(overlay, kind, name)) == _container(_find(base, kind, name))


@pytest.mark.parametrize("service", ["aggregator", "evaluator", "agent"])
def test_probes_resources_and_non_root(service: str) -> None:
    docs = _rendered(BASE)
    port = int(_find(docs, "ConfigMap", "fedq-config")["data"]["FEDQ_METRICS_PORT"])
    workload = _find(docs, *WORKLOADS[service])
    pod = workload["spec"]["template"]["spec"]
    container = _container(workload)

    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    # The Dockerfile's numeric USER 10001:10001.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        10001,
        10001,
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] == 60


def test_topology_aggregator_standby_agents_stateful_rabbitmq_cluster() -> None:
    docs = _rendered(BASE)
    agent = _container(_find(docs, "StatefulSet", "fedq-agent"))
    device_id = {e["name"]: e for e in agent["env"]}["FEDQ_DEVICE_ID"]

    assert _find(docs, "Deployment", "fedq-aggregator")["spec"]["replicas"] == 2
    assert device_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert _find(docs, "RabbitmqCluster", "fedq-rabbitmq")["spec"]["replicas"] == 3
    assert _find(docs, "Secret", "fedq-device-credentials")["type"] == "Opaque"


def test_redis_values_run_sentinel_behind_the_configured_url() -> None:
    [values] = _load(K8S / "redis" / "values.yaml")
    url = _find(_rendered(BASE), "ConfigMap", "fedq-config")["data"]["FEDQ_REDIS_URL"]

    assert values["sentinel"]["enabled"] is True
    assert values["sentinel"]["masterService"]["enabled"] is True
    assert values["replica"]["replicaCount"] == 3
    # fedq asks the Sentinels of the chart's pods (<release>-node-N on the <release>-headless
    # Service; the release is fedq-redis) for the master set the chart monitors.
    target = parse_sentinel_url(url)
    assert target.master == values["sentinel"]["masterSet"]
    assert target.sentinels == tuple(
        (f"fedq-redis-node-{i}.fedq-redis-headless", 26379)
        for i in range(values["replica"]["replicaCount"])
    )
