#!/usr/bin/env bash
# Starts or stops a throwaway Azure Blob Storage emulator for tests: Azurite (from npm, installed
# into ~/.cache/statekeeper/node on first use; Node.js comes from apt-get when missing) on
# 127.0.0.1 and a free port, state in memory, with one container, `statekeeper-test`.
#
#   scripts/throwaway-azure.sh start [--owner-pid PID]
#       prints STATEKEEPER_AZURE_ENDPOINT=http://127.0.0.1:PORT/devstoreaccount1 and
#       STATEKEEPER_AZURE_PID=PID; with --owner-pid, the emulator stops once PID has exited.
#   scripts/throwaway-azure.sh stop PID
# The account is Azurite's well-known development account (devstoreaccount1), not a secret.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "throwaway-azure: $*" >&2; }

ACCOUNT=devstoreaccount1
KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
prefix=${XDG_CACHE_HOME:-$HOME/.cache}/statekeeper/node

source scripts/lib/throwaway.sh

ensure_azurite() {
  if [ -x "$prefix/node_modules/.bin/azurite-blob" ]; then return 0; fi
  if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then log "Node.js and npm are missing; install them (needs root)"; exit 1; fi
    log "installing Node.js and npm with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends nodejs npm >&2
  fi
  log "installing Azurite with npm (once per machine)"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --silent 'azurite@3' >&2
}

start() {
  local owner_pid=""
  if [ "${1:-}" = "--owner-pid" ]; then owner_pid="$2"; fi
  ensure_azurite
  local python logfile endpoint
  python=$(scripts/python-env.sh 'azure-storage-blob>=12,<13')
  logfile=$(mktemp /tmp/statekeeper-azure.XXXXXX.log)
  if ! serve_on_free_port "$owner_pid" "$logfile" "$prefix/node_modules/.bin/azurite-blob" \
    --blobHost 127.0.0.1 --blobPort @PORT@ --inMemoryPersistence --skipApiVersionCheck \
    --disableTelemetry --silent; then
    log "could not start Azurite; its log follows"
    cat "$logfile" >&2
    exit 1
  fi
  endpoint="http://127.0.0.1:$SERVER_PORT/$ACCOUNT"
  "$python" - "$endpoint" "$ACCOUNT" "$KEY" <<'PY'
import sys
from azure.storage.blob import BlobServiceClient
endpoint, account, key = sys.argv[1:]
BlobServiceClient(endpoint, credential={"account_name": account, "account_key": key}).create_container("statekeeper-test")
PY
  echo "STATEKEEPER_AZURE_ENDPOINT=$endpoint"
  echo "STATEKEEPER_AZURE_PID=$SERVER_PID"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) kill "$2" 2>/dev/null || true ;;
  *) echo "usage: $0 start [--owner-pid PID] | stop PID" >&2; exit 2 ;;
esac
