#!/usr/bin/env bash
# Installs (if missing) and starts moto_server, an SQS/SNS-compatible server from PyPI
# (`moto[server]`), on 127.0.0.1:4566 for the sqs backend's tests, then prints the variable the
# tests read. Idempotent: a server already listening on the port is reused. Its own virtualenv,
# cached under ~/.cache/micro-broker/moto-venv (a fresh machine installs it once, ~1 min).
#
#   eval "$(scripts/services/moto.sh)"    # sets BROKER_TEST_SQS_URL (credentials test:test in it)
#
# Progress goes to stderr; stdout carries only the `export` lines.
set -euo pipefail

PORT=${MOTO_PORT:-4566}
VENV=${MOTO_VENV:-$HOME/.cache/micro-broker/moto-venv}
WAIT_SECONDS=${MOTO_WAIT_SECONDS:-60}

log() { echo "moto.sh: $*" >&2; }

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

if [[ ! -x $VENV/bin/moto_server ]]; then
    log "installing moto[server] into $VENV"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --upgrade pip >&2
    "$VENV/bin/pip" install --quiet "moto[server]" >&2
fi

if port_open "$PORT"; then
    log "something already listens on 127.0.0.1:$PORT: reusing it as the SQS/SNS server"
else
    state_dir=$(mktemp -d "${TMPDIR:-/tmp}/micro-broker-moto.XXXXXX")
    log "starting moto_server on 127.0.0.1:$PORT (log in $state_dir)"
    # setsid + nohup: the server outlives this script and the shell that ran it.
    setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$state_dir/moto.log" 2>&1 </dev/null &
    echo $! >"$state_dir/moto.pid"
    deadline=$((SECONDS + WAIT_SECONDS))
    until port_open "$PORT"; do
        if ((SECONDS >= deadline)); then
            log "moto_server did not open 127.0.0.1:$PORT within ${WAIT_SECONDS}s; its log ($state_dir/moto.log):"
            tail -n 30 "$state_dir/moto.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "moto_server is up (pid $(cat "$state_dir/moto.pid"))"
fi

# moto takes any credentials; the backend reads them from the address's user info.
echo "export BROKER_TEST_SQS_URL=http://test:test@127.0.0.1:$PORT"
