#!/usr/bin/env bash
# Installs (if missing) and starts a loopback-only etcd for the registry tests, then prints the
# variable the tests read. Idempotent: an etcd already answering on 127.0.0.1:2379 is reused.
#
#   eval "$(scripts/services/etcd.sh)"    # sets BROKER_TEST_ETCD_URL
#
# Progress goes to stderr; stdout carries only the `export` line.
set -euo pipefail

ENDPOINT=127.0.0.1:2379
PEER=127.0.0.1:2380
URL="http://$ENDPOINT"
WAIT_SECONDS=${ETCD_WAIT_SECONDS:-30}

log() { echo "etcd.sh: $*" >&2; }

need_install=()
command -v etcd >/dev/null 2>&1 || need_install+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_install+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_install+=(protobuf-compiler)
if ((${#need_install[@]} > 0)); then
    log "installing ${need_install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need_install[@]}" >&2
fi

healthy() {
    ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINT" --dial-timeout=2s --command-timeout=2s endpoint health >/dev/null 2>&1
}

if healthy; then
    log "etcd already answering on $ENDPOINT"
else
    # Debian's etcd-server package may start its own systemd service; on machines without systemd
    # it does not, so we start one ourselves.
    state_dir=$(mktemp -d "${TMPDIR:-/tmp}/micro-broker-etcd.XXXXXX")
    log "starting etcd on $ENDPOINT (data and log in $state_dir)"
    # setsid + nohup: the server outlives this script and the shell that ran it.
    setsid nohup etcd --name default --data-dir "$state_dir/data" \
        --listen-client-urls "http://$ENDPOINT" --advertise-client-urls "http://$ENDPOINT" \
        --listen-peer-urls "http://$PEER" --initial-advertise-peer-urls "http://$PEER" \
        --initial-cluster "default=http://$PEER" \
        >"$state_dir/etcd.log" 2>&1 </dev/null &
    echo $! >"$state_dir/etcd.pid"
    deadline=$((SECONDS + WAIT_SECONDS))
    until healthy; do
        if ((SECONDS >= deadline)); then
            log "etcd did not become healthy within ${WAIT_SECONDS}s; its log ($state_dir/etcd.log):"
            tail -n 30 "$state_dir/etcd.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "etcd healthy (pid $(cat "$state_dir/etcd.pid"))"
fi

echo "export BROKER_TEST_ETCD_URL=$URL"
