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

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local owner_pid=""
  if [ "${1:-}" = "--owner-pid" ]; then owner_pid="$2"; fi
  local python port attempt pid logfile
  python=$(scripts/python-env.sh 'moto[server]>=5,<6')
  logfile=$(mktemp /tmp/statekeeper-s3.XXXXXX.log)
  for attempt in 1 2 3 4 5; do
    port=$(( 20000 + RANDOM % 40000 ))
    port_is_free "$port" || continue
    setsid nohup "$python" -m moto.server -H 127.0.0.1 -p "$port" >"$logfile" 2>&1 </dev/null &
    pid=$!
    for _ in $(seq 1 100); do
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      if ! port_is_free "$port"; then
        if [ -n "$owner_pid" ]; then
          setsid nohup bash -c "while kill -0 $owner_pid 2>/dev/null; do sleep 1; done; kill $pid" \
            >/dev/null 2>&1 </dev/null &
        fi
        echo "STATEKEEPER_S3_ENDPOINT=http://127.0.0.1:$port"
        echo "STATEKEEPER_S3_PID=$pid"
        return 0
      fi
      sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
  done
  log "could not start the S3 server; its log follows"
  cat "$logfile" >&2
  exit 1
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) kill "$2" 2>/dev/null || true ;;
  *) echo "usage: $0 start [--owner-pid PID] | stop PID" >&2; exit 2 ;;
esac
