"""infra/k8s/overlays/device-users: one Deployment and one Secret per device, nothing shared."""

from __future__ import annotations

import pytest

from tests.unit.test_k8s import K8S, WORKLOADS, _container, _find, _rendered, _validate

pytestmark = pytest.mark.unit

OVERLAY = K8S / "overlays" / "device-users"
DEVICES = ("fedq-device-0", "fedq-device-1")


def test_every_object_of_the_overlay_validates() -> None:
    docs = _rendered(OVERLAY)
    for doc in docs:
        _validate(doc)
    assert all(d["metadata"]["namespace"] == "fedq" for d in docs if d["kind"] != "Namespace")


def test_each_device_reads_its_urls_from_its_own_secret_and_nothing_else() -> None:
    docs = _rendered(OVERLAY)
    for name in DEVICES:
        deployment = _find(docs, "Deployment", name)
        container = _container(deployment)
        env = {e["name"]: e for e in container["env"]}
        secret = _find(docs, "Secret", name)
        # Its own URLs, from its own Secret; no envFrom, so not the admins' Redis URL
        for variable, key in (("FEDQ_AMQP_URL", "amqp-url"), ("FEDQ_REDIS_URL", "redis-url")):
            assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}
            assert f"://{name}:" in secret["stringData"][key]
        assert "envFrom" not in container
        assert env["FEDQ_DEVICE_ID"]["value"] == name
        secrets_used = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert secrets_used == {name}
        # One pod per identity, never two at once
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        agent = _container(_find(_rendered(K8S / "base"), *WORKLOADS["agent"]))
        assert container["command"] == agent["command"]
        assert container["securityContext"] == agent["securityContext"]


def test_the_shared_agents_are_off_and_the_job_binds_device_users() -> None:
    docs = _rendered(OVERLAY)
    assert _find(docs, "StatefulSet", "fedq-agent")["spec"]["replicas"] == 0
    command = _container(_find(docs, "Job", "fedq-job-init"))["command"]
    base = _container(_find(_rendered(K8S / "base"), "Job", "fedq-job-init"))["command"]
    assert [arg for arg in command if arg != "--device-users"] == base
    assert "--device-users" in command
