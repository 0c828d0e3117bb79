#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server: 127.0.0.1, a free port, a temp dir, password
# authentication over TCP. Installs PostgreSQL with apt-get when its binaries are missing.
# initdb refuses to run as root, so as root the server runs as the unprivileged `postgres` user.
#
#   scripts/throwaway-postgres.sh start [--owner-pid PID]
#       prints two lines: STATEKEEPER_PG_URL=postgres://... and STATEKEEPER_PG_DIR=/tmp/...
#       with --owner-pid, the server stops by itself once process PID has exited.
#   scripts/throwaway-postgres.sh stop DIR
#   scripts/throwaway-postgres.sh halt DIR     stops the server as a crash would, keeping its data
#   scripts/throwaway-postgres.sh resume DIR   starts it again on the same port (outage tests)
set -euo pipefail

log() { echo "throwaway-postgres: $*" >&2; }

find_pg_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return 0
  fi
  return 1
}

ensure_postgres() {
  if PG_BIN=$(find_pg_bin); then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL server binaries not found; install the 'postgresql' package (needs root)"
    exit 1
  fi
  log "PostgreSQL not found; installing it with apt-get (once per machine)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql postgresql-client >&2
  PG_BIN=$(find_pg_bin) || { log "PostgreSQL still not found after installing it"; exit 1; }
}

# Runs a command as the user that owns the server: `postgres` when we are root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

source "$(dirname "$0")/lib/throwaway.sh"

# serve DIR PORT: runs the server of DIR on PORT.
serve() {
  as_owner "$PG_BIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w -t 60 start -o \
    "-p $2 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    >/dev/null 2>&1
}

start() {
  local owner_pid=""
  if [ "${1:-}" = "--owner-pid" ]; then owner_pid="$2"; fi
  ensure_postgres
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  local dir password
  dir=$(mktemp -d /tmp/statekeeper-pg.XXXXXX)
  chmod 700 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s\n' "$password" > "$dir/pwfile"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/pwfile"
  as_owner "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
    --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  rm -f "$dir/pwfile"
  local port attempt
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    port=$(( 20000 + RANDOM % 40000 ))
    port_is_free "$port" || continue
    if serve "$dir" "$port"; then
      echo "$port" > "$dir/port"
      if [ -n "$owner_pid" ]; then
        # Detached watcher: stops the server when the owner exits, even if it crashed.
        setsid nohup bash -c "while kill -0 $owner_pid 2>/dev/null; do sleep 1; done; '$0' stop '$dir'" \
          >/dev/null 2>&1 < /dev/null &
      fi
      echo "STATEKEEPER_PG_URL=postgres://postgres:${password}@127.0.0.1:${port}/postgres"
      echo "STATEKEEPER_PG_DIR=$dir"
      return 0
    fi
  done
  log "could not start PostgreSQL; server log follows"
  cat "$dir/server.log" >&2 || true
  exit 1
}

stop() {
  local dir="$1"
  [ -d "$dir/data" ] || return 0
  PG_BIN=$(find_pg_bin)
  as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

halt() {
  PG_BIN=$(find_pg_bin)
  as_owner "$PG_BIN/pg_ctl" -D "$1/data" -m immediate stop >/dev/null
}

resume() {
  PG_BIN=$(find_pg_bin)
  serve "$1" "$(cat "$1/port")" || { cat "$1/server.log" >&2; exit 1; }
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop "$2" ;;
  halt) halt "$2" ;;
  resume) resume "$2" ;;
  *) echo "usage: $0 start [--owner-pid PID] | stop DIR | halt DIR | resume DIR" >&2; exit 2 ;;
esac
