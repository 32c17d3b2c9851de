#!/usr/bin/env bash
# A federation of real processes:  bash scripts/federation.sh [AGENTS] [SECONDS]
# Installs fedq, makes sure RabbitMQ and Redis answer, creates a fresh MNIST-1D job, starts
# one aggregator, one evaluator and AGENTS device agents (the last one 5x slower) as plain
# processes -- the same commands the containers run -- and prints the global model's
# accuracy as it rises. Stops everything after SECONDS (or Ctrl-C) and prints the summary.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
AGENTS="${1:-4}"
SECONDS_TO_RUN="${2:-90}"
JOB="${FEDQ_JOB:-demo-$(date +%s)}"
LOGS="runs/$JOB"

bash scripts/install.sh
bash scripts/services.sh
VENV="${FEDQ_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
export FEDQ_JOB="$JOB"
mkdir -p "$LOGS"

fedq job create --job "$JOB" --task mnist1d-cnn --strategy fedbuff --num-devices "$AGENTS"

pids=()
cleanup() {
    # SIGTERM lets every process finish the update in hand and close cleanly.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    echo
    fedq status --job "$JOB"
    echo "logs: $LOGS/   delete the job with: fedq job delete --job $JOB"
}
trap cleanup EXIT

python -m aggregator >"$LOGS/aggregator.log" 2>&1 &
pids+=($!)
FEDQ_ROLE=evaluator python -m device_agent >"$LOGS/evaluator.log" 2>&1 &
pids+=($!)
for ((i = 0; i < AGENTS; i++)); do
    slowdown=1
    if ((i == AGENTS - 1)); then slowdown=5; fi
    FEDQ_ROLE=agent FEDQ_DEVICE_ID="device-$i" FEDQ_SLOWDOWN="$slowdown" \
        python -m device_agent >"$LOGS/agent-$i.log" 2>&1 &
    pids+=($!)
done
echo "job $JOB: aggregator, evaluator and $AGENTS agents running (device-$((AGENTS - 1)) is 5x slower)"

fedq status --job "$JOB" --watch 5 --duration "$SECONDS_TO_RUN"
