#!/usr/bin/env bash
# Makes a Python virtualenv with other languages' clients (pika for AMQP, confluent-kafka with
# its own modern librdkafka, grpcio with grpcio-tools' protoc for Go Micro's gRPC broker proto)
# for the interop tests: a message we publish must be readable by them, headers included.
# Idempotent; cached in ~/.cache/micro-broker/venv.
#
#   eval "$(scripts/services/python-clients.sh)"    # sets BROKER_TEST_PYTHON
#
# Progress goes to stderr; stdout carries only the `export` line.
set -euo pipefail

VENV=${MICRO_BROKER_VENV:-$HOME/.cache/micro-broker/venv}
PACKAGES=(pika confluent-kafka grpcio grpcio-tools)

log() { echo "python-clients.sh: $*" >&2; }

if ! "$VENV/bin/python" -c 'import pika, confluent_kafka, grpc, grpc_tools' >/dev/null 2>&1; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        log "installing python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq python3-venv >&2
    fi
    log "creating $VENV with ${PACKAGES[*]}"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
fi

echo "export BROKER_TEST_PYTHON=$VENV/bin/python"
