#!/usr/bin/env bash
# Starts the Google Cloud Pub/Sub emulator on 127.0.0.1:8085 for the gcp-pubsub backend's tests,
# then prints the variable the tests read. Idempotent: an emulator already listening on the port
# is reused. Command as in shared/services.md.
#
#   eval "$(scripts/services/pubsub.sh)"    # sets BROKER_TEST_GCP_PUBSUB_URL
#
# The emulator is the Debian package google-cloud-cli-pubsub-emulator (with google-cloud-cli and
# Java 17), which this machine image ships; it is not on crates.io, PyPI or npm (the npm and PyPI
# packages named after it only drive an installed gcloud). Where it is missing, this script tries
# apt-get (the image's apt sources may carry it) and otherwise fails saying what to install.
# Progress goes to stderr; stdout carries only the `export` line.
set -euo pipefail

PORT=${PUBSUB_EMULATOR_PORT:-8085}
WAIT_SECONDS=${PUBSUB_EMULATOR_WAIT_SECONDS:-120}

log() { echo "pubsub.sh: $*" >&2; }

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

emulator_installed() {
    command -v gcloud >/dev/null 2>&1 && command -v java >/dev/null 2>&1 &&
        [[ -x "$(dirname "$(readlink -f "$(command -v gcloud)")")/../platform/pubsub-emulator/bin/cloud-pubsub-emulator" ]]
}

if port_open "$PORT"; then
    log "something already listens on 127.0.0.1:$PORT: reusing it as the Pub/Sub emulator"
else
    if ! emulator_installed; then
        log "the Pub/Sub emulator (gcloud, its pubsub-emulator component, Java) is missing: trying apt-get"
        apt-get update -qq >&2 || true
        apt-get install -y -qq google-cloud-cli google-cloud-cli-pubsub-emulator openjdk-17-jre-headless >&2 || true
        if ! emulator_installed; then
            log "error: cannot install the Pub/Sub emulator here. It needs the packages google-cloud-cli and"
            log "google-cloud-cli-pubsub-emulator (Google's apt repository) and a Java 17 runtime"
            log "(openjdk-17-jre-headless); with them, this script starts it. Or point BROKER_TEST_GCP_PUBSUB_URL"
            log "at a running emulator."
            exit 1
        fi
    fi
    state_dir=$(mktemp -d "${TMPDIR:-/tmp}/micro-broker-pubsub.XXXXXX")
    mkdir -p "$state_dir/data"
    log "starting the Pub/Sub emulator on 127.0.0.1:$PORT (data and log in $state_dir)"
    # setsid + nohup: the emulator outlives this script and the shell that ran it. Its own data
    # dir, so that every run starts empty.
    setsid nohup gcloud beta emulators pubsub start --host-port="127.0.0.1:$PORT" --project=test \
        --data-dir="$state_dir/data" --quiet >"$state_dir/pubsub.log" 2>&1 </dev/null &
    echo $! >"$state_dir/pubsub.pid"
    # Java takes a while (about 5 s here; more on a busy machine): wait generously, but bounded.
    deadline=$((SECONDS + WAIT_SECONDS))
    until port_open "$PORT"; do
        if ((SECONDS >= deadline)); then
            log "the emulator did not open 127.0.0.1:$PORT within ${WAIT_SECONDS}s; its log ($state_dir/pubsub.log):"
            tail -n 30 "$state_dir/pubsub.log" >&2 || true
            exit 1
        fi
        if ! kill -0 "$(cat "$state_dir/pubsub.pid")" 2>/dev/null; then
            log "the emulator exited; its log ($state_dir/pubsub.log):"
            tail -n 30 "$state_dir/pubsub.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "the Pub/Sub emulator is up (gcloud pid $(cat "$state_dir/pubsub.pid"))"
fi

echo "export BROKER_TEST_GCP_PUBSUB_URL=127.0.0.1:$PORT"
