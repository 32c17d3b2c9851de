#!/usr/bin/env bash
# The project's one test command:  bash scripts/test.sh [pytest arguments...]
# Installs (idempotently), makes sure RabbitMQ and Redis answer, then lints, type-checks and
# runs the whole test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m unit`
# or `bash scripts/test.sh tests/unit -x`. Any failing step fails the script.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n=== %s\n' "$*"
}

step "install (scripts/install.sh)"
FEDQ_CHECK_TOOLS=1 bash scripts/install.sh

step "services (scripts/services.sh)"
bash scripts/services.sh

VENV="${FEDQ_VENV:-.venv}"
if [[ "$VENV" != /* ]]; then
    VENV="$PWD/$VENV"
fi
export PATH="$VENV/bin:$PATH"

step "ruff check"
ruff check .

step "ruff format --check"
ruff format --check .

step "mypy"
mypy

step "shellcheck"
shellcheck scripts/*.sh .ci/run

step "hadolint"
hadolint infra/docker/Dockerfile

step "pytest"
pytest tests "$@"
