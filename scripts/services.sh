#!/usr/bin/env bash
# Make sure the local RabbitMQ and Redis that the contract, integration and e2e tests use are
# answering on 127.0.0.1: start whichever is not, then wait (bounded) until both answer.
# On the project's machines both are installed and normally already running; this restarts
# one that stopped. Fails loudly, with the end of the server's log, when one does not come up.
#
# Environment: FEDQ_SERVICES_TIMEOUT (60 seconds), FEDQ_RABBITMQ_PORT (5672),
# FEDQ_REDIS_PORT (6379), FEDQ_REDIS_LOG (/tmp/fedq-redis.log).
set -euo pipefail

TIMEOUT="${FEDQ_SERVICES_TIMEOUT:-60}"
AMQP_PORT="${FEDQ_RABBITMQ_PORT:-5672}"
REDIS_PORT="${FEDQ_REDIS_PORT:-6379}"
REDIS_LOG="${FEDQ_REDIS_LOG:-/tmp/fedq-redis.log}"

redis_up() {
    [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
}

# The AMQP listener opens only once the node has booted, so an accepted TCP connection means
# the broker takes clients.
rabbitmq_up() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$AMQP_PORT" 2>/dev/null
}

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "services: $1 not found; install Debian's $2 package (apt-get install -y $2)" >&2
        exit 1
    fi
}

started_redis=0
started_rabbitmq=0

if redis_up; then
    echo "services: redis answers on 127.0.0.1:$REDIS_PORT"
else
    need redis-server redis-server
    echo "services: starting redis-server on 127.0.0.1:$REDIS_PORT (log: $REDIS_LOG)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir /tmp --logfile "$REDIS_LOG"
    started_redis=1
fi

if rabbitmq_up; then
    echo "services: rabbitmq answers on 127.0.0.1:$AMQP_PORT"
else
    need rabbitmq-server rabbitmq-server
    echo "services: starting rabbitmq-server"
    # A node that is still booting makes this fail ("already running"); the wait covers it.
    rabbitmq-server -detached || echo "services: rabbitmq-server -detached exited $?; waiting anyway"
    started_rabbitmq=1
fi

deadline=$((SECONDS + TIMEOUT))
until redis_up && rabbitmq_up; do
    if ((SECONDS >= deadline)); then
        if ! redis_up; then
            echo "services: FAILED: redis does not answer on 127.0.0.1:$REDIS_PORT after ${TIMEOUT}s" >&2
            if [[ -f "$REDIS_LOG" ]]; then tail -n 20 "$REDIS_LOG" >&2; fi
        fi
        if ! rabbitmq_up; then
            echo "services: FAILED: rabbitmq does not answer on 127.0.0.1:$AMQP_PORT after ${TIMEOUT}s" >&2
            rabbitmq-diagnostics status 2>&1 | tail -n 20 >&2 || true
            for log in /var/log/rabbitmq/*.log; do
                if [[ -f "$log" ]]; then
                    echo "--- $log" >&2
                    tail -n 20 "$log" >&2
                fi
            done
        fi
        exit 1
    fi
    sleep 1
done

if ((started_redis || started_rabbitmq)); then
    echo "services: up after $((SECONDS))s"
fi
echo "services: ok (redis 127.0.0.1:$REDIS_PORT, rabbitmq 127.0.0.1:$AMQP_PORT)"
