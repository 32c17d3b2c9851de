#!/usr/bin/env bash
# The main job in one command:  bash scripts/demo.sh [fedq simulate options...]
# Installs fedq into .venv, then runs `fedq simulate`: a whole federation in this process
# (aggregator, evaluator, 8 non-IID MNIST-1D devices, a quarter of them 10x slower) on the
# in-process broker and store, with a live progress display, a summary table and plots in
# runs/demo/. Any `fedq simulate` option may follow, e.g. `--compare fedavg,fedasync,fedbuff`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
VENV="${FEDQ_VENV:-.venv}"
"$VENV/bin/fedq" simulate --out runs/demo "$@"
