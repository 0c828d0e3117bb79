#!/usr/bin/env bash
# Starts or stops a throwaway S3-compatible server for tests: moto's server (from PyPI, installed
# into a private virtualenv on first use) on 127.0.0.1 and a free port, state in memory.
#
#   scripts/throwaway-s3.sh start [--owner-pid PID]
#       prints STATEKEEPER_S3_ENDPOINT=http://127.0.0.1:PORT and STATEKEEPER_S3_PID=PID;
#       with --owner-pid, the server stops by itself once process PID has exited.
#   scripts/throwaway-s3.sh stop PID
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "throwaway-s3: $*" >&2; }

source scripts/lib/throwaway.sh

start() {
  local owner_pid=""
  if [ "${1:-}" = "--owner-pid" ]; then owner_pid="$2"; fi
  local python logfile
  python=$(scripts/python-env.sh 'moto[server]>=5,<6')
  logfile=$(mktemp /tmp/statekeeper-s3.XXXXXX.log)
  if ! serve_on_free_port "$owner_pid" "$logfile" "$python" -m moto.server -H 127.0.0.1 -p @PORT@; then
    log "could not start the S3 server; its log follows"
    cat "$logfile" >&2
    exit 1
  fi
  echo "STATEKEEPER_S3_ENDPOINT=http://127.0.0.1:$SERVER_PORT"
  echo "STATEKEEPER_S3_PID=$SERVER_PID"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) kill "$2" 2>/dev/null || true ;;
  *) echo "usage: $0 start [--owner-pid PID] | stop PID" >&2; exit 2 ;;
esac
