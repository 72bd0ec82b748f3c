#!/usr/bin/env bash
# Installs (if missing) and starts tansu, a Kafka-compatible broker, on 127.0.0.1:9092 for the
# kafka backend's tests, then prints the variables the tests read. Idempotent: a broker already
# listening on the port is reused. Commands as in shared/services.md.
#
#   eval "$(scripts/services/tansu.sh)"    # sets BROKER_TEST_KAFKA_URL and BROKER_TEST_TANSU
#
# Progress goes to stderr; stdout carries only the `export` lines.
set -euo pipefail

PORT=${TANSU_PORT:-9092}
VERSION=0.6.0
WAIT_SECONDS=${TANSU_WAIT_SECONDS:-60}

log() { echo "tansu.sh: $*" >&2; }

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

tansu_bin=$(command -v tansu || true)
[[ -z $tansu_bin && -x $HOME/.cargo/bin/tansu ]] && tansu_bin=$HOME/.cargo/bin/tansu
if [[ -z $tansu_bin ]] || ! "$tansu_bin" --version >/dev/null 2>&1; then
    # dynostore brings the memory storage engine (the default features lack it); libsql the sqlite
    # one the fault tests use so that data survives a restart. ~8-10 min on 2 cores, then cached
    # in ~/.cargo/bin. Its own target dir, not the project's.
    log "installing tansu $VERSION (cargo install, ~10 min on 2 cores)"
    env -u CARGO_TARGET_DIR cargo install tansu --version "$VERSION" --locked --features dynostore,libsql >&2
    tansu_bin=$HOME/.cargo/bin/tansu
fi

if port_open "$PORT"; then
    log "something already listens on 127.0.0.1:$PORT: reusing it as the Kafka broker"
else
    state_dir=$(mktemp -d "${TMPDIR:-/tmp}/micro-broker-tansu.XXXXXX")
    log "starting tansu on 127.0.0.1:$PORT (memory storage; log in $state_dir)"
    # setsid + nohup: the server outlives this script and the shell that ran it.
    setsid nohup "$tansu_bin" broker --listener-url "tcp://127.0.0.1:$PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$PORT" \
        --storage-engine memory://tansu/ >"$state_dir/tansu.log" 2>&1 </dev/null &
    echo $! >"$state_dir/tansu.pid"
    deadline=$((SECONDS + WAIT_SECONDS))
    until port_open "$PORT"; do
        if ((SECONDS >= deadline)); then
            log "tansu did not open 127.0.0.1:$PORT within ${WAIT_SECONDS}s; its log ($state_dir/tansu.log):"
            tail -n 30 "$state_dir/tansu.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "tansu is up (pid $(cat "$state_dir/tansu.pid"))"
fi

echo "export BROKER_TEST_KAFKA_URL=127.0.0.1:$PORT"
# The fault tests start their own tansu instances with this binary.
echo "export BROKER_TEST_TANSU=$tansu_bin"
